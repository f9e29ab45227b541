"""polyak._steps: the update counters and each update's weights, on the host and on the device,
against closed forms (``update_every=k`` with a constant decay ``d``: weight ``1 - d**k`` on every
k-th call; Uniform: ``1 / (n + 1)`` at the n-th averaging update), without an EMA."""

from __future__ import annotations

import pytest
import torch

from polyak import averagers
from polyak._steps import DeviceSteps, HostSteps


def test_host_steps_average_on_every_kth_call_with_the_covered_decays():
    rule, steps = averagers.Exponential(0.9), HostSteps()
    got = [steps.tick(rule, 3) for _ in range(7)]
    assert [w is None for w in got] == [True, True, False, True, True, False, True]
    assert got[2] == pytest.approx((1 - 0.9**3,), rel=1e-15)
    assert steps.step == 7 and steps.num_averages == 0  # counted only once the update ran


def test_host_steps_count_and_advance_the_rule_only_when_told_the_update_ran():
    rule, steps = averagers.Uniform(), HostSteps()
    weights = []
    for _ in range(6):
        w = steps.tick(rule, 2)
        if w is not None:
            weights.append(w[0])
            steps.averaged(rule)
    assert weights == pytest.approx([1.0, 1 / 2, 1 / 3], rel=1e-15)
    assert (steps.step, steps.num_averages, rule.count) == (6, 3, 3)
    assert steps.tick(rule, 1) == pytest.approx((1 / 4,))  # a failed update: not advanced
    assert steps.tick(rule, 1) == pytest.approx((1 / 4,))
    assert (steps.step, steps.num_averages) == (8, 3)


def test_device_steps_match_the_host_with_a_gate_off_the_averaging_steps():
    rule, steps = averagers.Exponential(0.9), DeviceSteps("cpu", 3, averagers.Exponential(0.9))
    gates, weights = [], []
    for _ in range(6):
        (weight,), gate = steps.tick(rule, 3)
        assert weight.dtype == torch.float64 and weight.shape == () and gate.dtype == torch.bool
        gates.append(bool(gate))
        weights.append(float(weight))
    assert gates == [True, True, False, True, True, False]
    assert weights[2] == weights[5] == pytest.approx(1 - 0.9**3, rel=1e-15)
    assert all(w == w for w in weights)  # finite off the averaging steps too
    assert (steps.step, steps.num_averages) == (6, 2)


def test_device_steps_keep_the_rules_state_beside_them_and_advance_it_where_due():
    rule = averagers.Uniform()
    steps = DeviceSteps(torch.device("cpu"), 2, rule)
    assert isinstance(rule.count, torch.Tensor) and rule.count.dtype == torch.int64
    weights = [float(steps.tick(rule, 2)[0][0]) for _ in range(4)]
    assert weights[1] == pytest.approx(1.0) and weights[3] == pytest.approx(1 / 2)
    assert int(rule.count) == 2 == steps.num_averages


def test_device_steps_setters_cover_and_to():
    rule = averagers.Uniform()
    steps = DeviceSteps("cpu", 1, rule)
    counter = steps._step
    steps.step, steps.num_averages = 10, 4
    assert steps._step is counter  # filled in place: a captured graph keeps reading it
    assert (steps.step, steps.num_averages) == (10, 4)
    steps.cover(4)  # update_every changed: 11 is not an averaging step, 12 is
    assert [bool(steps.tick(rule, 4)[1]) for _ in range(2)] == [True, False]
    steps.to("cpu", rule)
    assert (steps.step, steps.num_averages) == (12, 5) and int(rule.count) == 1


def test_device_steps_move_with_the_rules_state():
    rule = averagers.Uniform()
    steps = DeviceSteps("cpu", 2, rule)
    steps.to("meta", rule)
    assert rule.count.is_meta and steps._step.is_meta and steps._num.is_meta
    _, gate = steps.tick(rule, 2)  # the covered offsets moved too: no device mix
    assert gate.is_meta


@pytest.mark.parametrize(("every", "update_every"), [(4, 1), (4, 3), (2, 2)])
def test_switches_on_the_host_and_the_switch_gate_on_the_device(every, update_every):
    """A rule that switches (SwitchEMA) is asked about the averaging update that just ran: on the
    host after it, on the device at every call as a gate (True: no write-back), set off the
    averaging calls whatever the rule says."""
    rule = averagers.SwitchEMA(0.9, every=every)
    host, device = HostSteps(), DeviceSteps("cpu", update_every, rule)
    expected = []
    for n in range(1, 25):
        averaging = host.tick(rule, update_every) is not None
        switched = averaging and host.switches(rule, update_every)
        if averaging:
            host.averaged(rule)
        device.tick(rule, update_every)
        gate = device.switch_gate(rule, update_every)
        assert gate.dtype == torch.bool and gate.shape == ()
        assert bool(gate) == (not switched), n
        expected.append(switched)
    pending, want = every, []  # the first averaging call at or after each multiple of every
    for n in range(1, 25):
        due = n % update_every == 0 and n >= pending
        if due:
            pending = (n // every + 1) * every
        want.append(due)
    assert expected == want and any(want)
