"""The hand-written Triton kernel against the reference path.

On a machine without CUDA these run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here
before the kernels are decorated); with CUDA they run the compiled kernel on the GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton is not installed (no wheel for this platform)")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    """Without CUDA, run every kernel in Triton's interpreter; restore the environment after."""
    if CUDA:
        yield
        return
    import importlib
    import sys

    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    # triton.jit picks compiled or interpreted at decoration: re-decorate if imported already
    if "polyak._kernels._triton" in sys.modules:
        importlib.reload(sys.modules["polyak._kernels._triton"])
        sys.modules["polyak._kernels"].KERNELS["triton"] = None
    yield
    if before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = before


import polyak  # noqa: E402
from polyak import _kernels  # noqa: E402
from tests.test_kernels import DTYPE_PAIRS, make, update_ulp  # noqa: E402


def on_device(tensors):
    """The tensors on the test device (the same objects on the CPU)."""
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize(("src", "dst"), [*DTYPE_PAIRS, (torch.float16, torch.float16)])
@pytest.mark.parametrize("weight", [0.0, 1e-4, 0.1, 0.5, 0.9, 1.0])
def test_triton_equals_reference_within_one_ulp(src, dst, weight):
    sources, shadows = make(src, dst)
    ref_shadows = [s.clone() for s in shadows]
    bounds = [update_ulp(s, p).double() for s, p in zip(shadows, sources, strict=True)]
    got = on_device(shadows)
    _kernels.build("triton", got, on_device(sources)).lerp_(weight)
    _kernels.build("reference", ref_shadows, sources).lerp_(weight)
    for g, want, bound in zip(got, ref_shadows, bounds, strict=True):
        assert ((g.cpu().double() - want.double()).abs() <= bound).all()


def test_triton_takes_a_device_weight():
    sources, shadows = make(torch.bfloat16, torch.float32, seed=7)
    got, want = on_device(shadows), [s.clone() for s in shadows]
    update = _kernels.build("triton", got, on_device(sources))
    ref = _kernels.build("reference", want, sources)
    for value in [0.3, 0.7]:
        bounds = [update_ulp(w, p) for w, p in zip(want, sources, strict=True)]
        update.lerp_(torch.tensor(value, dtype=torch.float64, device=DEVICE))
        ref.lerp_(value)
        for g, w, bound in zip(got, want, bounds, strict=True):
            assert ((g.cpu() - w).abs() <= bound).all(), value
            g.copy_(w)  # the 1-ulp check is per single update


def test_triton_stays_within_1e6_over_1000_updates():
    """Decays 0.9..0.9999 in turn, the weights redrawn every 100 updates (on any device)."""
    sources, shadows = make(torch.bfloat16, torch.float32, seed=1)
    ref_shadows = [s.clone() for s in shadows]
    got, device_sources = on_device([s.clone() for s in shadows]), on_device(sources)
    fast = _kernels.build("triton", got, device_sources)
    ref = _kernels.build("reference", ref_shadows, sources)
    gen = torch.Generator().manual_seed(2)
    for i in range(1000):
        weight = 1 - (0.9 + 0.0999 * (i % 7) / 7)
        fast.lerp_(weight)
        ref.lerp_(weight)
        if i % 100 == 0:
            for s, d in zip(sources, device_sources, strict=True):
                s.copy_(torch.randn(s.shape, generator=gen))
                d.copy_(s)
    for g, want in zip(got, ref_shadows, strict=True):
        torch.testing.assert_close(g.cpu(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def test_unaligned_views_take_the_unvectorised_path():
    """Tensors at odd offsets into a buffer (as in flat parameter buffers) update correctly."""
    # the views are taken on the device: moving views there would copy them into aligned tensors
    (buffer,) = on_device([torch.randn(1 + 5000 + 3, generator=torch.Generator().manual_seed(3))])
    sources = [buffer[1:5001], buffer[5001:]]  # 4- and 20004-byte offsets
    shadows = on_device([torch.zeros(5000), torch.zeros(3)])
    update = _kernels.build("triton", shadows, sources)
    assert not update.groups[0].aligned
    update.lerp_(0.25)
    for got, source in zip(shadows, sources, strict=True):
        torch.testing.assert_close(got, 0.25 * source, rtol=1e-6, atol=1e-7)
    aligned = on_device([torch.zeros(5000)])
    assert _kernels.build("triton", aligned, on_device([torch.ones(5000)])).groups[0].aligned


def test_one_launch_per_group(monkeypatch):
    from polyak._kernels import _triton

    launches = []

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return lambda *args, **kwargs: None

    shadows = on_device([torch.zeros(5000), torch.zeros(3), torch.zeros(10, dtype=torch.float64)])
    sources = on_device([torch.ones(5000), torch.ones(3), torch.ones(10, dtype=torch.float64)])
    update = _kernels.build("triton", shadows, sources)
    monkeypatch.setattr(_triton, "_lerp_kernel", Counting())
    update.lerp_(0.5)
    # two groups (fp32, fp64); the fp32 one covers 5000 + 3 elements in 3 + 1 blocks of 2048
    assert launches == [(4,), (1,)]
    # three slots: the same launches, each program covering its block in every slot
    launches.clear()
    slots = [shadows, *[[s.clone() for s in shadows] for _ in range(2)]]
    _triton.TritonUpdate(slots, sources).lerp_([0.5, 0.25, 0.125])
    assert launches == [(4,), (1,)]


def test_update_allocates_nothing():
    from polyak._kernels._triton import TritonUpdate
    from tests.test_kernels import allocated_bytes

    sources = on_device([torch.randn(4096).bfloat16() for _ in range(3)])
    gate = torch.zeros((), dtype=torch.bool, device=DEVICE)
    weight = torch.tensor(0.3, dtype=torch.float64, device=DEVICE)
    for rounding, dtype in [("nearest", torch.float32), ("stochastic", torch.bfloat16)]:
        shadows = [s.to(dtype).clone() for s in sources]
        update = _kernels.build("triton", shadows, sources, rounding=rounding)
        slots = [[s.clone() for s in shadows] for _ in range(2)]
        two = TritonUpdate(slots, sources, stochastic=rounding == "stochastic")
        for run in [lambda u=update: u.lerp_(0.2), lambda u=two: u.lerp_([0.2, weight], gate)]:
            run()  # compile / plan
            if CUDA:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                run()
                torch.cuda.synchronize()
                assert torch.cuda.max_memory_allocated() - before <= 1024
            else:  # torch-side allocations only (the interpreter works in numpy; it boxes a scalar)
                assert allocated_bytes(run) <= 64, rounding


def test_stochastic_rounding_draws_the_same_bits_as_the_reference():
    gen = torch.Generator().manual_seed(2)
    src = [torch.randn(5000, generator=gen), torch.randn(37, 3, generator=gen)]
    a = [s.bfloat16() for s in src]
    b = [t.clone() for t in a]
    targets = [s + 1e-3 for s in src]
    got = on_device(a)
    fast = _kernels.build("triton", got, on_device(targets), rounding="stochastic", seed=9)
    ref = _kernels.build("reference", b, targets, rounding="stochastic", seed=9)
    for weight in [0.01, 0.5, 0.9]:
        fast.lerp_(weight)
        ref.lerp_(weight)
    # identical random bits; the fp32 lerp may differ by an ulp before rounding in rare cases
    mismatched = sum((g.cpu() != w).sum().item() for g, w in zip(got, b, strict=True))
    assert mismatched <= 0.001 * sum(t.numel() for t in b)


def test_stochastic_rounding_is_unbiased_and_deterministic():
    n = 1 << 20
    start = torch.full((n,), 1.0, dtype=torch.bfloat16, device=DEVICE)
    target = torch.full((n,), 1.0 + 2**-8, dtype=torch.float32, device=DEVICE)
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    runs = []
    for seed in [11, 11, 12]:
        shadows = [start.clone()]
        _kernels.build("triton", shadows, [target], rounding="stochastic", seed=seed).lerp_(0.5)
        runs.append(shadows[0].cpu().float())
    values = runs[0]
    assert set(values.unique().tolist()) == {1.0, 1.0 + 2**-7}
    p_up = (values > 1).double().mean().item()
    assert abs(p_up - 0.25) < 5 * (0.25 * 0.75 / n) ** 0.5  # P(up) = (2**-9) / (2**-7)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning"
)  # numpy, on inf - inf
def test_special_values_match_the_reference():
    """NaN stays NaN and infinities stay infinite (or turn NaN exactly where torch.lerp does)."""
    inf, nan = float("inf"), float("nan")
    shadow = torch.tensor([nan, inf, -inf, 0.0, -0.0, 3.0e38, 1.0, 1.0])
    source = torch.tensor([1.0, inf, 2.0, -0.0, -0.0, 3.0e38, nan, -inf])
    for rounding, dtype in [("nearest", torch.float32), ("stochastic", torch.bfloat16)]:
        # clones: .to() and on_device() may return the very same tensor
        got, want = on_device([shadow.to(dtype).clone()]), [shadow.to(dtype).clone()]
        _kernels.build("triton", got, on_device([source]), rounding=rounding).lerp_(0.25)
        _kernels.build("reference", want, [source], rounding=rounding).lerp_(0.25)
        torch.testing.assert_close(got[0].cpu(), want[0], rtol=0, atol=0, equal_nan=True)
        assert got[0][5].item() == want[0][5].item() > 1e38
        assert got[0][0].isnan() and got[0][-1].item() == -inf


def test_tables_follow_storage_that_moved():
    model = nn.Linear(8, 4).to(DEVICE)
    start = model.weight.detach().cpu().clone()
    ema = polyak.EMA(model, decay=0.5, kernel="triton")
    with torch.no_grad():
        model.weight.data = torch.full_like(model.weight, 2.0)  # new storage, same Parameter
    ema.update()  # reads the new storage through the rebuilt table, not the freed one
    torch.testing.assert_close(
        ema.state_dict()["shadows"]["ema"]["weight"].cpu(), (start + 2.0) / 2
    )
    # a new dtype under the same Parameter: the EMA follows it (float64 shadow by the dtype
    # policy, re-planned), so the kernel's own check is reached only when built by hand
    shadow = ema.state_dict()["shadows"]["ema"]["weight"].double().cpu()
    with torch.no_grad():
        model.weight.data = torch.full_like(model.weight, 4.0, dtype=torch.float64)
    ema.update()
    torch.testing.assert_close(ema.average("weight").cpu(), (shadow + 4.0) / 2, rtol=0, atol=1e-7)
    assert ema.average("weight").dtype == torch.float64
    source = torch.ones(3, device=DEVICE)
    update = _kernels.build("triton", [torch.zeros(3, device=DEVICE)], [source])
    source.data = source.data.double()
    with pytest.raises(RuntimeError, match="changed since the EMA was built"):
        update.lerp_(0.5)


def test_ema_with_triton_equals_reference():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))

    a, b = model().to(DEVICE), model()
    ema_a = polyak.EMA(a, decay=0.9, kernel="triton")
    ema_b = polyak.EMA(b, decay=0.9, kernel="reference")
    assert ema_a.kernel == "triton" and "kernel='triton'" in repr(ema_a)
    x = torch.randn(5, 3, 4, 4)
    for _ in range(3):
        for net, ema, inp in [(a, ema_a, x.to(DEVICE)), (b, ema_b, x)]:
            net(inp).sum().backward()
            with torch.no_grad():
                for p in net.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
            ema.update()
    want = ema_b.state_dict()["shadows"]["ema"]
    for name, got in ema_a.state_dict()["shadows"]["ema"].items():
        torch.testing.assert_close(got.cpu(), want[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("every", [1, 3])
def test_capturable_triton_equals_eager_reference(every):
    """Step counter and schedule on the device, the weight read by the kernel: same averages."""
    from polyak import schedules

    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))

    a, b = model().to(DEVICE), model()
    decay = schedules.tf_warmup(0.95)
    captured = polyak.EMA(a, decay=decay, update_every=every, kernel="triton", capturable=True)
    eager = polyak.EMA(b, decay=decay, update_every=every, kernel="reference")
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    for _ in range(7):
        for net, ema, inp in [(a, captured, x.to(DEVICE)), (b, eager, x)]:
            net(inp).square().mean().backward()
            with torch.no_grad():
                for p in net.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
            ema.update()
    assert captured.step == 7 and captured.num_averages == 7 // every
    want = eager.state_dict()["shadows"]["ema"]
    for name, got in captured.state_dict()["shadows"]["ema"].items():
        if got.is_floating_point():
            torch.testing.assert_close(got.cpu(), want[name], rtol=1e-6, atol=1e-6)


def test_clear_errors():
    shadow, source = on_device([torch.zeros(3, 4), torch.zeros(4, 3)])
    with pytest.raises(ValueError, match="dense and laid out like its shadow"):
        _kernels.build("triton", [shadow], [source.t()])
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        if not CUDA:
            with pytest.raises(ValueError, match="runs on CUDA tensors.*TRITON_INTERPRET"):
                polyak.EMA(nn.Linear(2, 2), kernel="triton")
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


# ---------------------------------------------------------------- N slots and the gate


def triton_update(*args, **kwargs):
    """A ``TritonUpdate`` from the module as (re)loaded by the interpreter fixture."""
    from polyak._kernels._triton import TritonUpdate

    return TritonUpdate(*args, **kwargs)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (NaN payloads and the sign of zero included), on the CPU."""
    return t.cpu().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_bits(got, want):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(bits(g), bits(w)), i


@pytest.mark.parametrize(("src", "dst"), [*DTYPE_PAIRS, (torch.float16, torch.float16)])
def test_slots_equal_one_slot_updates_bit_for_bit(src, dst):
    """Each slot of a 2-slot launch is what today's one-slot update gives it: float and device
    weights mixed, both lerp branches, and one device weight shared by both slots."""
    sources, start0 = make(src, dst, seed=5)
    _, start1 = make(src, dst, seed=6)
    sources = on_device(sources)
    slots = [on_device([s.clone() for s in start0]), on_device([s.clone() for s in start1])]
    two = triton_update(slots, sources)
    scratch = on_device([s.clone() for s in start0])
    one = _kernels.build("triton", scratch, sources)  # today's one-slot form
    want = [on_device([s.clone() for s in start0]), on_device([s.clone() for s in start1])]
    shared = torch.tensor(0.375, dtype=torch.float64, device=DEVICE)
    for weights in [(0.1, 0.7), (torch.tensor(0.9, dtype=torch.float64, device=DEVICE), 0.25),
                    (shared, shared)]:  # fmt: skip
        two.lerp_(list(weights))
        for k, weight in enumerate(weights):
            torch._foreach_copy_(scratch, want[k])
            one.lerp_(weight)
            torch._foreach_copy_(want[k], scratch)
        for k in range(2):
            assert_same_bits(slots[k], want[k])
    moved = [not torch.equal(a.cpu(), b) for a, b in zip(slots[1], start1, strict=True)]
    assert all(moved)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_gate_keeps_every_bit_of_every_slot(rounding):
    """A set gate: no store at all, so every bit stays, NaN payloads in 16-bit shadows too;
    the stochastic counter still advances. An open gate updates as no gate does."""
    inf, nan = float("inf"), float("nan")
    source = torch.tensor([nan, inf, -inf, 1.0, 2.0, -3.0, nan, 0.5] * 300)
    shadow = torch.tensor([1.0, -2.0, 0.5, inf, -0.0, 1e-40, 0.0, -inf] * 300)
    dtypes = [torch.bfloat16] if rounding == "stochastic" else [torch.float32, torch.bfloat16,
                                                                torch.float16, torch.float64]  # fmt: skip
    sources = on_device([source.to(d) for d in dtypes])
    slots = []
    for sign in (1, -1):
        slot = [(sign * shadow).to(d) for d in dtypes]
        for t in slot:
            bits(t)[6::8] = 0x7D01 if t.dtype == torch.float16 else 0x7F81  # signalling NaNs
        slots.append(on_device(slot))
    before = [[t.clone() for t in slot] for slot in slots]
    update = triton_update(slots, sources, stochastic=rounding == "stochastic", seed=3)
    gate = torch.ones((), dtype=torch.bool, device=DEVICE)
    for weights in [(0.5, 0.0), (1.0, torch.tensor(0.25, dtype=torch.float64, device=DEVICE))]:
        update.lerp_(list(weights), gate=gate)
        for k in range(2):
            assert_same_bits(slots[k], before[k])
    assert all(c.item() == (2 if rounding == "stochastic" else 0)
               for c in update.state.counters.values())  # fmt: skip
    gate.fill_(False)
    update.lerp_([0.5, 0.0], gate=gate)
    opened = [[t.clone() for t in slot] for slot in slots]
    assert opened[0][0][0].isnan() and opened[1][0][0].isnan()  # a NaN source reaches both
    for k in range(2):
        torch._foreach_copy_(slots[k], before[k])
    for counter in update.state.counters.values():
        counter.sub_(1)  # the same stream position again
    update.lerp_([0.5, 0.0])
    for k in range(2):
        assert_same_bits(slots[k], opened[k])


def test_stochastic_slots_draw_the_shifted_stream():
    """Slot 0 draws exactly the one-slot bits (today's), slot k the stream at
    ``stream_offsets(., k)``, bit for bit with the eager definition. Weight 0.5 and values in
    [1, 2) make the fp32 lerp exact in every formula, so the rounded bits are the stream's."""
    from polyak._kernels._stochastic import stochastic_lerp_, stream_offsets

    gen = torch.Generator().manual_seed(3)
    sources = [torch.rand(3000, generator=gen) + 1, torch.rand(7, 5, generator=gen) + 1]
    start = [(torch.rand(s.shape, generator=gen) + 1).bfloat16() for s in sources]
    slots = [on_device([s.clone() for s in start]) for _ in range(3)]  # alike: the stream differs
    update = triton_update(slots, on_device(sources), stochastic=True, seed=7)
    one = on_device([s.clone() for s in start])
    single = _kernels.build("triton", one, on_device(sources), rounding="stochastic", seed=7)
    ref = [s.clone() for s in start]
    reference = _kernels.build("reference", ref, sources, rounding="stochastic", seed=7)
    want = [[s.clone() for s in start] for _ in range(3)]
    seed = torch.tensor(7)
    for counter, gated in [(1, False), (2, True), (3, False)]:
        update.lerp_([0.5] * 3, gate=torch.tensor(gated, device=DEVICE))
        single.lerp_(0.5)
        reference.lerp_(0.5)
        if not gated:
            for k in range(3):
                for shadow, source, offset in zip(
                    want[k], sources, stream_offsets(start, k), strict=True
                ):
                    weight, count = torch.tensor(0.5), torch.tensor(counter)
                    stochastic_lerp_(shadow, source, weight, seed, count, offset)
        for k in range(3):
            assert_same_bits(slots[k], want[k])
        if counter == 1:  # slot 0: today's bits, of the one-slot Triton and reference kernels
            assert_same_bits(slots[0], one)
            assert_same_bits(slots[0], ref)
            assert not torch.equal(slots[1][0], slots[0][0])
            assert not torch.equal(slots[2][0], slots[1][0])


def test_slot_errors_are_clear():
    sources = on_device([torch.ones(2, 3, 4, 5)])
    shadow = on_device([torch.zeros(2, 3, 4, 5)])[0]
    with pytest.raises(ValueError, match="slot 1 holds 0 shadows but there are 1 sources"):
        triton_update([[shadow], []], sources)
    other = shadow.clone().contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="dense and laid out like its shadow"):
        triton_update([[shadow], [other]], sources)
    update = triton_update([[shadow], [shadow.clone()]], sources)
    with pytest.raises(ValueError, match=r"got 1 weight\(s\) for 2 slot\(s\)"):
        update.lerp_(0.5)
    with pytest.raises(TypeError, match="gate must be None or a 0-dim bool tensor"):
        update.lerp_([0.5, 0.5], gate=torch.zeros((), dtype=torch.int8, device=DEVICE))
    with pytest.raises(ValueError, match="the gate is on meta"):
        update.lerp_([0.5, 0.5], gate=torch.zeros((), dtype=torch.bool, device="meta"))
    assert torch.equal(shadow.cpu(), torch.zeros(2, 3, 4, 5))


@pytest.mark.skipif(not CUDA, reason="host syncs are a GPU matter")
def test_gated_slots_update_without_a_host_sync():
    source = torch.randn(4096, device="cuda")
    slots = [[torch.zeros(4096, device="cuda")], [torch.zeros(4096, device="cuda")]]
    update = triton_update(slots, [source])
    gate = torch.zeros((), dtype=torch.bool, device="cuda")
    weights = [torch.tensor(0.5, dtype=torch.float64, device="cuda"), 0.25]
    update.lerp_(weights, gate=gate)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gate.fill_(True)
        update.lerp_(weights, gate=gate)
        gate.fill_(False)
        update.lerp_(weights, gate=gate)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(slots[0][0], 0.75 * source)
    torch.testing.assert_close(slots[1][0], 0.4375 * source)


@pytest.mark.skipif(not CUDA, reason="host syncs are a GPU matter")
def test_tables_are_rebuilt_without_a_host_sync():
    model = nn.Linear(64, 64).cuda()
    ema = polyak.EMA(model, decay=0.5, kernel="triton")
    ema.update()
    with torch.no_grad():
        model.weight.data = model.weight.data + 1.0  # new storage: the tables are rebuilt
    want = (ema.average("weight") + model.weight.detach()) / 2
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(ema.average("weight"), want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernel_runs_on_the_tensors_device_not_the_current_one():
    model = nn.Linear(64, 64).to("cuda:1")
    ema = polyak.EMA(model, decay=0.5, kernel="triton")
    ref = polyak.EMA(model, decay=0.5, kernel="reference")
    with torch.cuda.device(0):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update()
        ref.update()
    torch.testing.assert_close(ema.average("weight"), ref.average("weight"))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_triton_update_captures_in_a_cuda_graph():
    model = nn.Linear(256, 256).cuda()
    ema = polyak.EMA(model, decay=0.99, kernel="triton", capturable=True)
    ref = polyak.EMA(model, decay=0.99, kernel="reference")
    ema.update()  # warm up (compile) outside the capture
    ref.update()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema.update()
    for _ in range(100):
        with torch.no_grad():
            model.weight.add_(0.01)
        graph.replay()
        ref.update()
    torch.cuda.synchronize()
    assert ema.step == ref.step == 101
    want = ref.state_dict()["shadows"]["ema"]["weight"]
    torch.testing.assert_close(
        ema.state_dict()["shadows"]["ema"]["weight"], want, rtol=1e-6, atol=1e-6
    )


CODEGEN = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from polyak._kernels import _triton

signature = {name: "*i64" for name in ["shadow_ptrs", "source_ptrs", "numels", "stream_starts",
                                       "block_start", "seed_ptr", "counter_ptr"]}
signature.update(block_tensor="*i32", weight_ptr="*fp64", gate_ptr="*i1")
names = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
out = {}
for case in sys.argv[1:]:
    shadow, source, stochastic, aligned, *rest = case.split("-")
    slots = int(rest.pop(0)[1:]) if rest and rest[0].startswith("x") else 1
    debug = "debug" in rest
    constexprs = dict(SHADOW=names[shadow], SOURCE=names[source],
                      COMPUTE=tl.float64 if shadow == "fp64" else tl.float32,
                      STOCHASTIC=stochastic == "sr", ALIGNED=aligned == "aligned",
                      SLOTS=slots, BLOCK=_triton.BLOCK)
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    kernel = triton.compile(ASTSource(fn=_triton._lerp_kernel, signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32),
                            options=dict(_triton.LAUNCH_OPTIONS, debug=debug))
    ptx = kernel.asm["ptx"]
    out[case] = {"ld128": ptx.count("ld.global.v4") + ptx.count("ld.global.v2.b64")
                 + ptx.count("ld.global.v2.f64"),
                 "st128": ptx.count("st.global.v4") + ptx.count("st.global.v2.b64")
                 + ptx.count("st.global.v2.f64"),
                 "asserts": ptx.count("__assertfail"),
                 "cubin": len(kernel.asm["cubin"])}
print(json.dumps(out))
"""


def test_kernel_compiles_for_hopper_with_128_bit_accesses(tmp_path):
    """Without a GPU: Triton compiles every variant to sm_90 machine code (its bundled ptxas) with
    the options of the real launch, whole blocks of aligned tensors use 128-bit loads and stores
    (the bandwidth-bound pattern), a debug build asserts nothing in the random stream, and with N
    slots the source is loaded once: each extra slot adds only its shadow's loads and stores."""
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    cases = ["fp32-fp32-rn-aligned", "fp32-bf16-rn-aligned", "bf16-bf16-sr-aligned",
             "bf16-fp32-sr-aligned", "fp64-fp64-rn-aligned", "fp16-fp16-rn-aligned",
             "fp32-fp32-rn-unaligned", "bf16-bf16-sr-aligned-debug",
             "fp32-fp32-rn-aligned-x2", "fp32-bf16-rn-aligned-x3", "bf16-fp32-sr-aligned-x3"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(polyak.__file__).parents[1]),
                                                      env.get("PYTHONPATH")]))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", CODEGEN, *cases], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    for case in cases:
        assert counts[case]["cubin"] > 0, case
        if "-aligned" in case:
            assert counts[case]["ld128"] > 0 and counts[case]["st128"] > 0, (case, counts[case])
    # unaligned addresses: no 128-bit access may be assumed
    assert counts["fp32-fp32-rn-unaligned"]["ld128"] == 0
    # TRITON_DEBUG=1 compiles in device asserts, but none for the random stream's wrapping 32-bit
    # multiplies (they would fire on nearly every element): LAUNCH_OPTIONS turns that check off
    assert counts["bf16-bf16-sr-aligned-debug"]["asserts"] == 0
    # N slots: N times the shadow's 128-bit loads (as many as its stores), the source's once
    for one, many, n in [("fp32-fp32-rn-aligned", "fp32-fp32-rn-aligned-x2", 2),
                         ("fp32-bf16-rn-aligned", "fp32-bf16-rn-aligned-x3", 3),
                         ("bf16-fp32-sr-aligned", "bf16-fp32-sr-aligned-x3", 3)]:  # fmt: skip
        per_slot = counts[one]["st128"]
        assert counts[many]["st128"] == n * per_slot, (many, counts[many])
        assert counts[many]["ld128"] == counts[one]["ld128"] + (n - 1) * per_slot, counts[many]
        assert counts[one]["ld128"] > per_slot  # the source's loads, counted once


def test_shards_stream_offsets_are_planned_from_their_positions():
    """Shards of a tensor (FSDP2's ranks) draw the stream at their full tensors' positions: the
    [tensor][slot] table holds those of ``tests.test_kernels.shard_plans`` (rank r's rows start at
    12r of a (6, 4) tensor and 3r of a (6,) one that starts at 24; slot 1 30 elements on)."""
    from tests.test_kernels import shard_plans

    tables = [update.groups[0].stream_starts.tolist() for _, update in shard_plans("triton")[2]]
    assert tables == [[0, 30, 24, 54], [12, 42, 27, 57]]
