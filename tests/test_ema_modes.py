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


def step_both(m1, m2, ema1, ema2, steps):
    """Move both models' weights alike (0.01 per step) and update both EMAs."""
    for _ in range(steps):
        with torch.no_grad():
            for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
                p.add_(0.01)
                q.add_(0.01)
        ema1.update()
        ema2.update()


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


@pytest.mark.parametrize("kernel", ["reference", "fused"])
def test_stochastic_rounding_resumes_bit_exactly(tmp_path, kernel):
    """The random stream's counter is in the state dict: a resumed run draws the bits the
    uninterrupted run drew, not those of its first updates again. Re-planning (ema.to) keeps it."""
    options = {
        "shadow_dtype": torch.bfloat16,
        "rounding": "stochastic",
        "seed": 3,
        "kernel": kernel,
    }
    model = net()
    ema = polyak.EMA(model, decay=0.999, **options)
    run(model, ema, 3, seed=1)
    state = ema.state_dict()
    assert state["rng_counter"] == 3
    polyak.io.save_state({"model": model.state_dict(), "ema": state}, tmp_path / "ckpt.pt")
    run(model, ema, 4, seed=2)

    resumed_model = net(seed=9)
    resumed = polyak.EMA(resumed_model, decay=0.999, **options)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed_model.load_state_dict(ckpt["model"])
    resumed.load_state_dict(ckpt["ema"])
    resumed.to("cpu")  # a re-plan must not restart the stream either
    run(resumed_model, resumed, 4, seed=2)
    assert resumed.state_dict()["rng_counter"] == ema.state_dict()["rng_counter"] == 7
    assert_same_averages(ema, resumed)
    # a stream restarted at 0 would round differently: the test can tell
    restarted = polyak.EMA(net(seed=9), decay=0.999, **options)
    restarted.model.load_state_dict(ckpt["model"])
    state = dict(ckpt["ema"], rng_counter=0)
    restarted.load_state_dict(state)
    run(restarted.model, restarted, 4, seed=2)
    assert any(
        not torch.equal(ema.average(n), restarted.average(n))
        for n in ema.names()
        if ema.average(n).dtype == torch.bfloat16
    )


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


@pytest.mark.parametrize(
    "decay",
    [
        schedules.tf_warmup(0.95),  # at n = -10 its (1 + n) / (10 + n) divides by zero
        schedules.inverse_gamma(),  # a negative base to a fractional power: NaN
        schedules.scaled(schedules.tf_warmup(0.95), 2.5),
    ],
    ids=["tf_warmup", "inverse_gamma", "scaled"],
)
def test_capturable_long_update_every_stays_finite(decay):
    """With ``update_every=k`` a capturable update evaluates the schedule at the k steps it covers
    on every call; on the first calls some of them are not steps yet (n <= 0), where schedules
    give inf or NaN. Those must not reach the weight: 0 * NaN is NaN, and one NaN weight turns
    every shadow NaN for good."""
    m1, m2 = net(), net()
    eager = polyak.EMA(m1, decay=decay, update_every=12)
    captured = polyak.EMA(m2, decay=decay, update_every=12, capturable=True)
    run(m1, eager, 25)
    run(m2, captured, 25)
    assert captured.num_averages == 2
    averaged = [n for n in eager.names() if eager.average(n).is_floating_point()]
    assert_same_averages(eager, captured, exact=False, names=averaged)


@pytest.mark.parametrize("kernel", ["reference", "foreach", "fused"])
def test_capturable_nan_on_an_off_step_never_reaches_a_shadow(kernel):
    """Issue 14, acceptance 5. With ``update_every=3`` steps 1 and 2 are off-steps: a NaN the
    weights hold only then must stay out of the shadows, as it does without capturable (a lerp by
    weight 0 lets it in: 0 * nan = nan). The rule's gate skips the update on the device."""
    model = net()
    eager = polyak.EMA(net(), decay=0.9, update_every=3, kernel=kernel)
    captured = polyak.EMA(model, decay=0.9, update_every=3, kernel=kernel, capturable=True)
    eager.model.load_state_dict(model.state_dict())
    for step in (1, 2, 3):
        with torch.no_grad():
            for m in (model, eager.model):
                m[0].weight[0, 0] = float("nan") if step == 1 else 1.0
        captured.update()
        eager.update()
    assert captured.num_averages == eager.num_averages == 1
    assert torch.isfinite(eager.average("0.weight")).all()  # the eager EMA never saw step 1
    assert torch.isfinite(captured.average("0.weight")).all()
    assert torch.equal(captured.average("0.weight"), eager.average("0.weight"))


def test_capturable_resume_with_another_update_every():
    """Loading a state saved with ``update_every=3`` into a capturable EMA built with 1 averages
    every 3 steps with the decay multiplied over the 3 steps, as the eager EMA does."""
    source = polyak.EMA(net(), decay=schedules.tf_warmup(0.99), update_every=3)
    m1, m2 = net(), net()
    eager = polyak.EMA(m1, decay=schedules.tf_warmup(0.99), update_every=1)
    captured = polyak.EMA(m2, decay=schedules.tf_warmup(0.99), update_every=1, capturable=True)
    for ema in (eager, captured):
        ema.load_state_dict(source.state_dict())
        assert ema.update_every == 3
    run(m1, eager, 9)
    run(m2, captured, 9)
    assert captured.num_averages == eager.num_averages == 3
    averaged = [n for n in eager.names() if eager.average(n).is_floating_point()]
    assert_same_averages(eager, captured, exact=False, names=averaged)


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


def test_capturable_update_does_not_touch_the_host(monkeypatch, no_host_reads):
    """On CUDA nothing may read a device value on the host; here the CPU plays the device: its
    gate is read on the device path too (a CPU gate is otherwise read on the host, which costs no
    sync there)."""
    from polyak._kernels import _foreach

    monkeypatch.setattr(_foreach, "HOST_GATE_DEVICES", frozenset())
    model = net()
    ema = polyak.EMA(model, decay=schedules.power(sigma_rel=0.1), capturable=True, update_every=2)
    ema.update()
    with no_host_reads():
        ema.update()
        ema.update()
    assert ema.step == 3


def test_capturable_rejects_python_callables():
    with pytest.raises(ValueError, match="a Python callable cannot do"):
        polyak.EMA(net(), decay=lambda step: 0.9, capturable=True)
    # also inside a built-in schedule: scaled() would hand the device step to the callable
    with pytest.raises(ValueError, match="a Python callable cannot do"):
        polyak.EMA(net(), decay=schedules.scaled(lambda step: 0.9, 2), capturable=True)
    polyak.EMA(net(), decay=schedules.scaled(schedules.tf_warmup(0.9), 2), capturable=True)


def test_capturable_first_update_refuses_to_be_captured(monkeypatch):
    """The first update compiles its kernel, which a CUDA graph capture cannot hold: it says so
    (emulated here: this test pretends the current stream is capturing)."""
    ema = polyak.EMA(net(), decay=0.9, capturable=True)

    def capturing(on: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: on)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: on)

    capturing(True)
    with pytest.raises(RuntimeError, match=r"Call ema.update\(\) once before torch.cuda.graph"):
        ema.update()
    capturing(False)
    ema.update()  # the warm-up, outside capture
    capturing(True)
    ema.update()  # now it may be captured
    assert ema.step == 2
    ema.to("cpu")  # a new plan compiles again at its first call
    with pytest.raises(RuntimeError, match="is being captured"):
        ema.update()


def test_capturable_refuses_tensors_on_several_devices():
    pairs = [("a", torch.zeros(3, requires_grad=True)), ("b", torch.zeros(3, device="meta"))]
    with pytest.raises(ValueError, match=r"tracked tensors are on \['cpu', 'meta'\]"):
        polyak.EMA(pairs, capturable=True)


def test_capturable_reference_stochastic_keeps_its_stream_on_the_device():
    """The reference kernel's stochastic stream (seed, counter) lives beside the shadows, so a
    captured update advances it at every replay and never copies from the host."""
    model = net()
    ema = polyak.EMA(
        model,
        decay=0.999,
        shadow_dtype=torch.bfloat16,
        rounding="stochastic",
        kernel="reference",
        capturable=True,
    )
    state, device = ema._engine.avg.state, ema.average("0.weight").device
    assert set(state.seeds) == set(state.counters) == {device}
    assert state.seeds[device].device == state.counters[device].device == device
    other = net()
    fused = polyak.EMA(
        other, decay=0.999, shadow_dtype=torch.bfloat16, rounding="stochastic", capturable=True
    )
    run(model, ema, 3)
    run(other, fused, 3)
    assert_same_averages(ema, fused)


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
    assert_same_averages(inline, off)  # (that reads wait: test_ema_contract, deterministically)
    with off.swapped():
        assert torch.equal(m2[0].weight, off.average("0.weight"))


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
@pytest.mark.parametrize(
    ("dtype", "capturable"),
    [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
    ids=["fp32", "bf16", "fp32-capturable"],
)
def test_gpu_update_never_syncs(kernel, dtype, capturable):
    """Nor does the capturable update's device-side decay (schedule, product over k steps)."""
    model = net(dtype=dtype, device="cuda")
    ema = polyak.EMA(
        model,
        decay=schedules.tf_warmup(0.99),
        kernel=kernel,
        capturable=capturable,
        update_every=3 if capturable else 1,
    )
    ema.update()  # compile / warm up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            ema.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ema.step == 5


@needs_cuda
@pytest.mark.parametrize("kernel", [k for k in GPU_KERNELS if k != "foreach"])
def test_gpu_stochastic_rounding_draws_the_cpu_stream(kernel):
    """bf16 shadows rounded stochastically on the GPU use the random stream of the CPU reference:
    only an element whose fp32 lerp differs by an ulp between devices (an FMA) may round apart,
    and then by one bf16 ulp. A different stream would differ in about half the elements."""
    cpu, gpu = net(), net(device="cuda")
    options = {"decay": 0.999, "shadow_dtype": torch.bfloat16, "rounding": "stochastic"}
    a = polyak.EMA(cpu, kernel="reference", **options)
    b = polyak.EMA(gpu, kernel=kernel, **options)
    step_both(cpu, gpu, a, b, 3)
    for name in a.names():
        x, y = a.average(name), b.average(name).cpu()
        if not x.is_floating_point():
            continue
        apart = x != y
        assert apart.float().mean() <= 0.01, name
        ulp = (x.float().abs() * 2.0**-7).clamp(min=2.0**-126)
        assert ((x.float() - y.float()).abs() <= ulp)[apart].all(), name


@needs_cuda
def test_side_stream_ema_lets_another_step_be_captured():
    """A side-stream EMA waits before every optimizer.step() through a global hook; a step being
    captured (here of another model) must not wait on an event from outside its graph."""
    polyak.EMA(net(device="cuda"), decay=0.9, stream="side").update()
    model = net(device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 6, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model(x).pow(2).mean().backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x).pow(2).mean().backward()
        opt.step()
    graph.replay()
    torch.cuda.synchronize()


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
    step_both(cpu, gpu, a, b, 3)
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
