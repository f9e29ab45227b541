"""The averaging family (issue 15): BEMA, LAWA, Uniform(start=) and Switch-EMA against direct
float64 implementations of their papers' formulas, host weights against device weights, state
round trips, bad arguments, the rules as data, and every slot stored off the device
(``offload="cpu"``).

The rules are driven by a small host harness that does what polyak.EMA does with a rule (its
weights at every ``update_every``-th step, lerped into every slot by the reference kernel, then
``advance``), and then through polyak.EMA end to end.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import polyak
from polyak import _kernels, _state, schedules
from polyak._kernels import _foreach
from polyak.averagers import BEMA, HOST, LAWA, DeviceOps, Rule, SwitchEMA, Uniform
from polyak.averagers._ops import place_state
from polyak.ema import LoadedSettingsWarning

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (runs on the GPU machine)")


def trajectory(steps, seed=0):
    """θ_0 (the weights the EMA is built with), θ_1, ..., θ_steps: a noisy drift in float64, two
    tensors of different shapes."""
    gen = torch.Generator().manual_seed(seed)
    theta = [
        [
            torch.randn(5, generator=gen, dtype=torch.float64),
            torch.randn(2, 3, generator=gen, dtype=torch.float64),
        ]
    ]
    for _ in range(steps):
        theta.append(
            [
                t + 0.05 * torch.randn(t.shape, generator=gen, dtype=torch.float64) + 0.01
                for t in theta[-1]
            ]
        )
    return theta


def drive(rule, theta, every):
    """The host harness: slots start as copies of θ_0; at steps every, 2 every, ... the rule's
    weights are lerped into every slot by the reference kernel and the rule advances. Returns the
    read average (with the current weights) after every step, and the slots at the end."""
    slots = [[t.clone() for t in theta[0]] for _ in rule.slots]
    sources = [t.clone() for t in theta[0]]
    update = _kernels.build("reference", slots, sources)
    reads = {}
    for n in range(1, len(theta)):
        for source, value in zip(sources, theta[n], strict=True):
            source.copy_(value)
        if n % every == 0:
            update.lerp_(list(rule.weights(n - every + 1, n)))
            rule.advance(True)
        reads[n] = [  # cloned: the default read is the shadow itself, which moves on
            rule.read([slot[i] for slot in slots], sources[i]).clone() for i in range(len(sources))
        ]
    return reads, slots


def assert_close(actual, expected, rel=1e-12):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rel, atol=rel)


# ------------------------------------------------------------------ BEMA


def bema_reference(theta, every, kappa=0.5, eta=0.2, rho=10.0, gamma=1.0, tau=0):
    """Block & Zhang 2025, Algorithm 1, in float64 as the paper writes it: during the burn-in
    (n <= τ) θ_0, the EMA and the output are reset to the iterate; after it, every φ-th step,
    β = (ρ + γt)^-κ, α = (ρ + γt)^-η with t = n - τ, EMA = (1 - β) EMA + β θ_n, output
    EMA + α (θ_n - θ_0). Between updates the output keeps the last α and EMA with the current θ."""
    theta0, ema, alpha = theta[0], theta[0], 1.0
    out = {}
    for n in range(1, len(theta)):
        if n % every == 0:
            if n <= tau:
                theta0, ema, alpha = theta[n], theta[n], 1.0
            else:
                t = n - tau
                beta = (rho + gamma * t) ** (-kappa)
                alpha = (rho + gamma * t) ** (-eta)
                ema = [(1 - beta) * e + beta * x for e, x in zip(ema, theta[n], strict=True)]
        out[n] = [e + alpha * (x - z) for e, x, z in zip(ema, theta[n], theta0, strict=True)]
    return out


@pytest.mark.parametrize(
    ("every", "kwargs"),
    [
        (1, {}),
        (1, {"update_after": 25}),
        (4, {"update_after": 40}),
        (3, {"update_after": 20}),  # τ not a multiple of every: θ_0 is θ_18, t counts from τ
        (1, {"kappa": 0.7, "eta": 0.4, "rho": 1.0, "gamma": 2.0}),
        (5, {"kappa": 0.0, "eta": 0.0}),  # β = α = 1: the output is the iterate itself
    ],
)
def test_bema_equals_the_papers_algorithm_in_float64(every, kwargs):
    theta = trajectory(300)
    rule = BEMA(**kwargs)
    reads, slots = drive(rule, theta, every)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "update_after"}
    expected = bema_reference(theta, every, tau=kwargs.get("update_after", 0), **ref_kwargs)
    for n in range(1, 301):
        assert_close(reads[n], expected[n])
    tau = kwargs.get("update_after", 0)
    assert rule.step == 300 // every * every
    theta0_step = tau // every * every  # the last averaging update at or before τ
    assert all(torch.equal(s, t) for s, t in zip(slots[1], theta[theta0_step], strict=True))


def test_bema_weights_by_hand():
    rule = BEMA()
    assert rule.weights(1, 1) == (11**-0.5, 0.0)  # t = 1: (10 + 1) ** -0.5, θ_0 kept
    rule.advance(True)
    assert rule.alpha() == 11**-0.2
    assert rule.weights(5, 8) == (18**-0.5, 0.0)  # update_every = 4: β at the last step only
    late = BEMA(update_after=10, rho=2.0, gamma=3.0, kappa=1.0)
    assert late.weights(10, 10) == (1.0, 1.0)  # burn-in: copy into both slots
    assert late.weights(11, 11) == (1 / 5, 0.0)  # t = 1: 1 / (2 + 3)
    assert late.weights(13, 13) == (1 / 11, 0.0)  # t = 3
    assert BEMA().alpha() == 1.0  # before any update the read is the weights
    # rho = 0 (allowed with gamma >= 1): beta_t = t ** -kappa, and the burn-in stays finite
    zero = BEMA(rho=0.0, gamma=1.0, kappa=1.0, eta=1.0, update_after=3)
    assert zero.alpha() == 1.0 and zero.weights(3, 3) == (1.0, 1.0)
    assert zero.weights(5, 5) == (1 / 2, 0.0)  # t = 2


def test_bema_read_is_ema_plus_alpha_times_the_drift():
    rule = BEMA(eta=1.0, rho=3.0)
    rule.weights(1, 1)
    rule.advance(True)  # t = 1: alpha = 1 / 4
    ema, theta0, current = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([10.0])
    out = rule.read([ema, theta0], current)
    assert out.tolist() == [1.0 + (10.0 - 2.0) / 4]
    assert out is not ema and ema.tolist() == [1.0]  # a new tensor; the shadows are untouched


# ------------------------------------------------------------------ LAWA


def lawa_reference(theta, every, k):
    """Kaddour 2022 / Sanyal et al. 2023: the float64 mean of the latest k checkpoints, one every
    ν = every steps (θ_0 before the first)."""
    checkpoints, out = [], {}
    for n in range(1, len(theta)):
        if n % every == 0:
            checkpoints.append(theta[n])
        latest = checkpoints[-k:] or [theta[0]]
        out[n] = [torch.stack(ts).mean(0) for ts in zip(*latest, strict=True)]
    return out, checkpoints


@pytest.mark.parametrize(("k", "every"), [(1, 1), (3, 1), (5, 7), (4, 10)])
def test_lawa_equals_the_mean_of_the_latest_k_checkpoints(k, every):
    theta = trajectory(200)
    rule = LAWA(k)
    reads, slots = drive(rule, theta, every)
    expected, checkpoints = lawa_reference(theta, every, k)
    for n in range(1, 201):
        assert_close(reads[n], expected[n], rel=1e-13)
    assert rule.count == len(checkpoints) == 200 // every
    for j, slot in enumerate(slots):  # each slot holds a checkpoint bit for bit: weight 1 copies
        (c,) = [c for c in range(len(checkpoints)) if c % k == j][-1:]
        assert all(torch.equal(s, t) for s, t in zip(slot, checkpoints[c], strict=True))


def test_lawa_weights_and_slots_by_hand():
    rule = LAWA(3)
    assert rule.slots == ("lawa0", "lawa1", "lawa2")
    seen = []
    for _ in range(5):
        seen.append(rule.weights(1, 1))
        rule.advance(True)
    assert seen == [
        (1.0, 0.0, 0.0),
        (0.0, 1.0, 0.0),
        (0.0, 0.0, 1.0),
        (1.0, 0.0, 0.0),
        (0.0, 1.0, 0.0),
    ]
    a, b, c = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([6.0])
    assert LAWA(3).read([a, b, c], a).tolist() == [1.0]  # no checkpoint yet: slot 0
    two = LAWA(3)
    two.load_state_dict({"count": 2})
    assert two.read([a, b, c], a).tolist() == [1.5]  # two filled slots
    assert rule.read([a, b, c], a).tolist() == [3.0]  # count 5: all three


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7])
def test_lawa_read_with_a_device_count_equals_the_host_read(count):
    averages = [torch.randn(4, dtype=torch.float64) for _ in range(3)]
    host, device = LAWA(3), LAWA(3)
    host.load_state_dict({"count": count})
    device.map_state(lambda v: place_state(v, "cpu"))
    device.load_state_dict({"count": count})
    assert isinstance(device.count, torch.Tensor)
    assert torch.equal(device.read(averages, averages[0]), host.read(averages, averages[0]))


# ------------------------------------------------------------------ Uniform(start=)


def swa_reference(theta, every, start):
    """Izmailov et al. 2018 from swa_start: before it the average is the iterate; from it, the
    float64 mean of the iterates at the averaging steps n >= start."""
    seen, out = [], {}
    current = theta[0]
    for n in range(1, len(theta)):
        if n % every == 0:
            if n >= start:
                seen.append(theta[n])
                current = [torch.stack(ts).mean(0) for ts in zip(*seen, strict=True)]
            else:
                current = theta[n]
        out[n] = current
    return out


@pytest.mark.parametrize(("start", "every"), [(0, 1), (1, 3), (50, 1), (50, 4), (53, 5)])
def test_uniform_from_start_equals_the_mean_since_start(start, every):
    theta = trajectory(250)
    rule = Uniform(start=start)
    reads, _ = drive(rule, theta, every)
    expected = swa_reference(theta, every, start)
    for n in range(1, 251):
        assert_close(reads[n], expected[n], rel=1e-12)
    assert rule.count == len([n for n in range(every, 251, every) if n >= start])


def test_uniform_start_weights_by_hand():
    rule = Uniform(start=5)
    assert rule.weights(3, 4) == (1.0,)  # before the start: a copy
    rule.advance(True)
    assert rule.count == 0  # ... not counted
    assert rule.weights(5, 6) == (1.0,)  # covers the start: the first of the mean
    rule.advance(True)
    assert rule.weights(7, 8) == (0.5,)
    rule.advance(True)
    assert rule.count == 2 and rule.weights(9, 10) == (1 / 3,)


def test_uniform_without_start_is_unchanged_bit_for_bit():
    theta = trajectory(60)
    base = drive(Uniform(), theta, 3)[0]
    for start in (0, 1, 3):  # every averaging update is at or after these
        other = drive(Uniform(start=start), theta, 3)[0]
        for n in base:
            assert all(torch.equal(a, b) for a, b in zip(base[n], other[n], strict=True))
    assert (
        repr(Uniform()) == "Uniform(count=0)"
        and repr(Uniform(start=7)) == "Uniform(start=7, count=0)"
    )


# ------------------------------------------------------------------ one definition: host == device


def host_run(rule, every, steps):
    out = []
    for last in range(every, steps + 1, every):
        out.append(rule.weights(last - every + 1, last))
        rule.advance(True)
    return out


def device_run(rule, every, steps, device):
    """As a capturable EMA: DeviceOps on int64 step tensors, weights and advance at every call."""
    rule.map_state(lambda v: place_state(v, device))
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


EXACT_RULES = {
    "lawa3": lambda: LAWA(3),
    "lawa1": lambda: LAWA(1),
    "uniform_start": lambda: Uniform(start=13),
    "bema_kappa1": lambda: BEMA(kappa=1.0, eta=1.0, update_after=9),  # x ** -1: 1 / x, exact
    "bema_rho0": lambda: BEMA(kappa=1.0, eta=1.0, rho=0.0, gamma=1.0, update_after=5),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("every", [1, 3, 8])
@pytest.mark.parametrize("name", list(EXACT_RULES))
def test_host_and_device_weights_and_state_are_the_same_bits(name, every, device):
    host, dev = EXACT_RULES[name](), EXACT_RULES[name]()
    expected = host_run(host, every, 80)
    assert all(type(w) is float for ws in expected for w in ws)  # the host path makes no tensor
    assert device_run(dev, every, 80, device) == expected
    state = {k: int(v) for k, v in dev.state_dict().items()}
    assert state == host.state_dict()  # advanced only where due, in place
    assert all(v.device.type == device for v in dev.state_dict().values())
    if isinstance(host, BEMA):
        assert float(dev.alpha()) == host.alpha()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("every", [1, 4])
def test_bema_host_and_device_weights_agree_to_an_ulp(every, device):
    """``**`` with a non-integer exponent: torch's pow and the C library's may differ by an ulp."""
    host, dev = BEMA(update_after=6), BEMA(update_after=6)
    expected = host_run(host, every, 60)
    got = device_run(dev, every, 60, device)
    assert len(got) == len(expected) == 60 // every
    for h, d in zip(expected, got, strict=True):
        assert h[1] == d[1] and abs(h[0] - d[0]) <= 2 * 2.0**-53
    assert int(dev.step) == host.step == 60 and abs(float(dev.alpha()) - host.alpha()) <= 2**-52


def test_device_advance_keeps_the_state_storage():
    """A captured graph keeps reading the tensors it was captured with: advance writes in place."""
    for rule in (BEMA(), LAWA(2), Uniform(start=3)):
        rule.map_state(lambda v: place_state(v, "cpu"))
        (before,) = rule.state_dict().values()
        device_run(rule, 2, 6, "cpu")
        (after,) = rule.state_dict().values()
        assert after is before


# ------------------------------------------------------------------ state as data


RULES = {
    "bema": lambda: BEMA(update_after=7),
    "lawa": lambda: LAWA(4),
    "uniform_start": lambda: Uniform(start=9),
}


def observe(rule):
    """What a rule's state decides: its next weights and its read of fixed slots."""
    rule = copy.deepcopy(rule)
    averages = [torch.full((1,), float(j + 1)) for j in range(len(rule.slots))]
    return rule.weights(47, 48), rule.read(averages, torch.full((1,), 9.0)).tolist()


@pytest.mark.parametrize("name", list(RULES))
def test_state_dict_round_trip_resumes_exactly(name):
    every = 3
    straight = RULES[name]()
    whole = host_run(straight, every, 90)
    first = RULES[name]()
    head = host_run(first, every, 45)
    resumed = RULES[name]()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    tail = []
    for last in range(48, 91, every):
        tail.append(resumed.weights(last - every + 1, last))
        resumed.advance(True)
    assert head + tail == whole
    assert resumed.state_dict() == straight.state_dict()
    loaded, fresh = RULES[name](), RULES[name]()
    loaded.load_state_dict(first.state_dict())
    assert observe(loaded) == observe(first)
    assert observe(fresh) != observe(first)  # a lost state would show
    # a device state loads into a host rule as ints, and ints into the device counter in place
    dev = RULES[name]()
    dev.map_state(lambda v: place_state(v, "cpu"))
    (counter,) = dev.state_dict().values()
    dev.load_state_dict(first.state_dict())
    assert dev.state_dict()[next(iter(first.state_dict()))] is counter
    host = RULES[name]()
    host.load_state_dict(dev.state_dict())
    assert host.state_dict() == first.state_dict()
    assert all(type(v) is int for v in host.state_dict().values())


@pytest.mark.parametrize(
    ("rule", "key", "meaning"),
    [
        (BEMA(), "step", "the last step of the last averaging update"),
        (LAWA(2), "count", "the checkpoints taken so far"),
        (Uniform(start=3), "count", "the averaging updates taken so far"),
    ],
)
@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None, torch.tensor(2.0), torch.tensor(-2)])
def test_a_bad_state_value_is_refused(rule, key, meaning, bad):
    name = type(rule).__name__
    with pytest.raises(
        ValueError,
        match=rf"{name}.load_state_dict: {key} must be an int >= 0 \({meaning}\), got "
        rf"{key}={re.escape(repr(bad))}; pass the output of {name}.state_dict\(\)",
    ):
        rule.load_state_dict({key: bad})
    assert rule.state_dict() == {key: 0}  # unchanged
    with pytest.raises(ValueError, match=rf"expected the keys \['{key}'\], got \['n'\]"):
        rule.load_state_dict({"n": 1})


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: BEMA(kappa=-0.5), ValueError, r"BEMA\(kappa=...\) must be >= 0, got kappa=-0.5"),
        (lambda: BEMA(eta=-1), ValueError, r"eta=-1; the paper's defaults are kappa=0.5"),
        (lambda: BEMA(kappa="0.5"), TypeError, r"must be a finite number, got kappa='0.5'"),
        (lambda: BEMA(rho=math.nan), TypeError, r"got rho=nan"),
        (lambda: BEMA(gamma=True), TypeError, r"got gamma=True"),
        (
            lambda: BEMA(rho=0.0, gamma=0.5),
            ValueError,
            r"rho \+ gamma >= 1 .*got rho=0.0, gamma=0.5",
        ),
        (lambda: BEMA(update_after=-3), ValueError, r"an int >= 0, got update_after=-3"),
        (lambda: BEMA(update_after=2.0), ValueError, r"got update_after=2.0"),
        (lambda: LAWA(0), ValueError, r"LAWA\(k=...\) .* an int >= 1, got k=0; e.g. LAWA\(k=5\)"),
        (lambda: LAWA(2.0), ValueError, r"got k=2.0"),
        (lambda: LAWA(True), ValueError, r"got k=True"),
        (lambda: Uniform(start=-1), ValueError, r"an int >= 0 or None .*got start=-1"),
        (lambda: Uniform(start=1.5), ValueError, r"got start=1.5"),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_advance_without_weights_says_what_to_do():
    for rule in (BEMA(), Uniform(start=2)):
        with pytest.raises(RuntimeError, match=r"advance\(\) was called without .*weights\(\)"):
            rule.advance(True)
    with pytest.raises(ValueError, match=r"LAWA\(k=3\).read takes the 3 slots' averages, got 2"):
        LAWA(3).read([torch.zeros(1)] * 2, torch.zeros(1))


def test_rules_encode_as_data():
    bema = BEMA(kappa=0.6, update_after=5)
    bema.weights(7, 7)
    bema.advance(True)
    assert _state.encode_rule(bema) == {
        "type": "BEMA",
        "settings": {"kappa": 0.6, "eta": 0.2, "rho": 10.0, "gamma": 1.0, "update_after": 5},
        "state": {"step": 7},
        "slots": ["ema", "theta0"],
    }
    lawa = LAWA(3)
    lawa.map_state(lambda v: place_state(v, "cpu"))  # a device counter is stored as an int
    assert _state.encode_rule(lawa) == {
        "type": "LAWA",
        "settings": {"k": 3},
        "state": {"count": 0},
        "slots": ["lawa0", "lawa1", "lawa2"],
    }
    assert _state.encode_rule(Uniform(start=4))["settings"] == {"start": 4}
    assert _state.encode_rule(Uniform())["settings"] == {"start": None}
    for rule in (bema, lawa, Uniform(start=4)):  # the settings rebuild the rule
        data = _state.encode_rule(rule)
        rebuilt = type(rule)(**data["settings"])
        assert _state.encode_rule(rebuilt)["settings"] == data["settings"]
        assert isinstance(rebuilt, Rule)
        assert _state.rule_slots(rebuilt) == tuple(data["slots"])


# ------------------------------------------------------------------ EMA(model, rule=Uniform(start))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def sgd(model, steps, hook, seed=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(8, 5, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        hook()


@pytest.mark.parametrize(("start", "every"), [(6, 1), (7, 2)])
def test_ema_with_uniform_start_is_the_float64_mean_since_start(start, every):
    model = mlp()
    ema = polyak.EMA(model, rule=Uniform(start=start), update_every=every)
    seen = []

    def hook():
        ema.update()
        if ema.step % every == 0 and ema.step >= start:
            seen.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        if ema.step == start - 1:  # before the start the average is the weights
            for n, p in model.named_parameters():
                if ema.step % every == 0:
                    assert torch.equal(ema.average(n), p.detach())

    sgd(model, 20, hook)
    assert ema.rule.count == len(seen) == ema.num_averages - (start - 1) // every
    for name in ema.names():
        mean = sum(s[name] for s in seen) / len(seen)
        torch.testing.assert_close(ema.average(name).double(), mean, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("every", [1, 3])
def test_capturable_uniform_start_equals_eager_and_resumes(every):
    m1, m2 = mlp(), mlp()
    eager = polyak.EMA(m1, rule=Uniform(start=5), update_every=every)
    captured = polyak.EMA(m2, rule=Uniform(start=5), update_every=every, capturable=True)
    sgd(m1, 10, eager.update)
    sgd(m2, 10, captured.update)
    assert int(captured.rule.count) == eager.rule.count
    for name in eager.names():
        assert torch.equal(eager.average(name), captured.average(name)), name
    saved = eager.state_dict()
    assert saved["rule"]["settings"] == {"start": 5}
    m3 = mlp(seed=4)
    m3.load_state_dict(m1.state_dict())
    resumed = polyak.EMA(m3, rule=Uniform(start=5), update_every=every)
    resumed.load_state_dict(saved)
    sgd(m1, 6, eager.update, seed=2)
    sgd(m3, 6, resumed.update, seed=2)
    for name in eager.names():
        assert torch.equal(eager.average(name), resumed.average(name)), name


# ------------------------------------------------------------------ Switch-EMA


def switch_ema_reference(theta0, grad, lr, decay, steps, switch_every):
    """Li et al. 2024, "Switch EMA: A Free Lunch for Better Flatness and Sharpness", Algorithm 1,
    in float64: SGD steps θ ← θ - lr ∇L(θ); after each, the EMA s ← d s + (1 - d) θ; every
    ``switch_every`` steps (each epoch) the model's weights are replaced by the EMA, θ ← s (the
    EMA keeps going). Returns the (θ, s) trajectory after each step (after the switch)."""
    theta, ema = theta0.clone(), theta0.clone()
    out = []
    for n in range(1, steps + 1):
        theta = theta - lr * grad(theta, n)
        ema = decay * ema + (1 - decay) * theta
        if n % switch_every == 0:
            theta = ema.clone()
        out.append((theta, ema))
    return out


def test_switch_ema_reference_by_hand_and_through_copy_to():
    """The reference on L(θ) = θ²/2 by hand; then polyak's EMA with ``ema.copy_to()`` every N
    steps (Switch-EMA by hand, as for epochs of varying length) follows it in float64."""
    out = switch_ema_reference(
        torch.tensor([1.0], dtype=torch.float64), lambda t, n: t, 0.5, 0.5, 2, 2
    )
    # step 1: θ = 0.5, s = 0.75; step 2: θ = 0.25, s = 0.5, switch: θ = 0.5
    assert [(float(t), float(s)) for t, s in out] == [(0.5, 0.75), (0.5, 0.5)]

    target = torch.linspace(-1, 1, 6, dtype=torch.float64)

    def grad(theta, n):
        return (theta - target) * (1 + 0.1 * math.sin(n))

    model = nn.Linear(6, 1, bias=False).double()
    theta0 = model.weight.detach().clone().reshape(-1)
    ema = polyak.EMA(model, decay=0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    expected = switch_ema_reference(theta0, grad, 0.3, 0.8, 40, 7)
    for n in range(1, 41):
        opt.zero_grad()
        model.weight.grad = grad(model.weight.detach().reshape(-1), n).reshape(1, 6)
        opt.step()
        ema.update()
        if n % 7 == 0:
            ema.copy_to()
        theta, s = expected[n - 1]
        torch.testing.assert_close(model.weight.detach().reshape(-1), theta, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(ema.average("weight").reshape(-1), s, rtol=1e-13, atol=1e-14)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 6), every=st.integers(1, 5), updates=st.integers(0, 20))
def test_lawa_reads_the_mean_of_the_latest_checkpoints_property(k, every, updates):
    theta = [
        [torch.tensor([float(n) ** 1.5], dtype=torch.float64)] for n in range(every * updates + 1)
    ]
    rule = LAWA(k)
    reads, _ = drive(rule, theta, every)
    if updates:
        last = every * updates
        window = [float(n) ** 1.5 for n in range(every, last + 1, every)][-k:]
        assert float(reads[last][0]) == pytest.approx(sum(window) / len(window), rel=1e-14)
    assert rule.weights(1, 1) == tuple(float(j == updates % k) for j in range(k))
    assert HOST.real(rule.count) == updates


# ------------------------------------------------------------------ multi-slot rules through polyak.EMA


def weights_seen(model, steps, every, make_ema, seed=1):
    """Train ``steps`` SGD steps with an EMA built by ``make_ema(model)``; return the EMA and the
    float64 weights after each step (index 0: at construction), name -> list."""
    ema = make_ema(model)
    seen = [{n: p.detach().double().clone() for n, p in model.named_parameters()}]

    def hook():
        ema.update()
        seen.append({n: p.detach().double().clone() for n, p in model.named_parameters()})

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(8, 5, generator=gen, dtype=torch.float64)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        hook()
    theta = [[s[n] for n in ema.names()] for s in seen]
    return ema, theta


@pytest.mark.parametrize(("every", "update_after"), [(1, 0), (1, 5), (3, 7)])
def test_ema_with_bema_reads_the_papers_average(every, update_after):
    """polyak.EMA(model, rule=BEMA(...)) in float64: average(name), swapped() and exports give
    Block & Zhang's μ̂ (bema_reference), and the model's own weights come back bit for bit."""
    model = mlp().double()
    ema, theta = weights_seen(
        model, 20, every,
        lambda m: polyak.EMA(m, rule=BEMA(update_after=update_after), update_every=every),
    )  # fmt: skip
    expected = bema_reference(theta, every, tau=update_after)[20]
    names = ema.names()
    assert ema.slots == ("ema", "theta0")
    got = [ema.average(n) for n in names]
    assert_close(got, expected, rel=1e-12)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped():
        assert_close([dict(model.named_parameters())[n].detach() for n in names], expected, 1e-12)
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    exported = ema.export_state_dict()
    assert_close([exported[n] for n in names], expected, rel=1e-12)
    # the slots themselves: the EMA, and θ0 kept as the weights at the burn-in's last update
    last_burn = (update_after // every) * every
    assert all(
        torch.equal(ema.average(n, slot="theta0"), theta[last_burn][i]) for i, n in enumerate(names)
    )


@pytest.mark.parametrize(("k", "every"), [(3, 1), (4, 2)])
def test_ema_with_lawa_reads_the_mean_of_the_latest_checkpoints(k, every):
    model = mlp().double()
    ema, theta = weights_seen(
        model, 17, every, lambda m: polyak.EMA(m, rule=LAWA(k), update_every=every)
    )
    expected, _ = lawa_reference(theta, every, k)
    assert ema.slots == tuple(f"lawa{j}" for j in range(k))
    assert_close([ema.average(n) for n in ema.names()], expected[17], rel=1e-13)
    with ema.swapped():
        params = dict(model.named_parameters())
        assert_close([params[n].detach() for n in ema.names()], expected[17], rel=1e-13)
    state = ema.state_dict()
    fresh = polyak.EMA(mlp().double(), rule=LAWA(k), update_every=every)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.average(n), ema.average(n)) for n in ema.names())


# ------------------------------------------------------------------ SwitchEMA through polyak.EMA


def switch_rule_reference(theta0, grad, lr, decay, steps, every, update_every):
    """Li et al. 2024 with polyak's steps, in float64: SGD θ ← θ - lr ∇L(θ) at every step n; at
    the averaging steps n = k, 2k, ... (k = update_every) the EMA s ← D s + (1 - D) θ with
    D = d(n-k+1) ⋯ d(n); the first averaging step at or after each multiple of ``every`` then
    switches, θ ← s. Returns (θ, s) after each step."""
    theta, ema = theta0.clone(), theta0.clone()
    pending = every  # the next multiple of every not switched at yet
    out = []
    for n in range(1, steps + 1):
        theta = theta - lr * grad(theta, n)
        if n % update_every == 0:
            d = 1.0
            for m in range(n - update_every + 1, n + 1):
                d *= float(decay(m))
            ema = d * ema + (1 - d) * theta
            if n >= pending:
                theta = ema.clone()
                pending = (n // every + 1) * every
        out.append((theta, ema))
    return out


def quadratic_grad(theta, n):
    target = torch.linspace(-1, 1, theta.numel(), dtype=torch.float64)
    return (theta - target) * (1 + 0.1 * math.sin(n))


@pytest.mark.parametrize(
    ("decay", "every", "update_every"),
    [
        (0.8, 7, 1),
        (0.7, 6, 3),  # update_every divides every: switches at 6, 12, ...
        (0.7, 5, 2),  # it does not: at the first averaging step at or after 5, 10, ...
        (schedules.tf_warmup(0.9), 4, 4),
        (0.9, 1, 1),  # a switch at every step: θ follows the EMA
    ],
)
def test_switch_ema_follows_the_float64_reference(decay, every, update_every):
    model = nn.Linear(6, 1, bias=False).double()
    theta0 = model.weight.detach().clone().reshape(-1)
    ema = polyak.EMA(model, rule=SwitchEMA(decay, every=every), update_every=update_every)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    schedule = decay if callable(decay) else (lambda m: decay)
    expected = switch_rule_reference(theta0, quadratic_grad, 0.3, schedule, 40, every, update_every)
    switched = 0
    for n in range(1, 41):
        opt.zero_grad()
        model.weight.grad = quadratic_grad(model.weight.detach().reshape(-1), n).reshape(1, 6)
        opt.step()
        before = model.weight.detach().clone()
        ema.update()
        theta, s = expected[n - 1]
        torch.testing.assert_close(model.weight.detach().reshape(-1), theta, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(ema.average("weight").reshape(-1), s, rtol=1e-13, atol=1e-14)
        switched += not torch.equal(model.weight.detach(), before)
    last = 40 // update_every * update_every  # one switch per multiple of every up to it
    assert switched == last // every


def test_switch_ema_switches_by_hand():
    rule = SwitchEMA(0.9, every=4)
    assert [rule.switches(n, n) for n in range(1, 10)] == [False] * 3 + [True] + [False] * 3 + [
        True,
        False,
    ]
    assert [rule.switches(n - 2, n) for n in (3, 6, 9, 12, 15)] == [False, True, True, True, False]
    assert rule.weights(3, 4) == (1.0 - 0.9 * 0.9,)  # Exponential's weights
    assert isinstance(rule, polyak.averagers.Exponential) and rule.slots == ("ema",)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("every", "update_every"), [(1, 1), (4, 1), (4, 3), (6, 3), (5, 5)])
def test_switch_ema_switches_on_the_device_where_it_does_on_the_host(every, update_every, device):
    rule = SwitchEMA(0.9, every=every)
    ops = DeviceOps(torch.arange(update_every - 1, -1, -1, device=device))
    for n in range(update_every, 60, update_every):
        last = torch.tensor(n, device=device)
        got = rule.switches(last - (update_every - 1), last, ops)
        assert got.dtype == torch.bool and bool(got) == rule.switches(n - update_every + 1, n)


def bf16_sgd(model, steps, each, seed=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    for n in range(1, steps + 1):
        loss = model(torch.randn(8, 5, generator=gen).bfloat16()).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        each(n)


def test_switch_ema_rounds_the_fp32_average_into_bf16_weights():
    """bf16 weights, fp32 shadows: a plain EMA fed the same weights (updated first) has the same
    shadows bit for bit; at a switch the weights are the shadows rounded to bf16, and the shadows
    keep their fp32 bits; the shadows follow the float64 EMA of the weights the update saw."""
    model = mlp().bfloat16()
    observer = polyak.EMA(model, 0.9, update_every=2)
    ema = polyak.EMA(model, rule=SwitchEMA(0.9, every=4), update_every=2)
    names = ema.names()
    exact = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    d = 0.9 * 0.9

    def each(n):
        seen = {k: p.detach().clone() for k, p in model.named_parameters()}
        observer.update()
        ema.update()
        params = dict(model.named_parameters())
        if n % 2 == 0:
            for k in names:
                exact[k] = d * exact[k] + (1 - d) * seen[k].double()
        for k in names:
            shadow = ema.average(k)
            assert shadow.dtype == torch.float32 and params[k].dtype == torch.bfloat16
            assert torch.equal(shadow, observer.average(k)), (n, k)
            torch.testing.assert_close(shadow.double(), exact[k], rtol=1e-5, atol=1e-6)
            if n % 4 == 0:
                assert torch.equal(params[k].detach(), shadow.bfloat16()), (n, k)
                assert not torch.equal(params[k].detach(), seen[k]), (n, k)
            else:
                assert torch.equal(params[k].detach(), seen[k]), (n, k)

    bf16_sgd(model, 12, each)


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def bn_sgd(model, steps, each, seed=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for n in range(1, steps + 1):
        loss = model(torch.randn(8, 5, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        each(n)


@pytest.mark.parametrize("buffers", ["average", "copy", "none"])
@pytest.mark.parametrize(("every", "update_every"), [(4, 1), (5, 2)])
def test_switch_ema_is_copy_to_at_the_switch_steps(buffers, every, update_every):
    """Each buffer policy: the rule's write-back is, bit for bit, a plain EMA's ``copy_to()`` at
    the reference's switch steps (averaged BatchNorm statistics written with ``"average"``, none
    changed with ``"copy"`` and ``"none"``), and the model trains on from there alike."""
    by_rule, by_hand = bn_net(), bn_net()
    ema = polyak.EMA(
        by_rule, rule=SwitchEMA(0.8, every=every), buffers=buffers, update_every=update_every
    )
    hand = polyak.EMA(by_hand, 0.8, buffers=buffers, update_every=update_every)
    pending = [every]
    stats_written = []

    def rule_step(n):
        running = by_rule[1].running_mean.clone()
        ema.update()
        written = not torch.equal(by_rule[1].running_mean, running)
        stats_written.append(written)
        if written:
            assert torch.equal(by_rule[1].running_mean, ema.average("1.running_mean"))

    def hand_step(n):
        hand.update()
        if n % update_every == 0 and n >= pending[0]:
            hand.copy_to()
            pending[0] = (n // every + 1) * every

    bn_sgd(by_rule, 13, rule_step)
    bn_sgd(by_hand, 13, hand_step)
    got, want = by_rule.state_dict(), by_hand.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want), buffers
    assert all(torch.equal(ema.average(n), hand.average(n)) for n in hand.names())
    assert any(stats_written) == (buffers == "average")
    assert int(by_rule[1].num_batches_tracked) == 13  # the copied counter is never rewound
    # the switches moved the weights (an equality that cannot pass by accident)
    plain = bn_net()
    bn_sgd(plain, 13, lambda n: None)
    assert not torch.equal(plain[0].weight, by_rule[0].weight)


@pytest.mark.parametrize("gate", ["host", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_capturable_switch_ema_equals_the_eager_one(monkeypatch, no_host_reads, gate, dtype):
    """The switch decided on the device, the write-back gated there: the same weights and
    shadows, bit for bit, as the host path; no tensor read on the host (the CPU plays the device
    with ``device``, its tensors cut into chunks)."""
    if gate == "device":
        monkeypatch.setattr(_foreach, "HOST_GATE_DEVICES", frozenset())
        monkeypatch.setitem(_foreach.CHUNK_ELEMENTS, "cpu", 8)
    m1, m2 = mlp().to(dtype), mlp().to(dtype)
    rule = {"decay": schedules.tf_warmup(0.9), "every": 5}
    eager = polyak.EMA(m1, rule=SwitchEMA(**rule), update_every=2)
    captured = polyak.EMA(m2, rule=SwitchEMA(**rule), update_every=2, capturable=True)

    def check(n):
        if n == 1 or gate == "host":  # the first update plans the gated copy's scratch
            captured.update()
        else:
            with no_host_reads():
                captured.update()
        for (k, p), q in zip(m1.named_parameters(), m2.parameters(), strict=True):
            assert torch.equal(p, q), (n, k)
            assert torch.equal(eager.average(k), captured.average(k)), (n, k)

    gen = torch.Generator().manual_seed(3)
    o1, o2 = torch.optim.SGD(m1.parameters(), lr=0.1), torch.optim.SGD(m2.parameters(), lr=0.1)
    for n in range(1, 15):
        x = torch.randn(8, 5, generator=gen).to(dtype)
        for model, opt in ((m1, o1), (m2, o2)):
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()
        eager.update()
        check(n)
    assert captured.step == 14
    plain = mlp().to(dtype)  # the switches moved the weights
    assert not torch.equal(plain[0].weight, m1[0].weight)


@pytest.mark.parametrize("capturable", [False, True])
def test_switch_ema_resumes_exactly(capturable):
    """Saved between switches (update_every 3, every 4: switches at 6, 9, 12, 18), loaded into a
    fresh model and EMA: the run goes on bit for bit as the uninterrupted one."""
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(8, 5, generator=gen) for _ in range(20)]

    def make(seed=0):
        model = mlp(seed)
        kwargs = {"update_every": 3, "capturable": capturable}
        return model, polyak.EMA(model, rule=SwitchEMA(0.8, every=4), **kwargs)

    def train(model, ema, xs):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x in xs:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            ema.update()

    straight, straight_ema = make()
    train(straight, straight_ema, batches)
    first, first_ema = make()
    train(first, first_ema, batches[:10])
    saved = copy.deepcopy({"model": first.state_dict(), "ema": first_ema.state_dict()})
    resumed, resumed_ema = make(seed=5)
    resumed.load_state_dict(saved["model"])
    resumed_ema.load_state_dict(saved["ema"])
    train(resumed, resumed_ema, batches[10:])
    assert resumed_ema.step == 20
    for (k, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), k
        assert torch.equal(straight_ema.average(k), resumed_ema.average(k)), k


def test_switch_ema_settings_as_data():
    model = mlp()
    ema = polyak.EMA(model, rule=SwitchEMA(0.9, every=3))
    assert repr(ema).startswith("EMA(rule=SwitchEMA(decay=Constant(decay=0.9), every=3), step=0")
    ema.schedule = schedules.constant(0.5)  # the decay changes; the rule keeps switching
    assert isinstance(ema.rule, SwitchEMA) and ema.rule.every == 3 and ema.schedule(1) == 0.5
    state = ema.state_dict()
    assert state["rule"] == {
        "type": "SwitchEMA",
        "settings": {"decay": {"name": "constant", "decay": 0.5}, "every": 3},
        "state": {},
        "slots": ["ema"],
    }
    other = polyak.EMA(mlp(), rule=SwitchEMA(0.5, every=7))
    with pytest.warns(LoadedSettingsWarning, match=r"SwitchEMA.every 3 replaces 7"):
        other.load_state_dict(state)
    assert other.rule.every == 3 and other._write_back is not None
    with pytest.raises(ValueError, match=r"'Exponential' here"):
        polyak.EMA(mlp(), 0.5).load_state_dict(state)
    assert polyak.EMA(mlp(), 0.5)._write_back is None  # a plain EMA never writes back


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, r"an int >= 1, got every=0; e.g. SwitchEMA\(0.999, every=steps_per_epoch"),
        ({"every": 2.5}, r"got every=2.5"),
        ({"every": True}, r"got every=True"),
        ({"every": 3, "decay": 1.5}, r"decay"),
    ],
)
def test_switch_ema_refuses_bad_settings(kwargs, match):
    kwargs.setdefault("decay", 0.9)
    with pytest.raises(ValueError, match=match):
        SwitchEMA(**kwargs)


def test_a_rule_that_switches_must_read_one_of_its_slots():
    class SwitchedBEMA(BEMA):
        def switches(self, first, last, ops=HOST):
            return True

    with pytest.raises(TypeError, match=r"its read of '0.weight' is not one of its slots"):
        polyak.EMA(mlp(), rule=SwitchedBEMA())


def test_offloaded_switch_ema_equals_the_inline_one():
    """offload="cpu" (the update on a worker thread, slowed down here): the write-back waits for
    it, and writes the finished average."""
    import time

    m1, m2 = bn_net(), bn_net()
    inline = polyak.EMA(m1, rule=SwitchEMA(0.8, every=3))
    offloaded = polyak.EMA(m2, rule=SwitchEMA(0.8, every=3), offload="cpu")
    engine = offloaded._engine
    update = engine._host_update

    def slow(*args):
        time.sleep(0.02)
        update(*args)

    engine._host_update = slow
    bn_sgd(m1, 10, lambda n: inline.update())
    bn_sgd(m2, 10, lambda n: offloaded.update())
    got, want = m2.state_dict(), m1.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(offloaded.average(n), inline.average(n)) for n in inline.names())


# ------------------------------------------------------------------ slots off the device


OFFLOADED = {
    "lawa": lambda: LAWA(3),
    "bema": lambda: BEMA(update_after=3),
    "uniform": lambda: Uniform(start=4),
}


@pytest.mark.parametrize("name", list(OFFLOADED))
def test_offloaded_slots_equal_the_slots_beside_the_weights(name):
    """offload="cpu": every slot in host memory, updated on the offload worker from staged
    weights, bit for bit the slots an EMA keeps beside the weights (on the CPU both are host
    memory: this runs the offload engine's path, not a device-to-host copy; see the CUDA test)."""
    every = 2
    model = mlp().double()
    inline, theta = weights_seen(
        model, 15, every, lambda m: polyak.EMA(m, rule=OFFLOADED[name](), update_every=every)
    )
    replay = mlp().double()
    offloaded, theta_again = weights_seen(
        replay,
        15,
        every,
        lambda m: polyak.EMA(m, rule=OFFLOADED[name](), update_every=every, offload="cpu"),
    )
    assert offloaded._engine.policy == "offload"
    assert all(  # the same weights trained on
        torch.equal(a, b)
        for s, t in zip(theta, theta_again, strict=True)
        for a, b in zip(s, t, strict=True)
    )
    for n in inline.names():
        for slot in inline.slots:
            assert torch.equal(offloaded.average(n, slot=slot), inline.average(n, slot=slot))
        assert torch.equal(offloaded.average(n), inline.average(n))
    if name == "lawa":  # and the float64 mean of the latest 3 checkpoints
        expected, _ = lawa_reference(theta, every, 3)
        assert_close([offloaded.average(n) for n in offloaded.names()], expected[15], rel=1e-13)


@needs_cuda
@pytest.mark.parametrize("name", list(OFFLOADED))
def test_cuda_weights_with_slots_in_pinned_host_memory(name):
    """Weights on the GPU, every slot in pinned host memory: the same slots, bit for bit, as the
    slots kept on the GPU (LAWA's weights are 0 and 1: copies, exact on any device), the rule's
    read works across the devices (BEMA reads the weights too), and swapped() evaluates it."""
    every = 2
    models = [mlp().double().cuda(), mlp().double().cuda()]
    emas = [
        polyak.EMA(models[0], rule=OFFLOADED[name](), update_every=every),
        polyak.EMA(models[1], rule=OFFLOADED[name](), update_every=every, offload="cpu"),
    ]
    for model, ema in zip(models, emas, strict=True):
        sgd_cuda(model, 9, ema.update)
    on_gpu, off = emas
    for n in on_gpu.names():
        for slot in on_gpu.slots:
            shadow = off.average(n, slot=slot)
            assert shadow.device.type == "cpu" and shadow.is_pinned()
            reference = on_gpu.average(n, slot=slot).cpu()
            if name == "lawa":
                assert torch.equal(shadow, reference), (n, slot)
            else:
                torch.testing.assert_close(shadow, reference, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(off.average(n).cuda(), on_gpu.average(n), rtol=1e-12, atol=1e-13)
    x = torch.randn(4, 5, dtype=torch.float64, device="cuda")
    with on_gpu.swapped(), off.swapped(), torch.no_grad():
        torch.testing.assert_close(models[1](x), models[0](x), rtol=1e-12, atol=1e-13)


@needs_cuda
@pytest.mark.parametrize("mode", [{"offload": "cpu"}, {"stream": "side"}, {"capturable": True}])
def test_cuda_switch_ema_equals_the_inline_one(mode):
    models = [mlp().cuda(), mlp().cuda()]
    emas = [
        polyak.EMA(models[0], rule=SwitchEMA(0.8, every=3)),
        polyak.EMA(models[1], rule=SwitchEMA(0.8, every=3), **mode),
    ]
    for model, ema in zip(models, emas, strict=True):
        sgd_cuda(model, 10, ema.update)
    for (k, p), q in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            emas[1].average(k).cuda(), emas[0].average(k), rtol=1e-6, atol=1e-7
        )
    assert not torch.equal(mlp().cuda()[0].weight, models[0][0].weight)


def sgd_cuda(model, steps, hook, seed=1):
    dtype = next(model.parameters()).dtype
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=gen).to("cuda", dtype)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        hook()


def test_a_deep_copy_switches_its_own_model():
    """copy.deepcopy of a model holding its SwitchEMA: the copy's EMA writes into the copied
    weights, never into the original's."""
    model = mlp()
    model.ema = polyak.EMA(model, rule=SwitchEMA(0.5, every=2))
    twin = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sgd(twin, 4, twin.ema.update)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, twin.ema.average(n)) for n, p in twin.named_parameters())
    assert not torch.equal(twin[0].weight, before["0.weight"])
