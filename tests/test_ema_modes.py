"""EMA execution modes: fused, stochastic rounding, capturable, CPU offload, side stream, CUDA graphs.

The CUDA-only tests skip on the CPU with a reason; they run on a GPU machine with
``python -m pytest tests/test_ema_modes.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polyak
from polyak import _kernels, schedules

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (runs on the GPU machine)")


# the GPU kernels; the hand-written Triton one where triton is installed
GPU_KERNELS = ["foreach", "fused"] + (["triton"] if _kernels._has_triton() else [])


def net(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return model.to(device=device, dtype=dtype)


def run(model, ema, steps, seed=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen).to(device, dtype)
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()


def assert_same_averages(a, b, exact=True, names=None):
    assert a.names() == b.names()
    for name in names if names is not None else a.names():
        x, y = a.average(name), b.average(name)
        if exact:
            assert torch.equal(x.cpu(), y.cpu()), name
        else:
            torch.testing.assert_close(x.cpu(), y.cpu(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_matches_foreach_in_training(dtype):
    m1, m2 = net(dtype=dtype), net(dtype=dtype)
    a = polyak.EMA(m1, decay=schedules.tf_warmup(0.9), kernel="foreach")
    b = polyak.EMA(m2, decay=schedules.tf_warmup(0.9), kernel="fused")
    assert "kernel='fused'" in repr(b)
    run(m1, a, 5)
    run(m2, b, 5)
    assert_same_averages(a, b, exact=False)


def test_stochastic_rounding_through_the_ema():
    model = net()
    ema = polyak.EMA(model, decay=0.99, shadow_dtype=torch.bfloat16, rounding="stochastic", seed=5)
    assert "rounding='stochastic'" in repr(ema) and ema.kernel == "fused"
    run(model, ema, 3)
    assert ema.average("0.weight").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="needs bf16 shadows"):
        polyak.EMA(net(), rounding="stochastic")
    with pytest.raises(ValueError, match="rounding must be one of"):
        polyak.EMA(net(), rounding="up")


@pytest.mark.parametrize("kernel", ["reference", "foreach"])
@pytest.mark.parametrize("every", [1, 3])
def test_capturable_equals_eager_on_any_device(kernel, every):
    decay = schedules.tf_warmup(0.95)
    m1, m2 = net(), net()
    eager = polyak.EMA(m1, decay=decay, update_every=every, kernel=kernel)
    captured = polyak.EMA(m2, decay=decay, update_every=every, kernel=kernel, capturable=True)
    run(m1, eager, 7)
    run(m2, captured, 7)
    assert captured.step == 7 and isinstance(captured.step, int)
    assert captured.num_averages == 7 // every
    # the decay is computed on the device in float64 instead of on the host: same to an ulp
    averaged = [n for n in eager.names() if eager.average(n).is_floating_point()]
    assert_same_averages(eager, captured, exact=False, names=averaged)
    # copied buffers are copied at every call when capturable (documented)
    assert captured.average("1.num_batches_tracked").item() == 7
    assert captured.state_dict()["step"] == 7


def test_capturable_bf16_shadows_read_the_device_weight_in_fp32():
    """Capturable bf16 shadows take ``fused`` (a foreach lerp would round the weight to bf16) and
    equal the eager EMA, whose Python-float weight ATen reads in fp32."""
    m1, m2 = net(), net()
    eager = polyak.EMA(m1, decay=0.999, shadow_dtype=torch.bfloat16, kernel="foreach")
    captured = polyak.EMA(m2, decay=0.999, shadow_dtype=torch.bfloat16, capturable=True)
    assert captured.kernel == "fused"
    with pytest.raises(ValueError, match="cannot run a capturable update of torch.bfloat16"):
        polyak.EMA(net(), shadow_dtype=torch.bfloat16, capturable=True, kernel="foreach")
    run(m1, eager, 6)
    run(m2, captured, 6)
    averaged = [n for n in eager.names() if eager.average(n).is_floating_point()]
    assert_same_averages(eager, captured, exact=True, names=averaged)


def test_capturable_update_does_not_touch_the_host(monkeypatch):
    model = net()
    ema = polyak.EMA(model, decay=schedules.power(sigma_rel=0.1), capturable=True, update_every=2)
    ema.update()
    for name in ["item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"]:
        monkeypatch.setattr(
            torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"Tensor.{_n}")
        )
    ema.update()
    ema.update()
    monkeypatch.undo()
    assert ema.step == 3


def test_capturable_rejects_python_callables():
    with pytest.raises(ValueError, match="a Python callable cannot do"):
        polyak.EMA(net(), decay=lambda step: 0.9, capturable=True)


def test_capturable_resume(tmp_path):
    m1 = net()
    ema = polyak.EMA(m1, decay=schedules.tf_warmup(0.9), capturable=True)
    run(m1, ema, 4)
    state = ema.state_dict()
    m2 = net()
    m2.load_state_dict(m1.state_dict())
    other = polyak.EMA(m2, decay=schedules.tf_warmup(0.9), capturable=True)
    other.load_state_dict(state)
    assert other.step == 4
    run(m1, ema, 3, seed=9)
    run(m2, other, 3, seed=9)
    assert_same_averages(ema, other)


def test_offload_to_cpu_equals_inline():
    m1, m2 = net(), net()
    inline = polyak.EMA(m1, decay=0.8)
    off = polyak.EMA(m2, decay=0.8, offload="cpu")
    assert "offload='cpu'" in repr(off)
    run(m1, inline, 6)
    run(m2, off, 6)
    assert_same_averages(inline, off)  # reads wait for the in-flight update
    with off.swapped():
        assert torch.equal(m2[0].weight, off.average("0.weight"))


def test_offload_bounded_staleness():
    """The next update waits for the previous one: updates are never skipped or reordered."""
    model = net()
    ema = polyak.EMA(model, decay=0.0, offload="cpu")
    for value in [1.0, 2.0, 3.0]:
        with torch.no_grad():
            model[0].weight.fill_(value)
        ema.update()
    assert torch.equal(ema.average("0.weight"), torch.full_like(model[0].weight, 3.0))


def test_mode_conflicts():
    with pytest.raises(ValueError, match="cannot be combined"):
        polyak.EMA(net(), stream="side", offload="cpu")
    with pytest.raises(ValueError, match="capturable=True runs the update"):
        polyak.EMA(net(), capturable=True, offload="cpu")
    with pytest.raises(ValueError, match="stream must be None or 'side'"):
        polyak.EMA(net(), stream="main")


@pytest.mark.skipif(CUDA, reason="checks the CPU error")
def test_side_stream_needs_cuda():
    with pytest.raises(ValueError, match="stream='side' needs the tracked tensors on a CUDA"):
        polyak.EMA(net(), stream="side")


# ---------------------------------------------------------------- GPU only


@needs_cuda
@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_update_never_syncs(kernel, dtype):
    model = net(dtype=dtype, device="cuda")
    ema = polyak.EMA(model, decay=schedules.tf_warmup(0.99), kernel=kernel)
    ema.update()  # compile / warm up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ema.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_gpu_update_allocates_no_temporaries(kernel):
    """bf16 weights, fp32 shadows: peak memory during an update stays within a few KiB."""
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)]).cuda().bfloat16()
    ema = polyak.EMA(model, decay=0.999, kernel=kernel)
    ema.update()  # compile / plan outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ema.update()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # a naive upcast would allocate an fp32 copy of every weight: 16 MiB here
    assert extra <= 64 * 1024, f"{kernel} allocated {extra} bytes during one update"


@needs_cuda
@pytest.mark.parametrize("kernel", ["reference", *GPU_KERNELS])
def test_gpu_kernels_match_cpu_reference(kernel):
    cpu, gpu = net(), net(device="cuda")
    a = polyak.EMA(cpu, decay=0.9, kernel="reference")
    b = polyak.EMA(gpu, decay=0.9, kernel=kernel)
    for _ in range(3):
        with torch.no_grad():
            for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True):
                p.add_(0.01)
                q.add_(0.01)
        a.update()
        b.update()
    assert_same_averages(a, b, exact=False)


@needs_cuda
@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_side_stream_equals_inline(kernel):
    m1, m2 = net(device="cuda"), net(device="cuda")
    inline = polyak.EMA(m1, decay=0.9, kernel=kernel)
    side = polyak.EMA(m2, decay=0.9, stream="side", kernel=kernel)
    run(m1, inline, 20)
    run(m2, side, 20)
    assert_same_averages(inline, side)


@needs_cuda
def test_offload_from_cuda_equals_inline():
    m1, m2 = net(device="cuda"), net(device="cuda")
    inline = polyak.EMA(m1, decay=0.9)
    off = polyak.EMA(m2, decay=0.9, offload="cpu")
    assert off.average("0.weight").is_pinned()
    run(m1, inline, 20)
    run(m2, off, 20)
    # the host runs ATen's CPU lerp, the device a compiled kernel: equal to rounding, not in bits
    assert_same_averages(inline, off, exact=False)


@needs_cuda
@pytest.mark.parametrize("mode", [{"stream": "side"}, {"offload": "cpu"}], ids=["side", "offload"])
def test_side_stream_reads_buffers_as_they_were_at_update(mode, monkeypatch):
    """The forward pass after ``update()`` writes BatchNorm's statistics at once; a side stream that
    is still busy must average (and copy) them as they were when ``update()`` was called.

    The side stream is held back by a 10 ms device sleep after it has waited for the caller's
    stream, so without a snapshot of the buffers it would read the next forward's statistics.
    """
    m1, m2 = net(device="cuda"), net(device="cuda")
    inline = polyak.EMA(m1, decay=0.9)
    other = polyak.EMA(m2, decay=0.9, **mode)
    side, wait_stream = other._engine.stream, torch.cuda.Stream.wait_stream

    def slow_wait_stream(stream, waited):
        wait_stream(stream, waited)
        if stream is side:
            with torch.cuda.stream(stream):
                torch.cuda._sleep(20_000_000)

    monkeypatch.setattr(torch.cuda.Stream, "wait_stream", slow_wait_stream)
    xs = torch.randn(4, 16, 6, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for model, ema in ((m1, inline), (m2, other)):
        for x in xs:
            ema.update()
            model(x)  # train mode: writes running_mean, running_var, num_batches_tracked
    # the device runs a compiled or foreach kernel, an offload ATen's CPU lerp: equal to rounding
    assert_same_averages(inline, other, exact="stream" in mode)


@needs_cuda
@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_cuda_graph_captured_training_step_equals_eager(kernel):
    """Capture forward, backward, optimizer step and EMA update; replay 100 times; compare."""

    def setup():
        model = net(device="cuda")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
        ema = polyak.EMA(model, decay=schedules.tf_warmup(0.99), kernel=kernel, capturable=True)
        return model, opt, ema

    gen = torch.Generator(device="cuda").manual_seed(0)
    data = torch.randn(100, 16, 6, device="cuda", generator=gen)

    def step(model, opt, ema, x):
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        ema.update()

    m_eager, o_eager, e_eager = setup()
    m_graph, o_graph, e_graph = setup()
    # warm up both identically on a side stream (CUDA graphs need it), then capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for m, o, e in [(m_eager, o_eager, e_eager), (m_graph, o_graph, e_graph)]:
            for i in range(3):
                step(m, o, e, data[i])
    torch.cuda.current_stream().wait_stream(s)
    static_x = data[3].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(m_graph, o_graph, e_graph, static_x)
    for i in range(3, 100):
        static_x.copy_(data[i])
        graph.replay()
        step(m_eager, o_eager, e_eager, data[i])
    torch.cuda.synchronize()
    # capture itself ran no update; 3 warm-up steps + 97 replays
    assert e_graph.step == e_eager.step == 100
    assert_same_averages(e_eager, e_graph, exact=False)
