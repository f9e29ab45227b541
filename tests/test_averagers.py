"""polyak.averagers: rules' weights against closed forms worked out by hand, the host and device
evaluations of the one definition against each other, rule state, and EMA(model, rule=...)."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import polyak
from polyak import schedules
from polyak.averagers import HOST, DeviceOps, Exponential, Rule, Uniform


def test_constant_decay_weight_is_one_minus_d():
    rule = Exponential(schedules.constant(0.75))
    assert rule.weight(1, 1) == 0.25
    assert rule.weight(10**9, 10**9) == 0.25  # a constant does not depend on the step


def test_update_every_multiplies_the_decays_of_the_covered_steps():
    """Covering steps a..b uses D = d(a) d(a+1) ... d(b): d ** k for a constant."""
    assert Exponential(schedules.constant(0.5)).weight(1, 3) == 1 - 0.125  # 0.5 ** 3
    assert Exponential(schedules.constant(0.5)).weight(7, 8) == 0.75  # 0.5 ** 2
    warmup = Exponential(schedules.tf_warmup(0.99))
    # TF's rule (1 + n) / (10 + n): steps 1, 2 give 2/11 and 3/12, product 1/22
    assert warmup.weight(1, 2) == pytest.approx(21 / 22, rel=1e-15)
    # steps 8, 9, 10 give 9/18, 10/19, 11/20: product 990/6840 = 11/76
    assert warmup.weight(8, 10) == pytest.approx(1 - 11 / 76, rel=1e-15)
    # EDM2's (1 - 1/n) ** (g + 1) with g = 1 over steps 2..4 telescopes to (1/4) ** 2
    assert Exponential(schedules.power(gamma=1)).weight(2, 4) == pytest.approx(15 / 16)
    # the first step of a power average has decay 0: the average starts at the weights
    assert Exponential(schedules.power(gamma=6.94)).weight(1, 5) == 1.0


def test_a_user_callable_is_called_once_per_covered_step():
    seen = []
    rule = Exponential(lambda n: seen.append(n) or 0.5)
    assert rule.weight(4, 6) == 0.875
    assert seen == [4, 5, 6]


@given(d=st.floats(0, 1), k=st.integers(1, 64), first=st.integers(1, 10**6))
def test_constant_decay_over_k_steps_is_d_to_the_k(d, k, first):
    weight = Exponential(schedules.constant(d)).weight(first, first + k - 1)
    assert 1 - weight == pytest.approx(d**k, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("bad", [1.5, -0.25, math.nan, math.inf, "0.9", None])
def test_a_decay_outside_zero_one_is_refused_with_the_step(bad):
    rule = Exponential(lambda n: 0.9 if n < 3 else bad)
    assert rule.weight(1, 2) == pytest.approx(1 - 0.81)
    with pytest.raises(
        ValueError, match=rf"returned {re.escape(repr(bad))} at step 3; a decay must be"
    ):
        rule.weight(2, 4)


def test_edges_zero_and_one():
    assert Exponential(schedules.constant(0.0)).weight(1, 4) == 1.0  # copy the weights
    assert Exponential(schedules.constant(1.0)).weight(1, 4) == 0.0  # frozen average


def test_exponential_is_a_rule():
    rule: Rule = Exponential(schedules.constant(0.9))
    assert callable(rule.weight)
    with pytest.raises(AttributeError):  # frozen: a rule holds no mutable state
        rule.decay = schedules.constant(0.5)  # type: ignore[misc]


# ------------------------------------------------ one definition: host weights == device weights

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_weights(rule, every, steps, device):
    """The rule's weights at steps ``every, 2 every, ...`` up to ``steps`` (the averaging updates),
    evaluated as a capturable EMA does: DeviceOps on int64 step tensors, advanced every step."""
    ops = DeviceOps(torch.arange(every - 1, -1, -1, device=device))
    step = torch.zeros((), dtype=torch.int64, device=device)
    out = []
    for _ in range(steps):
        step.add_(1)
        weights = rule.weights(step - (every - 1), step, ops)
        assert all(w.dtype == torch.float64 and w.shape == () for w in weights)
        assert all(bool(torch.isfinite(w)) for w in weights)  # off-steps included
        due = (step % every) == 0
        if bool(due):
            out.append(tuple(float(w) for w in weights))
        rule.advance(due, ops)
    return out


def host_weights(rule, every, steps):
    out = []
    for last in range(every, steps + 1, every):
        out.append(rule.weights(last - every + 1, last))
        rule.advance(True)
    return out


# correctly rounded arithmetic only (+ - * / min): the device gives the host's bits on any device
EXACT = {
    "constant": schedules.constant(0.9),
    "half_life": schedules.half_life(steps=7),
    "tf_warmup": schedules.tf_warmup(0.99),
    "tf_warmup_capped": schedules.tf_warmup(0.6),  # reaches its cap 0.6 at step 14
}
# ``**``: the device's pow and the C library's may differ by an ulp
POW = {
    "power": schedules.power(sigma_rel=0.1),
    "inverse_gamma": schedules.inverse_gamma(power=0.75, max_decay=0.999),
    "scaled": schedules.scaled(schedules.tf_warmup(0.95), 2.5),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("every", [1, 3, 12, 20])
@pytest.mark.parametrize("name", list(EXACT))
def test_exponential_host_and_device_weights_are_the_same_bits(name, every, device):
    """On the CPU both multiply the decays first to last (``torch.prod`` would not: from 16
    elements on it reduces in vector lanes, a few ulps off); CUDA's cumprod scans in parallel."""
    rule = Exponential(EXACT[name])
    host = host_weights(rule, every, 60)
    device_ = device_weights(rule, every, 60, device)
    if device == "cpu" or every == 1:
        assert device_ == host
    else:
        assert len(device_) == len(host)
        for (h,), (d,) in zip(host, device_, strict=True):
            assert abs(h - d) <= every * 2.0**-53
    assert all(type(w) is float for (w,) in host)  # the host path makes no tensor
    # and both are the closed form: 1 - prod(d(n)) over the covered steps, in exact fractions
    for i, (w,) in enumerate(host):
        last = (i + 1) * every
        product = math.prod(closed_form_decay(name, n) for n in range(last - every + 1, last + 1))
        assert w == pytest.approx(float(1 - product), rel=1e-13, abs=1e-16)


def closed_form_decay(name, n):
    if name == "constant":
        return Fraction(9, 10)
    if name == "half_life":
        return 0.5 ** (1 / 7)
    cap = Fraction(99, 100) if name == "tf_warmup" else Fraction(6, 10)
    return min(Fraction(1 + n, 10 + n), cap)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("name", list(POW))
def test_exponential_host_and_device_weights_agree_to_an_ulp_with_pow(name, every, device):
    rule = Exponential(POW[name])
    host = host_weights(rule, every, 40)
    device_ = device_weights(rule, every, 40, device)
    assert len(device_) == len(host) == 40 // every
    for (h,), (d,) in zip(host, device_, strict=True):
        assert abs(h - d) <= 4 * every * 2.0**-53  # |D| <= 1: a few ulps of each decay


@settings(max_examples=30, deadline=None)
@given(d=st.floats(0, 1), every=st.integers(1, 16), updates=st.integers(1, 4))
def test_constant_decay_device_weight_is_the_host_weight(d, every, updates):
    rule = Exponential(schedules.constant(d))
    steps = every * updates
    assert device_weights(rule, every, steps, "cpu") == host_weights(rule, every, steps)


def test_device_weights_off_the_averaging_steps_stay_finite():
    """A capturable EMA evaluates the weights at every call; covered steps that are not steps yet
    (n <= 0, where tf_warmup divides by zero at n = -10) are evaluated at 1."""
    rule = Exponential(schedules.tf_warmup(0.95))
    ops = DeviceOps(torch.arange(11, -1, -1))  # update_every = 12
    (w,) = rule.weights(torch.tensor(-10), torch.tensor(1), ops)
    assert float(w) == 1 - (2 / 11) ** 12  # twelve times step 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("every", [1, 5])
def test_uniform_weights_are_one_over_n_plus_one_on_host_and_device(every, device):
    host_rule, device_rule = Uniform(), Uniform()
    device_rule.map_state(lambda v: torch.tensor(v, device=device))
    host = host_weights(host_rule, every, 50 * every)
    assert host == [(1 / (n + 1),) for n in range(50)]  # the closed form, exactly
    assert device_weights(device_rule, every, 50 * every, device) == host
    assert host_rule.count == 50 and type(host_rule.count) is int
    assert int(device_rule.count) == 50  # advanced only where due, in place
    assert device_rule.count.device.type == device


# ------------------------------------------------------------------ state as data


def test_uniform_count_round_trips_through_its_state_dict():
    rule = Uniform()
    for _ in range(3):
        rule.advance(True)
    state = rule.state_dict()
    assert state == {"count": 3}
    resumed = Uniform()
    resumed.load_state_dict(state)
    assert resumed.weights(1, 1) == (1 / 4,)
    assert repr(resumed) == "Uniform(count=3)"


def test_uniform_state_moves_between_host_and_device_counts():
    """A capturable EMA's rule holds a device tensor: its state loads into a host rule as an int,
    and an int loads into the device counter in place (a captured graph keeps reading it)."""
    on_device = Uniform()
    on_device.map_state(lambda v: torch.tensor(v))
    counter = on_device.count
    on_device.load_state_dict({"count": 7})
    assert on_device.count is counter and int(counter) == 7
    host = Uniform()
    host.load_state_dict(on_device.state_dict())
    assert host.count == 7 and type(host.count) is int


@pytest.mark.parametrize(
    "bad", [-1, 1.5, True, "3", None, torch.tensor(2.0), torch.tensor(True), torch.tensor(-2)]
)
def test_uniform_refuses_a_bad_count(bad):
    rule = Uniform()
    with pytest.raises(
        ValueError, match=rf"count must be an int >= 0 .*got count={re.escape(repr(bad))}"
    ):
        rule.load_state_dict({"count": bad})
    assert rule.count == 0  # unchanged


def test_rule_state_keys_are_checked():
    with pytest.raises(
        ValueError,
        match=r"expected the keys \['count'\], got \['n'\] \(missing \['count'\], unexpected \['n'\]\)",
    ):
        Uniform().load_state_dict({"n": 3})
    with pytest.raises(TypeError, match="takes a mapping"):
        Uniform().load_state_dict(3)  # type: ignore[arg-type]
    rule = Exponential(schedules.constant(0.9))
    assert rule.state_dict() == {}
    rule.load_state_dict({})
    with pytest.raises(ValueError, match=r"Exponential.load_state_dict: expected the keys \[\]"):
        rule.load_state_dict({"count": 1})


def test_exponential_takes_a_float_as_the_constant_schedule():
    assert Exponential(0.75).decay == schedules.constant(0.75)
    assert Exponential(0.75).weights(1, 2) == (1 - 0.75 * 0.75,)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\], got decay=1.5"):
        Exponential(1.5)


def test_read_is_the_identity_by_default():
    averages, current = [torch.ones(2), torch.full((2,), 2.0)], torch.zeros(2)
    assert Exponential(0.9).read(averages, current) is averages[0]
    assert TwoRates().read(averages, current) is averages[0]
    assert Uniform().read(averages, current) is averages[0]
    assert Exponential.slots == ("ema",) and Uniform.slots == ("uniform",)
    assert isinstance(Uniform(), Rule)
    assert not isinstance(object(), Rule)


class TwoRates(Rule):
    """A two-slot rule with constant weights."""

    slots = ("fast", "slow")

    def weights(self, first, last, ops=HOST):
        return (0.5, 0.1)


def test_a_rule_gives_one_weight_per_slot():
    rule = TwoRates()
    assert len(rule.weights(1, 1)) == len(rule.slots) == 2


# ------------------------------------------------------------------ EMA(model, rule=...)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def sgd(model, steps, seed=1, hook=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(8, 5, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        hook()


@pytest.mark.parametrize("every", [1, 2])
def test_uniform_equals_swa_averaged_model(every):
    """``EMA(model, rule=Uniform())`` is ``AveragedModel``'s default running mean (its first
    update copies the weights; the n-th lerps by 1 / (n + 1)), and the float64 mean of the
    weights at the averaging steps."""
    model = mlp()
    swa = torch.optim.swa_utils.AveragedModel(model)
    ema = polyak.EMA(model, rule=Uniform(), update_every=every)
    seen = []

    def both():
        ema.update()
        if ema.step % every == 0:
            swa.update_parameters(model)
            seen.append({n: p.detach().double().clone() for n, p in model.named_parameters()})

    sgd(model, 9 * every, hook=both)
    assert ema.num_averages == int(swa.n_averaged) == 9 == ema.rule.count
    averaged = dict(swa.module.named_parameters())
    for name in ema.names():
        # AveragedModel lerps by a float32 tensor weight, through another ATen path: an ulp apart
        torch.testing.assert_close(ema.average(name), averaged[name], rtol=1e-6, atol=1e-8)
        mean = sum(s[name] for s in seen) / len(seen)
        torch.testing.assert_close(ema.average(name).double(), mean, rtol=1e-6, atol=1e-7)
    assert ema.decay == 9 / 10  # the next update keeps 9/10 of the mean


def test_rule_exponential_is_decay():
    m1, m2 = mlp(), mlp()
    by_decay = polyak.EMA(m1, decay=schedules.tf_warmup(0.9), update_every=2)
    by_rule = polyak.EMA(m2, rule=Exponential(schedules.tf_warmup(0.9)), update_every=2)
    sgd(m1, 7, hook=by_decay.update)
    sgd(m2, 7, hook=by_rule.update)
    for name in by_decay.names():
        assert torch.equal(by_decay.average(name), by_rule.average(name))
    assert by_rule.schedule == schedules.tf_warmup(0.9)
    default = polyak.EMA(mlp())
    assert default.rule == Exponential(schedules.constant(0.999)) and default.decay == 0.999


@pytest.mark.parametrize("every", [1, 3])
def test_capturable_uniform_equals_eager(every):
    m1, m2 = mlp(), mlp()
    eager = polyak.EMA(m1, rule=Uniform(), update_every=every)
    captured = polyak.EMA(m2, rule=Uniform(), update_every=every, capturable=True)
    counter = captured.rule.count
    assert isinstance(counter, torch.Tensor)  # kept beside the step counter
    sgd(m1, 10, hook=eager.update)
    sgd(m2, 10, hook=captured.update)
    assert captured.rule.count is counter  # advanced in place: a captured graph reads it
    assert int(captured.rule.count) == eager.rule.count == 10 // every
    for name in eager.names():  # the same float64 weight, read in fp32 by the kernel
        assert torch.equal(eager.average(name), captured.average(name)), name


def test_capturable_uniform_update_does_not_touch_the_host(monkeypatch, no_host_reads):
    from polyak._kernels import _foreach

    monkeypatch.setattr(_foreach, "HOST_GATE_DEVICES", frozenset())  # the CPU plays the device
    ema = polyak.EMA(mlp(), rule=Uniform(), update_every=2, capturable=True)
    ema.update()
    with no_host_reads():
        ema.update()
        ema.update()
    assert ema.step == 3 and int(ema.rule.count) == 1


@pytest.mark.parametrize("capturable", [False, True])
def test_uniform_resume_continues_the_mean(capturable):
    """Save the EMA's state (which holds the rule's, format 2), load it into a fresh one, go on:
    the same bits as a run never interrupted (a count restarted at 0 would restart the mean)."""
    m1 = mlp()
    ema = polyak.EMA(m1, rule=Uniform(), capturable=capturable)
    sgd(m1, 4, hook=ema.update)
    saved = ema.state_dict()
    assert saved["rule"]["state"] == {"count": 4}
    m2 = mlp(seed=5)
    m2.load_state_dict(m1.state_dict())
    resumed = polyak.EMA(m2, rule=Uniform(), capturable=capturable)
    resumed.load_state_dict(saved)
    sgd(m1, 3, seed=2, hook=ema.update)
    sgd(m2, 3, seed=2, hook=resumed.update)
    for name in ema.names():
        assert torch.equal(ema.average(name), resumed.average(name)), name
    restarted = polyak.EMA(mlp(seed=5), rule=Uniform())
    restarted.model.load_state_dict(m1.state_dict())
    restarted.load_state_dict(dict(saved, rule={**saved["rule"], "state": {"count": 0}}))
    assert restarted.decay == 0.0 != resumed.decay  # weight 1: the mean would start over


def test_to_moves_the_rule_state_with_the_step_counter():
    ema = polyak.EMA(mlp(), rule=Uniform(), capturable=True, kernel="reference")
    ema.update()
    ema.to("meta")
    assert ema.rule.count.device == torch.device("meta")


def test_rule_and_decay_together_are_refused():
    with pytest.raises(
        ValueError, match=r"decay=0.999 and rule=Uniform\(count=0\) cannot be given together"
    ):
        polyak.EMA(mlp(), 0.999, rule=Uniform())
    with pytest.raises(ValueError, match=r"decay=TFWarmup\(decay=0.9\) and rule=Exponential\("):
        polyak.EMA(mlp(), decay=schedules.tf_warmup(0.9), rule=Exponential(0.5))


def test_a_rule_must_be_a_rule():
    with pytest.raises(TypeError, match=r"rule must be a polyak.averagers.Rule .*got <function"):
        polyak.EMA(mlp(), rule=lambda n: 0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got 0.9 of type float"):
        polyak.EMA(mlp(), rule=0.9)  # type: ignore[arg-type]


def test_a_rule_with_several_slots_keeps_one_average_per_slot():
    """Each slot moves by its own weight: after one update from s = θ0, s_k = θ0 + w_k (θ1 - θ0)."""
    model = mlp()
    start = [p.detach().clone() for p in model.parameters()]
    ema = polyak.EMA(model, rule=TwoRates(), kernel="reference")
    assert ema.slots == ("fast", "slow")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for (name, p), p0 in zip(model.named_parameters(), start, strict=True):
        for slot, w in (("fast", 0.5), ("slow", 0.1)):
            torch.testing.assert_close(ema.average(name, slot=slot), p0 + w * (p.detach() - p0))


def test_capturable_refuses_a_python_callable_given_as_a_rule():
    with pytest.raises(ValueError, match="a Python callable cannot do"):
        polyak.EMA(mlp(), rule=Exponential(lambda n: 0.9), capturable=True)


def test_repr_names_the_rule():
    ema = polyak.EMA(mlp(), rule=Uniform())
    ema.update()
    assert repr(ema).startswith("EMA(rule=Uniform(count=1), step=1,")
    assert ema.schedule is None
    assert repr(polyak.EMA(mlp(), decay=0.5)).startswith("EMA(decay=Constant(decay=0.5), step=0,")
