"""polyak.EMA's contract where the rest of the suite let wrong behaviour through (issue 13, §8).

Each test checks one promise of the public API against an independent reference (a closed form
worked out by hand, a float64 computation, the documented formula) so that breaking the promise
fails it: the seed of stochastic rounding, the BatchNorm checks after averaging updates 10, 100 and
every 1000th, ``EMA.decay`` with ``update_every``, what ``save()`` writes, ``bind_to_mode`` on a
model already in eval mode, ``EMA.to()``, the offload wait, and schedules round-tripping through
``state_dict()``.
"""

from __future__ import annotations

import math
import threading
import warnings
from concurrent.futures import Future

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import polyak
from polyak import _kernels, schedules
from polyak._kernels._reference import ReferenceUpdate
from polyak.bn import StaleBatchNormWarning

CUDA = torch.cuda.is_available()


def bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def sgd_steps(model: nn.Module, ema: polyak.EMA, steps: int, seed: int = 1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 3, generator=gen)).square().mean().backward()
        opt.step()
        ema.update()


# ---------------------------------------------------------------- schedules, by hand


def test_tf_warmup_with_update_every_hand_computed():
    """tf_warmup(0.99), update_every=2, float64: the decays of the two averaging updates are
    d(1) d(2) = 2/11 * 3/12 = 1/22 and d(3) d(4) = 4/13 * 5/14 = 10/91."""
    param = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ema = polyak.EMA([("w", param)], decay=schedules.tf_warmup(0.99), update_every=2)
    assert ema.decay == pytest.approx(1 / 22, rel=1e-15)
    with torch.no_grad():
        param.fill_(22.0)
    ema.update()
    assert torch.equal(ema.average("w"), torch.zeros(2, dtype=torch.float64))  # call 1: no average
    assert ema.decay == pytest.approx(1 / 22, rel=1e-15)  # the next average still covers 1..2
    ema.update()
    # s = 1/22 * 0 + 21/22 * 22 = 21
    torch.testing.assert_close(ema.average("w"), torch.full((2,), 21.0, dtype=torch.float64))
    assert ema.decay == pytest.approx(10 / 91, rel=1e-15)
    with torch.no_grad():
        param.fill_(91.0)
    ema.update()
    ema.update()
    # s = 10/91 * 21 + 81/91 * 91 = 210/91 + 81
    expected = torch.full((2,), 210 / 91 + 81, dtype=torch.float64)
    torch.testing.assert_close(ema.average("w"), expected, rtol=1e-15, atol=0)
    assert ema.num_averages == 2


def test_decay_is_the_product_over_the_steps_update_every_covers():
    """``EMA.decay``: d ** k for a constant; for a schedule, the product over the k covered steps."""
    constant = polyak.EMA([("w", torch.zeros(1))], decay=0.5, update_every=3)
    assert constant.decay == 0.125
    constant.update()
    assert constant.decay == 0.125
    power = polyak.EMA([("w", torch.zeros(1))], decay=schedules.power(gamma=1), update_every=2)
    # (1 - 1/n)^2 over steps 1, 2 is 0; over steps 3, 4: (2/3)^2 (3/4)^2 = 1/4
    assert power.decay == 0.0
    power.update()
    power.update()
    assert power.decay == pytest.approx(1 / 4, rel=1e-15)
    power.update()  # step 3: the next average still covers 3..4
    assert power.decay == pytest.approx(1 / 4, rel=1e-15)


# The documented formula of each schedule (DESIGN.md, schedules' docstrings), written out here
# independently of the implementation, for the property test below.
FORMULAS = [
    (schedules.constant(0.8), lambda n: 0.8),
    (schedules.tf_warmup(0.99), lambda n: min(0.99, (1 + n) / (10 + n))),
    (
        schedules.inverse_gamma(inv_gamma=1.0, power=0.75, max_decay=0.999),
        lambda n: min(max(1 - (1 + n) ** -0.75, 0.0), 0.999),
    ),
    (schedules.power(gamma=6.94), lambda n: (1 - 1 / n) ** 7.94),
    (schedules.half_life(steps=3), lambda n: 2 ** (-1 / 3)),
    (
        schedules.scaled(schedules.tf_warmup(0.9), kappa=2),
        lambda n: min(0.9, (1 + n) / (10 + n)) ** 2,
    ),
]


@settings(max_examples=40, deadline=None)
@given(
    case=st.sampled_from(range(len(FORMULAS))),
    every=st.integers(1, 4),
    calls=st.integers(1, 20),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    kernel=st.sampled_from(["reference", "foreach"]),
    seed=st.integers(0, 2**16),
)
def test_schedules_and_update_every_match_the_documented_formulas(
    case, every, calls, dtype, kernel, seed
):
    """Supersedes test_ema.py::test_schedules_and_update_every_match_float64, whose expected
    decays were computed by calling the schedule under test."""
    schedule, formula = FORMULAS[case]
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(3, generator=gen).to(dtype)
    param = nn.Parameter(theta.clone())
    ema = polyak.EMA([("w", param)], decay=schedule, update_every=every, kernel=kernel)
    expected = theta.double()
    for call in range(1, calls + 1):
        theta = torch.randn(3, generator=gen).to(dtype)
        param.data.copy_(theta)
        ema.update()
        if call % every == 0:
            d = math.prod(formula(n) for n in range(call - every + 1, call + 1))
            expected = d * expected + (1 - d) * theta.double()
    atol = 1e-13 if dtype == torch.float64 else 2e-6 * calls
    torch.testing.assert_close(ema.average("w").double(), expected, rtol=0, atol=atol)


# ---------------------------------------------------------------- stochastic rounding


def sr_ema(
    seed: int, kernel: str = "reference", n: int = 10_000
) -> tuple[polyak.EMA, nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    start = (torch.rand(n, generator=gen) + 1).bfloat16().float()  # representable in bf16
    param = nn.Parameter(start.clone())
    ema = polyak.EMA(
        [("w", param)],
        decay=0.99,
        shadow_dtype=torch.bfloat16,
        rounding="stochastic",
        seed=seed,
        kernel=kernel,
    )
    with torch.no_grad():
        param.add_(1e-3)  # each update moves the average by 1e-5, far below bf16's 2**-7 ulp
    return ema, param


def test_stochastic_rounding_seed_chooses_the_bits():
    """The same seed gives the same bits; another seed other bits (the global RNG plays no part)."""
    runs = []
    for seed in (1, 1, 2):
        ema, _ = sr_ema(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 100)  # a different global RNG state every run
            for _ in range(3):
                ema.update()
        runs.append(ema.average("w").clone())
    assert torch.equal(runs[0].view(torch.int16), runs[1].view(torch.int16))
    moved = (runs[0] != sr_ema(1)[0].average("w")).double().mean().item()
    differ = (runs[0].view(torch.int16) != runs[2].view(torch.int16)).double().mean().item()
    # each update moves the fp32 value by ~1/800 of a bf16 ulp, so ~0.4% of the elements round up
    # in 3 updates (0.34% here), and independent streams pick different ones (0.69% differ)
    assert moved > 1e-3 and differ > 1e-3


@pytest.mark.parametrize("kernel", ["reference", "auto"])
def test_stochastic_rounding_is_unbiased_where_nearest_stalls(kernel):
    """bf16 shadows, updates of 1e-5 each: the mean over 65,536 elements follows the float64 EMA,
    while round-to-nearest never leaves the start."""
    n, steps, decay = 1 << 16, 100, 0.99
    gen = torch.Generator().manual_seed(3)
    start = (torch.rand(n, generator=gen) + 1).bfloat16().float()
    target = start + 2.0**-9  # a quarter of bf16's ulp in [1, 2): nearest rounding never moves
    sr_param, rn_param = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    options = {"decay": decay, "shadow_dtype": torch.bfloat16}
    sr = polyak.EMA([("w", sr_param)], rounding="stochastic", seed=7, kernel=kernel, **options)
    rn = polyak.EMA([("w", rn_param)], **options)
    with torch.no_grad():
        sr_param.copy_(target)
        rn_param.copy_(target)
    for _ in range(steps):
        sr.update()
        rn.update()
    exact = target.double() + (start.double() - target.double()) * decay**steps
    drift = (exact - start.double()).mean().item()  # 2**-9 (1 - 0.99**100) = 1.2e-3
    bias = (sr.average("w").double() - exact).mean().item()
    # an element is one of the two bf16 neighbours (2**-7 apart) of a value near exact: its
    # spread is at most 2**-8, the mean's at most 1.5e-5, so 5% of the drift is 4 of those
    assert abs(bias) < 0.05 * drift
    assert torch.equal(rn.average("w").float(), start)  # stalled


# ---------------------------------------------------------------- BatchNorm checks


def bn_checks(stale_from: int, until: int, update_every: int = 1) -> list[int]:
    """Averaging updates at which a StaleBatchNormWarning fired, for a model whose BatchNorm sees
    a training-mode forward at every step before averaging update ``stale_from`` and none after."""
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    ema = polyak.EMA(model, decay=0.9, update_every=update_every)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    warned = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while ema.num_averages < until:
            if ema.num_averages + 1 < stale_from:
                model(x)  # train mode: the running statistics move
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3)  # an optimizer step
            before = len(caught)
            ema.update()
            if any(issubclass(w.category, StaleBatchNormWarning) for w in caught[before:]):
                warned.append(ema.num_averages)
    return warned


@pytest.mark.parametrize(
    ("stale_from", "until", "expected"),
    [(2, 12, [10]), (11, 150, [100]), (101, 1200, [1000]), (1001, 2100, [2000])],
    ids=["at-10", "at-100", "at-1000", "at-2000"],
)
def test_stale_batchnorm_is_found_at_updates_10_100_and_every_1000th(stale_from, until, expected):
    """Checks run after averaging updates 1, 10, 100 and every 1000th: statistics that stop
    moving after one check are reported at the next, and not in between."""
    assert bn_checks(stale_from, until) == expected


def test_stale_batchnorm_checks_count_averaging_updates():
    """With update_every=3 the check after averaging update 10 runs at the 30th update() call."""
    assert bn_checks(2, 12, update_every=3) == [10]


# ---------------------------------------------------------------- save()


def test_save_writes_the_step_into_its_metadata(tmp_path):
    from safetensors import safe_open

    model = bn_net()
    ema = polyak.EMA(model, decay=0.9, update_every=2)
    sgd_steps(model, ema, 7)  # 7 update() calls, 3 averaging updates
    ema.save(tmp_path / "a.safetensors")
    pairs = polyak.EMA([("w", torch.zeros(2))])
    for _ in range(5):
        pairs.update()
    pairs.save(tmp_path / "b.safetensors")
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata()["polyak.step"] == "7"
    with safe_open(tmp_path / "b.safetensors", "pt") as f:
        assert f.metadata()["polyak.step"] == "5"


def test_save_dtype_casts_untracked_floating_tensors_too(tmp_path):
    """Frozen parameters and (with buffers='none') BatchNorm statistics are not tracked: the file
    takes them from the live model, cast to ``dtype=`` like the averages; integers stay integers."""
    from safetensors.torch import load_file

    model = bn_net()
    model[0].bias.requires_grad_(False)
    ema = polyak.EMA(model, decay=0.5, buffers="none")
    sgd_steps(model, ema, 3)
    ema.save(tmp_path / "half.safetensors", dtype=torch.float16)
    saved = load_file(tmp_path / "half.safetensors")
    assert sorted(saved) == sorted(model.state_dict())
    live = model.state_dict()
    for key, tensor in saved.items():
        if live[key].is_floating_point():
            assert tensor.dtype == torch.float16, key
            source = ema.average(key) if ema.average(key) is not None else live[key]
            assert torch.equal(tensor, source.to(torch.float16)), key
        else:
            assert tensor.dtype == live[key].dtype and torch.equal(tensor, live[key]), key
    assert ema.average("0.bias") is None and ema.average("1.running_mean") is None


# ---------------------------------------------------------------- bind_to_mode, to()


def test_bind_to_mode_on_a_model_in_eval_mode_swaps_at_once():
    model = bn_net()
    ema = polyak.EMA(model, decay=0.5)
    sgd_steps(model, ema, 3)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not torch.equal(trained["0.weight"], ema.average("0.weight"))
    model.eval()
    ema.bind_to_mode(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, ema.average(name)), name
    model.train()
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name]), name


def test_to_meta_moves_every_shadow():
    ema = polyak.EMA(bn_net(), decay=0.5, kernel="reference")
    shapes = {n: (ema.average(n).shape, ema.average(n).dtype) for n in ema.names()}
    assert ema.to(torch.device("meta")) is ema
    for name in ema.names():
        shadow = ema.average(name)
        assert shadow.device.type == "meta", name
        assert (shadow.shape, shadow.dtype) == shapes[name], name


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (runs on the GPU machine)")
def test_to_moves_the_shadows_to_the_device_and_back():
    torch.manual_seed(0)  # no buffers: Module.cuda() replaces buffer objects (issue 13, item 2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    ema = polyak.EMA(model, decay=0.5)
    sgd_steps(model, ema, 2)
    before = {n: ema.average(n).clone() for n in ema.names()}
    model.cuda()
    assert ema.to(torch.device("cuda")) is ema
    assert all(ema.average(n).is_cuda for n in ema.names())
    assert all(torch.equal(ema.average(n).cpu(), before[n]) for n in ema.names())
    ema.update()  # the plan follows the shadows
    model.cpu()
    ema.to("cpu")
    assert all(ema.average(n).device.type == "cpu" for n in ema.names())


# ---------------------------------------------------------------- offload


class _BlockedUntilWaitedFor(ReferenceUpdate):
    """The reference kernel, whose offloaded lerp cannot run until someone waits for its result:
    an update is in flight for as long as the test wants, without any timing."""

    release = threading.Event()

    def lerp_(self, weight):
        assert self.release.wait(timeout=60), "nobody waited for the offloaded update"
        super().lerp_(weight)


@pytest.fixture
def blocked_offload(monkeypatch):
    _BlockedUntilWaitedFor.release = threading.Event()
    monkeypatch.setitem(_kernels.KERNELS, "reference", _BlockedUntilWaitedFor)
    result = Future.result

    def waiting(self, timeout=None):
        _BlockedUntilWaitedFor.release.set()
        return result(self, timeout)

    monkeypatch.setattr(Future, "result", waiting)
    yield
    _BlockedUntilWaitedFor.release.set()  # never leave the worker blocked


def test_offload_reads_wait_for_the_update_in_flight(blocked_offload):
    """Supersedes the race in test_ema_modes.py::test_offload_to_cpu_equals_inline: the worker
    cannot finish an update until a read waits for it, so a read that does not wait sees the old
    average every time."""
    param = nn.Parameter(torch.zeros(4))
    ema = polyak.EMA([("w", param)], decay=0.5, offload="cpu", kernel="reference")
    with torch.no_grad():
        param.fill_(8.0)
    ema.update()  # in flight, blocked
    assert torch.equal(ema.average("w"), torch.full((4,), 4.0))
    with torch.no_grad():
        param.fill_(0.0)
    ema.update()
    assert torch.equal(ema.state_dict()["shadows"]["ema"]["w"], torch.full((4,), 2.0))


def test_offload_next_update_waits_for_the_previous(blocked_offload):
    """Supersedes test_ema_modes.py::test_offload_bounded_staleness: the second update must wait
    for the first before it stages new weights, or the first would average the second's."""
    param = nn.Parameter(torch.zeros(4))
    ema = polyak.EMA([("w", param)], decay=0.5, offload="cpu", kernel="reference")
    for value in (1.0, 2.0):
        with torch.no_grad():
            param.fill_(value)
        ema.update()
    # 0 -> 0.5 -> 1.25; had the first update read the second's weights: 0 -> 1 -> 1.5
    assert torch.equal(ema.average("w"), torch.full((4,), 1.25))


# ---------------------------------------------------------------- state dict


def test_scaled_user_callable_round_trips_through_the_state_dict():
    """scaled(my_fn) cannot be stored: loading keeps the schedule the EMA was built with (the
    callable passed again) and resumes exactly, instead of raising TypeError."""
    fn = lambda n: 1 - 1 / (n + 1)  # noqa: E731
    schedule = schedules.scaled(fn, kappa=2)
    model = bn_net()
    ema = polyak.EMA(model, decay=schedule)
    sgd_steps(model, ema, 3)
    state = ema.state_dict()
    assert state["rule"]["settings"]["decay"]["name"] == "callable"
    twin = bn_net()
    twin.load_state_dict(model.state_dict())
    other = polyak.EMA(twin, decay=schedule)
    other.load_state_dict(state)
    assert other.schedule is schedule and other.step == 3
    # step 4 covers (1 - 1/5) ** 2 = 0.64
    assert other.decay == pytest.approx(0.64, rel=1e-15) and ema.decay == other.decay
    sgd_steps(model, ema, 2, seed=5)
    sgd_steps(twin, other, 2, seed=5)
    for name in ema.names():
        assert torch.equal(ema.average(name), other.average(name)), name
