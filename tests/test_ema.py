"""polyak.EMA against independent references: float64 closed forms, seed 001, bit-exact runs."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import polyak
from polyak import schedules
from polyak.ema import LoadedSettingsWarning

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KERNELS = ["reference", "foreach"]


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )


def train_steps(model, opt, ema, steps, *, seed=123, swap_every=0):
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x = torch.randn(8, 3, 4, 4, generator=gen)
        y = torch.randint(0, 5, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        if swap_every and (i + 1) % swap_every == 0:
            model.eval()
            with ema.swapped(), torch.no_grad():
                model(torch.ones(8, 3, 4, 4))  # not from `gen`: the data stream stays the same
            model.train()


# ---------------------------------------------------------------- the closed form (acceptance 2)


def float64_reference(thetas: list[torch.Tensor], decays: list[float]) -> torch.Tensor:
    """s_N = prod(d) θ0 + Σ_i (1 - d_i) prod_{j>i} d_j θ_i, in float64, from the formula."""
    n = len(decays)
    total = math.prod(decays) * thetas[0].double()
    for i in range(1, n + 1):
        tail = math.prod(decays[i:])
        total = total + (1 - decays[i - 1]) * tail * thetas[i].double()
    return total


@settings(max_examples=60, deadline=None)
@given(
    decay=st.floats(0.0, 1.0),
    n=st.integers(1, 30),
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPES),
    kernel=st.sampled_from(KERNELS),
    seed=st.integers(0, 2**16),
)
def test_constant_decay_matches_float64_closed_form(decay, n, shape, dtype, kernel, seed):
    gen = torch.Generator().manual_seed(seed)
    thetas = [torch.randn(shape, generator=gen).to(dtype) for _ in range(n + 1)]
    param = nn.Parameter(thetas[0].clone())
    ema = polyak.EMA([("w", param)], decay=decay, kernel=kernel)
    for theta in thetas[1:]:
        param.data.copy_(theta)
        ema.update()
    # the closed form of the issue: λ^N θ0 + (1−λ) Σ_{i<N} λ^i θ_{N−i}
    closed = decay**n * thetas[0].double() + (1 - decay) * sum(
        decay**i * thetas[n - i].double() for i in range(n)
    )
    shadow = ema.average("w")
    assert shadow.dtype == torch.float32  # fp32 shadows for every param dtype here
    scale = max(1.0, max(t.abs().max().item() for t in thetas))
    torch.testing.assert_close(shadow.double(), closed, rtol=0, atol=4e-7 * n * scale)


SCHEDULES = [
    schedules.tf_warmup(0.99),
    schedules.inverse_gamma(inv_gamma=1.0, power=0.75, max_decay=0.999),
    schedules.power(sigma_rel=0.1),
    schedules.half_life(steps=3),
    schedules.scaled(schedules.tf_warmup(0.9), kappa=2),
    lambda step: 0.5 + 0.4 * math.sin(step) ** 2,  # any callable step -> decay
]


def test_first_update_sees_step_one():
    seen = []
    ema = polyak.EMA([("w", torch.zeros(2))], decay=lambda s: seen.append(s) or 0.5)
    ema.update()
    ema.update()
    assert seen == [1, 2] and ema.step == 2 and isinstance(ema.step, int)


def test_decay_edges_zero_and_one():
    w = torch.tensor([1.0, -2.0])
    frozen = polyak.EMA([("w", w)], decay=1.0)
    follow = polyak.EMA([("w", w)], decay=0.0)
    w.copy_(torch.tensor([5.0, 7.0]))
    frozen.update()
    follow.update()
    assert torch.equal(frozen.average("w"), torch.tensor([1.0, -2.0]))
    assert torch.equal(follow.average("w"), torch.tensor([5.0, 7.0]))


def test_huge_step_counts_stay_ints():
    ema = polyak.EMA([("w", torch.ones(1))], decay=schedules.tf_warmup(0.999))
    ema.step = 2**62
    ema.update()
    assert ema.step == 2**62 + 1 and isinstance(ema.step, int)
    assert ema.decay == pytest.approx(0.999)


# ---------------------------------------------------------------- low precision (acceptance 7)


def test_bf16_weights_get_fp32_shadows_that_track_slow_drift():
    param = nn.Parameter(torch.tensor([1.0], dtype=torch.bfloat16))
    ema = polyak.EMA([("w", param)], decay=0.999)
    bf16_ema = polyak.EMA([("w", param)], decay=0.999, shadow_dtype=torch.bfloat16)
    param.data.fill_(1.5)
    for _ in range(10):
        ema.update()
        bf16_ema.update()
    assert ema.average("w").dtype == torch.float32
    assert abs(ema.average("w").item() - 1.0049775598951258) < 1e-5
    assert bf16_ema.average("w").item() == 1.0  # the stall fp32 shadows avoid


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_shadow_dtype_defaults(dtype):
    model = nn.Linear(3, 3).to(dtype)
    ema = polyak.EMA(model)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert ema.average("weight").dtype == expected


# ---------------------------------------------------------------- tracking


def test_tracks_params_and_buffers_by_policy():
    model = small_net()
    model[0].bias.requires_grad_(False)  # frozen: no shadow
    ema = polyak.EMA(model)
    assert ema.average("0.bias") is None
    assert ema.average("1.running_mean") is not None
    assert ema.average("1.num_batches_tracked").dtype == torch.int64  # copied, not averaged
    assert "1.num_batches_tracked" in polyak.EMA(model, buffers="copy").names()
    assert polyak.EMA(model, buffers="none").average("1.running_mean") is None
    only_weights = polyak.EMA(model, include=lambda name, t: name.endswith("weight"))
    assert all(n.endswith("weight") for n in only_weights.names())


def test_integer_buffers_are_copied_never_averaged():
    model = small_net()
    ema = polyak.EMA(model, decay=0.9)
    model(torch.randn(4, 3, 4, 4))  # train-mode forward: num_batches_tracked -> 1
    model(torch.randn(4, 3, 4, 4))
    ema.update()
    assert ema.average("1.num_batches_tracked").item() == 2


def test_average_tracks_floating_buffers():
    model = small_net()
    ema = polyak.EMA(model, decay=0.5)
    before = model[1].running_mean.clone()
    model(torch.randn(4, 3, 4, 4))
    ema.update()
    expected = 0.5 * before + 0.5 * model[1].running_mean
    torch.testing.assert_close(ema.average("1.running_mean"), expected)


def test_ema_is_not_a_module_and_stays_out_of_state_dict():
    model = small_net()
    keys = set(model.state_dict())
    model.ema = polyak.EMA(model)
    assert not isinstance(model.ema, nn.Module)
    assert set(model.state_dict()) == keys


def test_unwraps_compile_and_data_parallel():
    model = small_net()
    names = polyak.EMA(model).names()
    assert polyak.EMA(torch.compile(model)).names() == names
    assert polyak.EMA(nn.DataParallel(model)).names() == names


def test_unwraps_ddp(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = small_net()
        ema = polyak.EMA(nn.parallel.DistributedDataParallel(model))
        assert ema.names() == polyak.EMA(model).names()
        assert ema.model is model
    finally:
        dist.destroy_process_group()


def test_shadows_start_from_weights_and_are_independent_copies():
    model = small_net()
    ema = polyak.EMA(model)
    for name, p in model.named_parameters():
        assert torch.equal(ema.average(name), p)
        assert ema.average(name).data_ptr() != p.data_ptr()


def test_repr_says_what_is_tracked():
    text = repr(polyak.EMA(small_net(), decay=schedules.tf_warmup(0.99), kernel="reference"))
    assert "TFWarmup" in text and "kernel='reference'" in text and "averaged=" in text
    assert "copied=1" in text


# ---------------------------------------------------------------- swapped (acceptance 3)


def test_swapped_is_zero_copy_and_restores_bit_exactly():
    model = small_net()
    ema = polyak.EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, opt, ema, 3)
    originals = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    with ema.swapped():
        for name, p in model.named_parameters():
            assert p.data_ptr() == ema.average(name).data_ptr()  # swapped, not copied
            assert torch.equal(p, ema.average(name))
    for name, p in model.named_parameters():
        assert p.data_ptr() == originals[name][0]
        assert torch.equal(p, originals[name][1])


def test_swapped_restores_after_exception():
    model = small_net()
    ema = polyak.EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, opt, ema, 2)
    saved = copy.deepcopy(model.state_dict())
    with pytest.raises(KeyError), ema.swapped():
        raise KeyError("boom")
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key])
    ema.update()  # usable again


def test_swapped_casts_for_low_precision_and_restores():
    model = small_net().to(torch.bfloat16)
    ema = polyak.EMA(model, decay=0.5)
    model[0].weight.data.add_(1)
    ema.update()
    before = model[0].weight.detach().clone()
    with ema.swapped():
        assert model[0].weight.dtype == torch.bfloat16
        assert torch.equal(model[0].weight, ema.average("0.weight").to(torch.bfloat16))
    assert torch.equal(model[0].weight, before)


def test_evaluating_inside_swapped_changes_nothing_in_training():
    run_a, run_b = small_net(1), small_net(1)
    ema_a, ema_b = polyak.EMA(run_a, decay=0.9), polyak.EMA(run_b, decay=0.9)
    opt_a = torch.optim.Adam(run_a.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(run_b.parameters(), lr=1e-2)
    train_steps(run_a, opt_a, ema_a, 12, swap_every=0)
    train_steps(run_b, opt_b, ema_b, 12, swap_every=3)
    for (ka, va), (kb, vb) in zip(
        run_a.state_dict().items(), run_b.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb), ka
    for name in ema_a.names():
        assert torch.equal(ema_a.average(name), ema_b.average(name)), name
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for idx in sa:
        for key in sa[idx]:
            assert torch.equal(torch.as_tensor(sa[idx][key]), torch.as_tensor(sb[idx][key]))


def test_nested_swapped_and_update_inside_raise():
    model = small_net()
    ema = polyak.EMA(model)
    state = ema.state_dict()
    with ema.swapped():
        with pytest.raises(RuntimeError, match="cannot load a state dict"):
            ema.load_state_dict(state)
        with pytest.raises(RuntimeError, match="nested use is not supported"), ema.swapped():
            pass
        with pytest.raises(RuntimeError, match="average the averages with themselves"):
            ema.update()
    ema.update()


@pytest.mark.filterwarnings("ignore::polyak.bn.StaleBatchNormWarning")  # weights moved by hand
def test_functional_call_uses_averages_and_touches_nothing():
    model = small_net().eval()
    ema = polyak.EMA(model, decay=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    ema.update()  # decay 0: averages == current weights
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.5)  # live weights now differ from the averages
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 4, 4)
    with ema.swapped(), torch.no_grad():
        expected = model(x)
    assert torch.equal(ema.functional_call(x), expected)
    with torch.no_grad():
        assert not torch.equal(model(x), expected)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("buffers", ["average", "none"])
def test_functional_call_in_train_mode_writes_no_statistics(buffers):
    """A BatchNorm layer in train mode writes its running statistics in place: into copies, never
    into the averaged statistics (or, with buffers="none", the model's own)."""
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = polyak.EMA(model, decay=0.5, buffers=buffers)
    train_steps(model, opt, ema, 3)
    assert model.training
    averages = {n: ema.average(n).clone() for n in ema.names()}
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(8, 3, 4, 4) * 3 + 2
    out = ema.functional_call(x)
    for name, value in averages.items():
        assert torch.equal(ema.average(name), value), name
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # and it did run in train mode (batch statistics), with the averaged weights
    model.eval()
    with ema.swapped(), torch.no_grad():
        assert not torch.allclose(model(x), out)
    model.train()
    with ema.swapped(), torch.no_grad():
        torch.testing.assert_close(model(x), out)


# ---------------------------------------------------------------- seed 001 (acceptance 4)


def test_seed001_store_copy_store_restore_is_lossless():
    model = small_net()
    ema = polyak.EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_steps(model, opt, ema, 4)
    trained = copy.deepcopy(model.state_dict())
    ema.store()
    ema.copy_to()
    assert torch.equal(model[0].weight, ema.average("0.weight"))
    ema.store()  # switching to test mode twice must not overwrite the backup
    ema.copy_to()
    ema.restore()
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_restore_without_store_raises():
    ema = polyak.EMA(small_net())
    with pytest.raises(RuntimeError, match=r"call ema.store\(\) before"):
        ema.restore()


def test_update_between_store_and_restore_raises():
    ema = polyak.EMA(small_net())
    ema.store()
    with pytest.raises(RuntimeError, match="between ema.store"):
        ema.update()
    ema.restore()
    ema.update()


def test_use_averages_and_use_trained_are_idempotent():
    model = small_net()
    ema = polyak.EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_steps(model, opt, ema, 3)
    trained = model[0].weight.detach().clone()
    ema.use_trained()  # already trained: no-op
    ema.use_averages()
    ema.use_averages()  # no-op, and the backup is intact
    assert torch.equal(model[0].weight, ema.average("0.weight"))
    ema.use_trained()
    ema.use_trained()
    assert torch.equal(model[0].weight, trained)


def test_bind_to_mode_switches_with_train_and_eval():
    model = small_net()
    ema = polyak.EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_steps(model, opt, ema, 3)
    trained = model[0].weight.detach().clone()
    handle = ema.bind_to_mode(model)
    model.eval()
    assert torch.equal(model[0].weight, ema.average("0.weight"))
    model.eval()  # twice: still the averages, backups intact
    with pytest.raises(RuntimeError):
        ema.update()
    model.train()
    assert torch.equal(model[0].weight, trained)
    assert model.training and model[1].training
    train_steps(model, opt, ema, 1)
    current = model[0].weight.detach().clone()
    copy_of_model = ema.averaged_module()  # deep copies are never bound
    copy_of_model.train()
    copy_of_model.eval()  # were it bound, this would swap averages into `model`
    assert torch.equal(model[0].weight, current)
    ema.update()
    handle.remove()
    model.eval()
    assert not torch.equal(model[0].weight, ema.average("0.weight"))


def test_deepcopy_of_a_bound_model_is_unbound_and_works():
    model = small_net()
    ema = polyak.EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_steps(model, opt, ema, 2)
    ema.bind_to_mode(model)
    trained = model[0].weight.detach().clone()
    clone = copy.deepcopy(model)
    clone.eval()  # was: TypeError: 'NoneType' object is not callable
    assert not clone.training and not clone[1].training
    assert torch.equal(clone[0].weight, trained)  # the copy is not bound: no averages swapped in
    assert torch.equal(model[0].weight, trained) and model.training  # the original untouched
    model.eval()  # the original stays bound
    assert torch.equal(model[0].weight, ema.average("0.weight"))
    model.train()


def test_deepcopy_of_a_model_holding_its_ema_copies_both():
    model = small_net()
    model.ema = polyak.EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_steps(model, opt, model.ema, 2)
    clone = copy.deepcopy(model)
    assert clone.ema is not model.ema and clone.ema.step == 2
    for name in model.ema.names():
        assert torch.equal(clone.ema.average(name), model.ema.average(name))
    with torch.no_grad():
        clone[0].weight.fill_(1.0)
    before = clone.ema.average("0.weight").clone()
    original = model.ema.average("0.weight").clone()
    clone.ema.update()  # averages the copy's weights, not the original's
    torch.testing.assert_close(clone.ema.average("0.weight"), 0.5 * before + 0.5)
    assert torch.equal(model.ema.average("0.weight"), original)


def test_pickling_an_ema_says_what_to_save_instead(tmp_path):
    model = small_net()
    ema = polyak.EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_steps(model, opt, ema, 2)
    ema.bind_to_mode(model)
    torch.save(model, tmp_path / "bound.pt")  # a bound model pickles (unbound)
    loaded = torch.load(tmp_path / "bound.pt", weights_only=False)
    loaded.eval()
    assert torch.equal(loaded[0].weight, model[0].weight)
    model.ema = ema
    with pytest.raises(TypeError, match=r"cannot be pickled.*ema\.state_dict\(\)"):
        torch.save(model, tmp_path / "with_ema.pt")


def test_optimizer_step_into_swapped_averages_is_refused():
    model = small_net()
    ema = polyak.EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_steps(model, opt, ema, 2)
    averages = {n: ema.average(n).clone() for n in ema.names()}
    other = nn.Linear(2, 2)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.5)
    other(torch.ones(1, 2)).sum().backward()
    model.eval()  # a train-mode forward would write the averaged statistics: not this test
    with ema.swapped():
        nn.functional.cross_entropy(
            model(torch.randn(8, 3, 4, 4)), torch.zeros(8).long()
        ).backward()
        with pytest.raises(RuntimeError, match=r"optimizer.step\(\) while the model holds"):
            opt.step()
        other_opt.step()  # another model's optimizer is not concerned
    for name, value in averages.items():
        assert torch.equal(ema.average(name), value), name
    opt.step()  # after the block the guard is gone
    model.train()
    ema.bind_to_mode(model)
    model.eval()
    with pytest.raises(RuntimeError, match=r"model.train\(\) before stepping"):
        opt.step()
    model.train()
    opt.step()


# ---------------------------------------------------------------- resume (acceptance 5)


@pytest.mark.parametrize(
    "decay",
    [0.9, *SCHEDULES[:5]],
    ids=["constant", "tf_warmup", "inverse_gamma", "power", "half_life", "scaled"],
)
@pytest.mark.parametrize("kernel", KERNELS)
def test_resume_is_bit_exact(tmp_path, decay, kernel):
    def fresh():
        model = small_net(7)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, opt = fresh()
    ema = polyak.EMA(model, decay=decay, update_every=2, kernel=kernel)
    train_steps(model, opt, ema, 5, seed=1)
    polyak.io.save_state(
        {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()},
        tmp_path / "ckpt.pt",
    )
    train_steps(model, opt, ema, 6, seed=2)

    model2, opt2 = fresh()
    ema2 = polyak.EMA(model2, decay=0.5, update_every=2, kernel=kernel)  # decay comes from state
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    with pytest.warns(LoadedSettingsWarning, match=r"replaces Constant\(decay=0.5\)"):
        ema2.load_state_dict(ckpt["ema"])
    train_steps(model2, opt2, ema2, 6, seed=2)

    assert ema2.step == ema.step == 11 and ema2.num_averages == ema.num_averages == 5
    for name in ema.names():
        assert torch.equal(ema.average(name), ema2.average(name)), name


# ---------------------------------------------------------------- export (acceptance 6)


def test_save_loads_into_plain_model_strict(tmp_path):
    from safetensors.torch import load_file

    model = small_net()
    model[0].bias.requires_grad_(False)  # frozen: exported from the live model
    ema = polyak.EMA(model, decay=0.5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    train_steps(model, opt, ema, 3)
    ema.save(tmp_path / "ema.safetensors")
    plain = small_net(99)
    plain.load_state_dict(load_file(tmp_path / "ema.safetensors"), strict=True)
    for name, p in plain.named_parameters():
        expected = ema.average(name) if ema.average(name) is not None else model.get_parameter(name)
        assert torch.equal(p, expected), name
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed away


def test_save_keeps_model_dtype_unless_overridden(tmp_path):
    from safetensors.torch import load_file

    model = small_net().to(torch.bfloat16)
    ema = polyak.EMA(model)
    ema.save(tmp_path / "a.safetensors")
    ema.save(tmp_path / "b.safetensors", dtype=torch.float32)
    assert load_file(tmp_path / "a.safetensors")["0.weight"].dtype == torch.bfloat16
    b = load_file(tmp_path / "b.safetensors")
    assert b["0.weight"].dtype == torch.float32
    assert b["1.num_batches_tracked"].dtype == torch.int64


def test_save_of_pairs_honours_dtype(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    w = torch.full((2, 3), 1 / 3, dtype=torch.bfloat16)
    ema = polyak.EMA([("w", w)], decay=0.5)
    ema.step = 4
    ema.save(tmp_path / "a.safetensors")
    ema.save(tmp_path / "b.safetensors", dtype=torch.float16)
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a["w"].dtype == torch.bfloat16 and torch.equal(a["w"], w)  # the tensor's dtype
    assert b["w"].dtype == torch.float16
    assert torch.equal(b["w"], torch.full((2, 3), 1 / 3, dtype=torch.bfloat16).half())
    with safe_open(tmp_path / "b.safetensors", framework="pt") as f:
        assert f.metadata()["polyak.step"] == "4"


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.mid(self.emb(idx)))


def test_tied_weights_written_once_and_retied(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_model

    torch.manual_seed(0)
    model = Tied()
    ema = polyak.EMA(model, decay=0.5)
    with torch.no_grad():
        model.emb.weight.add_(1)
    ema.update()
    ema.save(tmp_path / "tied.safetensors")
    with safe_open(tmp_path / "tied.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["emb.weight", "mid.bias", "mid.weight"]
    fresh = Tied()
    polyak.io.load_averaged(fresh, tmp_path / "tied.safetensors")
    assert fresh.head.weight is fresh.emb.weight
    assert torch.equal(fresh.emb.weight, ema.average("emb.weight"))
    other = Tied()
    load_model(other, tmp_path / "tied.safetensors", strict=True)  # safetensors' own loader
    assert torch.equal(other.head.weight, ema.average("emb.weight"))


def test_averaged_module_matches_swapped_outputs():
    model = small_net()
    ema = polyak.EMA(model, decay=0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_steps(model, opt, ema, 4)
    x = torch.randn(3, 3, 4, 4)
    averaged = ema.averaged_module()
    assert not averaged.training
    model.eval()
    with ema.swapped(), torch.no_grad():
        expected = model(x)
    with torch.no_grad():
        assert torch.equal(averaged(x), expected)
    assert averaged[0].weight.data_ptr() != ema.average("0.weight").data_ptr()


# ---------------------------------------------------------------- bad input (acceptance 8)


@pytest.mark.parametrize("decay", [1.5, -0.5, float("nan")])
def test_decay_out_of_range(decay):
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\], got decay="):
        polyak.EMA(small_net(), decay=decay)


def test_decay_wrong_type():
    with pytest.raises(TypeError, match="decay must be a float in"):
        polyak.EMA(small_net(), decay="0.9")


def test_schedule_returning_nonsense_raises_at_update():
    ema = polyak.EMA(small_net(), decay=lambda step: 1.5)
    with pytest.raises(ValueError, match=r"returned 1.5 at step 1"):
        ema.update()


def test_integer_tensor_to_average():
    with pytest.raises(TypeError, match="cannot average 'count': it is a int64 tensor"):
        polyak.EMA([("count", torch.zeros(3, dtype=torch.long))])


def test_bare_parameters_are_named_by_position():
    """torch_ema's habit, EMA(model.parameters()): names "0", "1", ... in order; frozen ones keep
    their number, so the names do not shift when a layer is frozen."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].bias.requires_grad_(False)
    start = model[1].weight.detach().clone()
    ema = polyak.EMA(model.parameters(), decay=0.5)
    assert ema.names() == ["0", "2", "3"]
    with torch.no_grad():
        model[1].weight.fill_(4.0)
    ema.update()
    assert ema.average("2") is not None
    torch.testing.assert_close(ema.average("2"), 0.5 * start + 0.5 * 4.0, rtol=0, atol=0)


def test_mixed_or_foreign_items_rejected_without_printing_tensors():
    with pytest.raises(TypeError, match=r"not a mix of them.*item 1 is a Tensor paired with int"):
        polyak.EMA([torch.zeros(3), (5, torch.zeros(2))])
    with pytest.raises(TypeError, match=r"item 1 is a Tensor"):
        polyak.EMA([("a", torch.zeros(3)), torch.full((1000,), 7.0)])
    with pytest.raises(TypeError) as info:
        polyak.EMA([("a", torch.zeros(3)), torch.full((1000,), 7.0)])
    assert "7." not in str(info.value)  # names types, never prints a tensor's values
    with pytest.raises(TypeError, match="an nn.Module, an iterable"):
        polyak.EMA(torch.zeros(3))


def test_swapped_into_another_model():
    ema = polyak.EMA(small_net())
    other = nn.Sequential(nn.Linear(2, 2))
    with (
        pytest.raises(ValueError, match="built on another model: missing names"),
        ema.swapped(other),
    ):
        pass
    wider = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(96, 5)
    )
    with pytest.raises(ValueError, match=r"0.weight: model \(6, 3, 3, 3\) vs average"):
        ema.copy_to(wider)


def test_same_architecture_other_instance_is_fine():
    model, twin = small_net(0), small_net(5)
    ema = polyak.EMA(model)
    ema.copy_to(twin)
    assert torch.equal(twin[0].weight, model[0].weight)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"buffers": "mean"}, ValueError, "buffers must be one of"),
        ({"update_every": 0}, ValueError, "update_every must be a positive int"),
        ({"shadow_dtype": torch.int32}, TypeError, "shadow_dtype must be a floating"),
        ({"kernel": "turbo"}, ValueError, "unknown kernel 'turbo'"),
        ({"include": "weight"}, TypeError, "include must be a predicate"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        polyak.EMA(small_net(), **kwargs)


def test_nothing_to_track():
    with pytest.raises(ValueError, match="no tensor to track"):
        polyak.EMA(small_net(), include=lambda n, t: False)


def test_model_helpers_need_a_model():
    ema = polyak.EMA([("w", torch.zeros(2))])
    with pytest.raises(ValueError, match="build it as polyak.EMA"):
        ema.averaged_module()


# ---------------------------------------------------------------- no host sync


@pytest.mark.parametrize("nonfinite", ["raise", "skip", "ignore"])
def test_update_never_reads_tensors_on_the_host(monkeypatch, no_host_reads, nonfinite):
    """The CPU plays the device: its gates are read on the device path, as on CUDA (a CPU gate
    is otherwise read on the host, which costs no sync there)."""
    from polyak._kernels import _foreach

    monkeypatch.setattr(_foreach, "HOST_GATE_DEVICES", frozenset())
    model = small_net().to(torch.bfloat16)
    ema = polyak.EMA(model, decay=schedules.tf_warmup(0.99), update_every=2, nonfinite=nonfinite)
    ema.update()
    with no_host_reads():
        for _ in range(4):
            ema.update()
    assert ema.step == 5


def test_import_is_lean():
    import subprocess
    import sys

    code = (
        "import sys, polyak; "
        "bad = [m for m in ('lightning', 'transformers', 'matplotlib', 'polyak.tf', 'polyak.demo') "
        "if m in sys.modules]; "
        "import torch; assert not torch.cuda.is_initialized(); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- BatchNorm (seed 004)


def test_update_warns_once_when_bn_statistics_never_move():
    from polyak.bn import StaleBatchNormWarning

    model = small_net()
    ema = polyak.EMA(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()  # the bug: training in eval mode, running statistics stay at their init
    with pytest.warns(StaleBatchNormWarning, match=r"\(1\).*eval mode"):
        train_steps(model, opt, ema, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, opt, ema, 12)  # warned once per layer, not again at step 10


def test_correct_training_loop_never_warns():
    model = small_net()
    ema = polyak.EMA(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, opt, ema, 11, swap_every=5)


def test_buffers_none_warns_when_evaluating_with_stale_statistics():
    from polyak.bn import StaleBatchNormWarning

    model = small_net()
    ema = polyak.EMA(model, buffers="none")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, opt, ema, 2)
    with pytest.warns(StaleBatchNormWarning, match="buffers='none'"), ema.swapped():
        pass


def test_stale_bn_check_runs_with_update_every():
    from polyak.bn import StaleBatchNormWarning

    model = small_net()
    ema = polyak.EMA(model, update_every=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()
    with pytest.warns(StaleBatchNormWarning):
        train_steps(model, opt, ema, 3)  # the first averaging update is the 3rd call
