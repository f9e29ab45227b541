"""nonfinite=: NaN and Inf never reach the averages, and nobody has to sync to keep them out.

References: ``"skip"`` with a constant decay must give, bit for bit, the averages of the same run
with the non-finite updates removed (for every kernel that runs on the CPU, both ways of deciding:
on the host and on the "device", the CPU playing one, and capturable); ``"raise"`` must keep the
averages of the update before the first non-finite one, whatever came after, and name the tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import polyak
from polyak import errors
from polyak._kernels import _foreach
from polyak._kernels._foreach import ForeachUpdate
from polyak._kernels._reference import ReferenceUpdate

DECAY = 0.75
# the weights are set by hand, no forward runs: BatchNorm statistics are "stale" by design
pytestmark = pytest.mark.filterwarnings("ignore::polyak.bn.StaleBatchNormWarning")


def net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    return model.to(dtype)


def set_weights(model: nn.Module, t: int, poison: dict[str, float] | None = None) -> None:
    """The weights of step ``t`` (a function of t alone), ``poison``: name -> a value put into
    element 0 of that tensor (NaN, Inf, -Inf)."""
    gen = torch.Generator().manual_seed(1000 + t)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen).to(tensor.dtype))
            if poison and name in poison:
                tensor.view(-1)[0] = poison[name]


def averages(ema: polyak.EMA) -> dict[str, torch.Tensor]:
    return {n: ema.average(n).clone() for n in ema.names()}


def assert_bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(
            a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)
        ), name


def run(
    bad: dict[int, dict[str, float]],
    *,
    drop: bool,
    steps: int = 8,
    model_dtype: torch.dtype = torch.float32,
    **options,
) -> polyak.EMA:
    """``steps`` updates; at step t in ``bad`` the weights are poisoned (``drop=False``) or the
    update is not made at all (``drop=True``: the reference run)."""
    model = net(model_dtype)
    set_weights(model, 0)
    if "rule" not in options:
        options["decay"] = DECAY
    ema = polyak.EMA(model, **options)
    for t in range(1, steps + 1):
        if t in bad and drop:
            continue
        set_weights(model, t, bad.get(t))
        ema.update()
    return ema


BAD = {
    2: {"0.weight": math.nan},
    3: {"2.bias": math.inf},
    5: {"1.running_var": -math.inf, "0.bias": math.nan},
    8: {"2.weight": math.nan},
}


@pytest.fixture(params=["host", "device"])
def mode(request, monkeypatch):
    """How the flag is decided: read on the host (the CPU's way), or on the device (CUDA's way:
    the CPU plays the device)."""
    if request.param == "device":
        monkeypatch.setattr(_foreach, "HOST_GATE_DEVICES", frozenset())
    return request.param


@pytest.mark.parametrize("kernel", ["reference", "foreach"])
@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_skip_equals_the_run_without_those_updates(mode, kernel, buffers):
    skipped = run(BAD, drop=False, kernel=kernel, buffers=buffers, nonfinite="skip")
    reference = run(BAD, drop=True, kernel=kernel, buffers=buffers, nonfinite="ignore")
    assert_bits_equal(averages(skipped), averages(reference))
    assert skipped.skipped_steps == len(BAD)
    assert skipped.step == 8 and reference.step == 8 - len(BAD)  # step counts every call
    assert all(torch.isfinite(t).all() for t in averages(skipped).values())


@pytest.mark.slow
def test_skip_equals_the_run_without_those_updates_fused(mode):
    skipped = run(BAD, drop=False, kernel="fused", nonfinite="skip")
    reference = run(BAD, drop=True, kernel="fused", nonfinite="ignore")
    assert_bits_equal(averages(skipped), averages(reference))
    assert skipped.skipped_steps == len(BAD)


def test_skip_with_bf16_weights_and_several_slots(mode):
    from polyak import averagers

    def rule():
        return averagers.Exponentials((0.5, 0.875), names=("fast", "slow"))

    skipped = run(BAD, drop=False, model_dtype=torch.bfloat16, rule=rule(), nonfinite="skip")
    reference = run(BAD, drop=True, model_dtype=torch.bfloat16, rule=rule(), nonfinite="ignore")
    for slot in ("fast", "slow"):
        for name in skipped.names():
            a, b = skipped.average(name, slot=slot), reference.average(name, slot=slot)
            assert torch.equal(a, b), (slot, name)


def test_skip_on_the_offload_worker():
    skipped = run(BAD, drop=False, offload="cpu", nonfinite="skip")
    reference = run(BAD, drop=True, offload="cpu", nonfinite="ignore")
    assert_bits_equal(averages(skipped), averages(reference))


def test_skip_capturable():
    """Capturable: decided on the device (no host read), combined with the off-step gate."""
    skipped = run(BAD, drop=False, capturable=True, nonfinite="skip")
    reference = run(BAD, drop=True, capturable=True, nonfinite="ignore")
    assert_bits_equal(averages(skipped), averages(reference))
    assert skipped.skipped_steps == len(BAD)


def test_skip_capturable_matches_host_skip_with_update_every():
    """update_every=2: host and capturable skip the same updates (the poisoned even steps); a
    call that does not average (odd steps) is no reason to skip, its weights reach no shadow."""
    host = run(BAD, drop=False, update_every=2, nonfinite="skip")
    assert host.skipped_steps == sum(t % 2 == 0 for t in BAD)
    device = run(BAD, drop=False, update_every=2, capturable=True, nonfinite="skip")
    assert device.skipped_steps == host.skipped_steps
    for name in host.names():
        torch.testing.assert_close(host.average(name), device.average(name))


# ---------------------------------------------------------------- raise


@pytest.mark.parametrize("kernel", ["reference", "foreach"])
def test_raise_keeps_the_averages_before_the_first_bad_update(mode, kernel, tmp_path):
    ema = run(BAD, drop=False, kernel=kernel, nonfinite="raise")
    # the run up to step 1, the last before the first poisoned update (step 2)
    before = run({}, drop=False, steps=1, kernel=kernel, nonfinite="ignore")
    assert_bits_equal(averages(ema), averages(before))
    assert ema.step == 8 and ema.skipped_steps == 7  # step 2 and every update since
    with pytest.raises(
        errors.NonFiniteError, match=r"at step 2 found NaN or Inf in '0\.weight'"
    ) as e:
        ema.state_dict()
    assert e.value.names == ["0.weight"] and e.value.step == 2
    assert isinstance(e.value, FloatingPointError) and isinstance(e.value, errors.PolyakError)
    # every reading point raises, and changes nothing
    model = ema.model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for read in (
        lambda: ema.swapped().__enter__(),
        ema.use_averages,
        ema.copy_to,
        ema.averaged_module,
        ema.export_state_dict,
        lambda: ema.save(tmp_path / "x.safetensors"),
        lambda: ema.save_state(tmp_path / "x.state"),
    ):
        with pytest.raises(errors.NonFiniteError):
            read()
    assert not list(tmp_path.iterdir())
    assert_bits_equal(dict(model.state_dict()), weights)  # the model holds its own (NaN) weights
    assert_bits_equal(averages(ema), averages(before))


def test_raise_names_every_tensor_in_the_emas_order():
    """In ``ema.names()`` order: the model's parameters, then its buffers."""
    ema = run(
        {4: {"2.weight": math.inf, "0.bias": math.nan, "1.running_mean": -math.inf}},
        drop=False,
        nonfinite="raise",
    )
    with pytest.raises(errors.NonFiniteError) as e:
        ema.state_dict()
    assert e.value.names == ["0.bias", "2.weight", "1.running_mean"] and e.value.step == 4
    assert "'0.bias' (and 2 more: ['2.weight', '1.running_mean'])" in str(e.value)


def test_clear_and_load_average_on():
    ema = run(BAD, drop=False, nonfinite="raise")
    kept = averages(ema)
    ema.clear_nonfinite()
    ema.state_dict()  # no longer raises
    set_weights(ema.model, 100)
    ema.update()
    moved = averages(ema)
    assert not torch.equal(moved["0.weight"], kept["0.weight"])
    # a load replaces the kept averages and clears the flag
    other = run(BAD, drop=False, nonfinite="raise")
    other.load_state_dict(ema.state_dict())
    assert other.state_dict()["step"] == ema.step


# ---------------------------------------------------------------- detect (the default)


def test_detect_raises_where_the_averages_are_read_and_writes_nothing(tmp_path):
    """The default: updates go unchecked; every reading point finds the NaN/Inf in the shadows,
    names the tensors in the EMA's order, and neither writes a file nor touches the model."""
    ema = run({3: {"2.weight": math.inf, "0.bias": math.nan}}, drop=False)
    assert ema.skipped_steps == 0  # nothing was skipped: the averages took the NaN/Inf
    assert torch.isnan(ema.average("0.bias")).view(-1)[0]
    with pytest.raises(errors.NonFiniteError, match=r"averages of '0\.bias' \(and 1 more") as e:
        ema.state_dict()
    assert e.value.names == ["0.bias", "2.weight"] and e.value.step is None
    model = ema.model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for read in (
        lambda: ema.swapped().__enter__(),
        ema.use_averages,
        ema.copy_to,
        ema.averaged_module,
        ema.export_state_dict,
        lambda: ema.save(tmp_path / "x.safetensors"),
        lambda: ema.save_state(tmp_path / "x.state"),
    ):
        with pytest.raises(errors.NonFiniteError, match="load a checkpoint"):
            read()
    assert not list(tmp_path.iterdir())
    assert_bits_equal(dict(model.state_dict()), weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_detect_finds_inf_in_any_slot_and_dtype(dtype):
    """bf16 weights (fp32 shadows) and bf16 shadows, two slots, an Inf in one tensor: found;
    a clean run of the same EMA reads without error."""
    rule = lambda: polyak.averagers.Exponentials((0.5, 0.9))  # noqa: E731
    clean = run({}, drop=False, model_dtype=torch.bfloat16, rule=rule(), shadow_dtype=dtype)
    clean.state_dict()
    bad = run(
        {5: {"1.running_var": -math.inf}},
        drop=False,
        model_dtype=torch.bfloat16,
        rule=rule(),
        shadow_dtype=dtype,
    )
    with pytest.raises(errors.NonFiniteError) as e:
        bad.copy_to()
    assert e.value.names == ["1.running_var"]


def test_detect_costs_no_check_per_update(monkeypatch, no_host_reads):
    """Under the default an update runs no norm, reads nothing on the host, and the check runs
    only where the averages are read."""
    model = net()
    ema = polyak.EMA(model, decay=DECAY)
    norms = []
    real = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda *a, **k: norms.append(1) or real(*a, **k))
    with no_host_reads():
        for t in range(1, 4):
            set_weights(model, t)
            ema.update()
    assert norms == []
    ema.state_dict()
    assert norms  # the read point checked


def test_detect_clears_with_a_load():
    ema = run(BAD, drop=False)
    good = run({}, drop=False, nonfinite="ignore")
    ema.load_state_dict(good.state_dict())
    assert_bits_equal(averages(ema), averages(good))
    ema.state_dict()  # the loaded averages are finite: no error


def test_ignore_lets_nan_through():
    ema = run({2: {"0.weight": math.nan}}, drop=False, nonfinite="ignore")
    assert torch.isnan(ema.average("0.weight")).view(-1)[0]
    assert ema.skipped_steps == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_huge_finite_weights_are_not_skipped(mode, dtype):
    """Finite values whose squares overflow (the CPU's 2-norm) are settled exactly: averaged."""
    big = {torch.float32: 3e38, torch.bfloat16: 3e38, torch.float64: 1e300}[dtype]
    model = nn.Linear(4, 4).to(dtype)
    ema = polyak.EMA(model, decay=0.5, nonfinite="skip")
    with torch.no_grad():
        model.weight.fill_(big)
    ema.update()
    assert ema.skipped_steps == 0
    assert torch.isfinite(ema.average("weight")).all()
    assert ema.average("weight").max() > big / 4


def test_bad_policy_is_refused():
    with pytest.raises(
        ValueError, match=r"nonfinite must be one of \('detect', 'raise', 'skip', 'ignore'\)"
    ):
        polyak.EMA(net(), nonfinite="warn")


def test_one_device_is_required_to_decide():
    pairs = [("a", torch.zeros(2)), ("b", torch.zeros(2, device="meta"))]
    with pytest.raises(ValueError, match=r"tracked tensors are on \['cpu', 'meta'\].*'ignore'"):
        polyak.EMA(pairs, nonfinite="raise")
    polyak.EMA(pairs, nonfinite="ignore")
    polyak.EMA(pairs)  # "detect" checks the shadows where they are read, per device


def test_repr_names_a_policy_other_than_the_default():
    assert "nonfinite" not in repr(polyak.EMA(net()))
    assert "nonfinite='skip'" in repr(polyak.EMA(net(), nonfinite="skip"))


def test_the_state_follows_the_ema_to_a_device():
    ema = run(BAD, drop=False, nonfinite="skip")
    ema.to("cpu")
    assert ema.skipped_steps == len(BAD)


# ---------------------------------------------------------------- gated copies (the kernels)


def _copy_pairs():
    shadows = [
        torch.tensor([1.0, math.nan, -0.0]),
        torch.tensor([3, 4], dtype=torch.int64),
        torch.tensor([True, False]),
        torch.tensor([1.5, 2.5], dtype=torch.bfloat16),
        torch.tensor([7.0], dtype=torch.float64),
    ]
    sources = [
        torch.tensor([math.inf, 2.0, 0.0]),
        torch.tensor([5, -6], dtype=torch.int64),
        torch.tensor([False, True]),
        torch.tensor([0.5, -1.0], dtype=torch.bfloat16),
        torch.tensor([8.0], dtype=torch.float32),  # another dtype: the where path
    ]
    return shadows, sources


@pytest.mark.parametrize("kernel", [ForeachUpdate, ReferenceUpdate])
@pytest.mark.parametrize("gate", [True, False])
def test_gated_copies_keep_or_take_every_bit(mode, kernel, gate):
    shadows, sources = _copy_pairs()
    before = [s.clone() for s in shadows]
    update = kernel([shadows], sources)
    update.copy_(torch.tensor(gate))
    for shadow, old, source in zip(shadows, before, sources, strict=True):
        expected = old if gate else source.to(old.dtype)
        assert torch.equal(shadow.view(torch.uint8), expected.view(torch.uint8)), shadow


def test_gated_copy_follows_a_moved_source(monkeypatch):
    monkeypatch.setattr(_foreach, "HOST_GATE_DEVICES", frozenset())
    shadow, source = torch.zeros(3), torch.ones(3)
    update = ForeachUpdate([[shadow]], [source])
    update.copy_(torch.tensor(False))
    source.data = torch.full((3,), 2.0)  # a new storage
    update.copy_(torch.tensor(False))
    assert torch.equal(shadow, torch.full((3,), 2.0))


def test_raise_ignores_nan_on_a_call_that_does_not_average():
    """Capturable, update_every=2: a NaN only on odd calls reaches no shadow, so nothing trips."""
    odd = {3: {"0.weight": math.nan}, 5: {"2.bias": math.inf}}
    ema = run(odd, drop=False, update_every=2, capturable=True, nonfinite="raise")
    clean = run({}, drop=False, update_every=2, capturable=True)
    ema.state_dict()  # does not raise
    assert ema.skipped_steps == 0
    assert_bits_equal(averages(ema), averages(clean))
