"""Every kernel against the single-tensor reference path, and the reference against float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polyak import _kernels
from polyak._kernels import _foreach

DTYPE_PAIRS = [  # (source dtype, shadow dtype)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float64),
    (torch.float32, torch.float64),
]
SHAPES = [(3,), (4, 5), (2, 3, 3, 3), (), (1000,)]


def make(source_dtype, shadow_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sources = [torch.randn(s, generator=gen).to(source_dtype) for s in SHAPES]
    shadows = [torch.randn(s, generator=gen).to(shadow_dtype) for s in SHAPES]
    return sources, shadows


def ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=x.dtype)) - x.abs()


def update_ulp(shadow: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """One ulp of the shadow dtype at the scale of the update's operands.

    ``s + w (p - s)`` rounds ``p - s`` at the operands' scale, so when the result is much smaller
    than the operands (cancellation) two correct roundings (with or without an FMA, as compilers
    and ATen's vector/scalar paths differ) can disagree by more than the result's own ulp.
    """
    scale = torch.maximum(shadow.abs(), source.to(shadow.dtype).abs())
    return ulp(scale)


@pytest.mark.parametrize(("src", "dst"), DTYPE_PAIRS)
@pytest.mark.parametrize("weight", [0.0, 1e-4, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("kernel", ["foreach"])
def test_kernel_equals_reference_after_one_update(kernel, src, dst, weight):
    sources, shadows = make(src, dst)
    ref_shadows = [s.clone() for s in shadows]
    bounds = [update_ulp(s, p).double() for s, p in zip(shadows, sources, strict=True)]
    _kernels.build(kernel, shadows, sources).lerp_(weight)
    _kernels.build("reference", ref_shadows, sources).lerp_(weight)
    for got, want, bound in zip(shadows, ref_shadows, bounds, strict=True):
        assert ((got.double() - want.double()).abs() <= bound).all()


def assert_close_after_1000_updates(fast, ref, sources, shadows, ref_shadows, seed):
    """Decays 0.9..0.9999 in turn, the sources redrawn every 100 updates: within 1e-6 relative."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(1000):
        weight = 1 - (0.9 + 0.0999 * (i % 7) / 7)
        fast.lerp_(weight)
        ref.lerp_(weight)
        if i % 100 == 0:
            for s in sources:
                s.copy_(torch.randn(s.shape, generator=gen))
    for got, want in zip(shadows, ref_shadows, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize(("src", "dst"), DTYPE_PAIRS)
def test_kernel_stays_close_over_1000_updates(src, dst):
    sources, shadows = make(src, dst, seed=1)
    ref_shadows = [s.clone() for s in shadows]
    fast = _kernels.build("foreach", shadows, sources)
    ref = _kernels.build("reference", ref_shadows, sources)
    assert_close_after_1000_updates(fast, ref, sources, shadows, ref_shadows, seed=2)


def test_reference_matches_float64_formula():
    sources, shadows = make(torch.bfloat16, torch.float32)
    expected = [
        s.double() + 0.25 * (p.double() - s.double()) for s, p in zip(shadows, sources, strict=True)
    ]
    operands = [
        torch.maximum(s.abs(), p.abs()).double() for s, p in zip(shadows, sources, strict=True)
    ]
    _kernels.build("reference", shadows, sources).lerp_(0.25)
    for got, want, scale in zip(shadows, expected, operands, strict=True):
        # two fp32 roundings, each at most half an ulp of the operands' magnitude
        assert ((got.double() - want).abs() <= 2**-23 * scale).all()


# ---------------------------------------------------------------- independent anchors
# Not "the same as the reference kernel": values worked out by hand and float64 closed forms.

ALL_KERNELS = ["reference", "foreach", "fused"]
EXACT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("kernel", ALL_KERNELS)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_hand_computed_lerps(kernel, dtype):
    """s + w (p - s) on values where every dtype holds the exact answer."""
    shadow = torch.tensor([0.0, 1.0, -2.0, 4.0, 0.5], dtype=dtype)
    source = torch.tensor([1.0, 3.0, 2.0, -4.0, 0.5], dtype=dtype)
    cases = {
        0.25: [0.25, 1.5, -1.0, 2.0, 0.5],
        0.75: [0.75, 2.5, 1.0, -2.0, 0.5],
        0.5: [0.5, 2.0, 0.0, 0.0, 0.5],
        1.0: [1.0, 3.0, 2.0, -4.0, 0.5],
        0.0: [0.0, 1.0, -2.0, 4.0, 0.5],
    }
    got = [shadow.clone()]
    update = _kernels.build(kernel, got, [source])  # planned (compiled) once, for every weight
    for weight, expected in cases.items():
        got[0].copy_(shadow)
        update.lerp_(weight)
        assert torch.equal(got[0], torch.tensor(expected, dtype=dtype)), weight
    update.copy_()
    assert torch.equal(got[0], source)


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_bf16_shadows_round_half_to_even(kernel):
    """bf16 holds 1, 1 + 2**-7, 1 + 2**-6 near 1. From 1 towards 1 + 2**-6, weight 1/4 lands on
    1 + 2**-8 and weight 3/4 on 1 + 3 * 2**-8: both halfway, both rounded to the even neighbour
    (1 and 1 + 2**-6); weight 5/8 gives 1 + 2.5 * 2**-8, nearest 1 + 2**-7.

    An fp32 source of 1 + 2**-6 + 2**-12 is first rounded to the shadow's dtype (1 + 2**-6), as
    ``shadow.lerp_(p.to(shadow.dtype), w)`` does, so weight 1/4 again lands halfway and goes to 1;
    lerping the unrounded source would give 1 + 2**-8 + 2**-14, which rounds up to 1 + 2**-7."""
    shadow = torch.ones(3, dtype=torch.bfloat16)
    for source_value, cases in [
        (1 + 2**-6, [(0.25, 1.0), (0.75, 1 + 2**-6), (0.625, 1 + 2**-7)]),
        (1 + 2**-6 + 2**-12, [(0.25, 1.0)]),
    ]:
        source = torch.full((3,), source_value)  # fp32 weights, bf16 shadows
        got = [shadow.clone()]
        update = _kernels.build(kernel, got, [source])
        for weight, expected in cases:
            got[0].copy_(shadow)
            update.lerp_(weight)
            assert torch.equal(got[0].float(), torch.full((3,), expected)), (source_value, weight)


# |lerp in float64 - lerp in the shadow's dtype|: up to three fp32 roundings of operands of size
# M = max(|s|, |p|) (2**-22 M), then for bf16/fp16 shadows one rounding of the result (half an ulp,
# relative, or half the smallest subnormal).
HALF_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
HALF_SUBNORMAL = {torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}
FINITE = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.tuples(FINITE, FINITE), min_size=1, max_size=40),
    weight=st.floats(0.0, 1.0),
    kernel=st.sampled_from(["reference", "foreach"]),
    pair=st.sampled_from(
        [
            (torch.float32, torch.float32),
            (torch.bfloat16, torch.float32),
            (torch.float32, torch.bfloat16),
            (torch.float16, torch.float16),
            (torch.float64, torch.float64),
        ]
    ),
)
def test_one_update_matches_float64(values, weight, kernel, pair):
    src_dtype, dst_dtype = pair
    s = torch.tensor([v[0] for v in values]).to(dst_dtype)
    p = torch.tensor([v[1] for v in values]).to(src_dtype)
    s64, p64 = s.double(), p.to(dst_dtype).double()  # the source is cast to the shadow's dtype
    exact = s64 + weight * (p64 - s64)
    got = [s.clone()]
    _kernels.build(kernel, got, [p]).lerp_(weight)
    scale = torch.maximum(s64.abs(), p64.abs())
    if dst_dtype == torch.float64:
        bound = 2.0**-50 * scale
    else:
        bound = 2.0**-22 * scale + HALF_ULP[dst_dtype] * exact.abs() + HALF_SUBNORMAL[dst_dtype]
    assert ((got[0].double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("kernel", ALL_KERNELS)
@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_fifty_updates_match_the_float64_closed_form(kernel, src, dst):
    """From s0 towards a fixed p with weight w: s_N = p + (s0 - p) (1 - w)**N, in float64."""
    gen = torch.Generator().manual_seed(21)
    start = torch.randn(257, generator=gen, dtype=torch.float64)
    target = (torch.randn(257, generator=gen, dtype=torch.float64) * 3).to(src)
    shadows = [start.to(dst, copy=True)]
    s0, p = start.to(dst).double(), target.double()  # start itself is never written
    update = _kernels.build(kernel, shadows, [target])
    n, w = 50, 0.1
    for _ in range(n):
        update.lerp_(w)
    exact = p + (s0 - p) * (1 - w) ** n
    eps = 2.0**-52 if dst == torch.float64 else 2.0**-23
    bound = 4 * n * eps * torch.maximum(s0.abs(), p.abs())  # each step: a few roundings
    assert ((shadows[0].double() - exact).abs() <= bound).all()
    # and the bound is not vacuous: (1 - w)**n is 5e-3, so the shadows moved far from the start
    assert ((shadows[0].double() - s0).abs() > 100 * bound).any()


def test_copy_is_exact():
    sources, shadows = make(torch.float32, torch.float32)
    _kernels.build("foreach", shadows, sources).copy_()
    assert all(torch.equal(a, b) for a, b in zip(shadows, sources, strict=True))


def test_mixed_dtypes_chunk_through_a_bounded_scratch(monkeypatch):
    monkeypatch.setattr(_foreach, "SCRATCH_ELEMENTS", {"cpu": 64})
    sources, shadows = make(torch.bfloat16, torch.float32)
    ref_shadows = [s.clone() for s in shadows]
    update = _kernels.build("foreach", shadows, sources)
    assert update.scratch[0].numel() == 1000  # the largest tensor sets the floor
    assert len(update.mixed) >= 2
    update.lerp_(0.3)
    _kernels.build("reference", ref_shadows, sources).lerp_(0.3)
    assert all(torch.equal(a, b) for a, b in zip(shadows, ref_shadows, strict=True))


def test_foreach_update_allocates_nothing_per_step():
    """The scratch is planned once: the update's storages are the same before and after."""
    sources, shadows = make(torch.bfloat16, torch.float32)
    update = _kernels.build("foreach", shadows, sources)
    pointers = [t.data_ptr() for t in [*update.scratch, *shadows]]
    for _ in range(3):
        update.lerp_(0.1)
    assert pointers == [t.data_ptr() for t in [*update.scratch, *shadows]]


@pytest.mark.parametrize("kernel", ["reference", "foreach", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rebinding_param_data_is_followed(kernel, dtype):
    """``param.data = other`` / ``set_()`` move the storage of a planned source: the update sees it.

    (Caching detached aliases of the parameters would skip the ~0.4 µs per tensor that a foreach
    op spends parsing an nn.Parameter, but a correct alias needs a data_ptr() check per tensor per
    update, which cost as much once the update has streamed the caches out: measured 2,048 tensors,
    1.14-1.22x raw either way. So the kernels read the live tensors.)
    """
    params = [nn.Parameter(torch.zeros(4, 3, dtype=dtype)) for _ in range(2)]
    shadows = [torch.zeros(4, 3) for _ in params]
    update = _kernels.build(kernel, shadows, params)
    update.lerp_(0.5)
    params[0].data = torch.full((4, 3), 4.0, dtype=dtype)  # new storage, same Parameter object
    with torch.no_grad():
        params[1].set_(torch.full((4, 3), 8.0, dtype=dtype))
    update.lerp_(0.5)
    assert torch.equal(shadows[0], torch.full((4, 3), 2.0))
    assert torch.equal(shadows[1], torch.full((4, 3), 4.0))
    params[1].data = torch.full((4, 3), 6.0, dtype=dtype)
    update.copy_()
    assert torch.equal(shadows[1], torch.full((4, 3), 6.0))


def test_choose():
    assert _kernels.choose("auto", []) == "foreach"
    assert _kernels.choose("reference", []) == "reference"
    with pytest.raises(ValueError, match="unknown kernel 'fast'; expected one of"):
        _kernels.choose("fast", [])
    bf16, fp32 = [torch.zeros(2, dtype=torch.bfloat16)], [torch.zeros(2)]
    assert _kernels.choose("auto", bf16, capturable=True) == "fused"
    assert _kernels.choose("auto", fp32, capturable=True) == "foreach"
    assert _kernels.choose("foreach", fp32, capturable=True) == "foreach"
    with pytest.raises(ValueError, match="capturable update of torch.bfloat16 shadows"):
        _kernels.choose("foreach", bf16, capturable=True)
    # built directly, the kernel refuses the device weight itself rather than round it to bf16
    update = _kernels.build("foreach", bf16, [torch.ones(2, dtype=torch.bfloat16)])
    update.lerp_(0.5)  # a Python-float weight is read in fp32 by ATen: fine
    with pytest.raises(ValueError, match="capturable update of torch.bfloat16 shadows"):
        update.lerp_(torch.tensor(0.5, dtype=torch.float64))


@pytest.mark.parametrize("kernel", ["reference", "fused"])
@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
    ],
)
def test_a_device_weight_is_read_in_fp32_for_low_precision_shadows(kernel, src, dst):
    """A tensor weight gives the very bits of ATen's ``shadow.lerp_(p, float)`` (fp32 opmath).

    Read in the shadow's dtype instead, ``1 - 0.999`` is ``0.00099945`` in bf16 (199 of 100,000
    results differ after one update) and an fp16 weight of 1e-8 is zero: the EMA would never move.
    """
    gen = torch.Generator().manual_seed(11)
    sources = [(torch.randn(100_000, generator=gen) * 4).to(src), torch.full((8,), 60000.0).to(src)]
    start = [torch.randn(100_000, generator=gen).to(dst), torch.zeros(8, dtype=dst)]
    for w in [1e-3 + 1e-6, 1e-4, 0.3, 0.75]:
        got = [s.clone() for s in start]
        _kernels.build(kernel, got, sources).lerp_(torch.tensor(w, dtype=torch.float64))
        for g, s, p in zip(got, start, sources, strict=True):
            want = s.clone().lerp_(p.to(dst), w)  # ATen, float weight
            if kernel == "reference" or w < 0.01:
                assert torch.equal(g, want), w
            else:  # the compiled lerp may contract w * (p - s) + s into an FMA: one ulp at most
                assert ((g.float() - want.float()).abs() <= update_ulp(want, p).float()).all(), w
    tiny = [s.clone() for s in start]
    _kernels.build(kernel, tiny, sources).lerp_(torch.tensor(1e-8, dtype=torch.float64))
    if dst == torch.float16:
        assert (tiny[1] > 0).all()  # 60000 * 1e-8 = 6e-4 moved the zero shadow


def test_device_mismatch_is_reported():
    if not torch.cuda.is_available():
        a, b = torch.zeros(2), torch.zeros(2, device="meta")
    else:
        a, b = torch.zeros(2), torch.zeros(2, device="cuda")
    with pytest.raises(ValueError, match="call ema.to"):
        _kernels.build("foreach", [a], [b])


# ---------------------------------------------------------------- the fused (compiled) kernel

FUSED_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
]


@pytest.mark.parametrize(("src", "dst"), FUSED_PAIRS)
def test_fused_equals_reference_within_one_ulp_and_1e6_over_1000_updates(src, dst):
    sources, shadows = make(src, dst, seed=3)
    ref_shadows = [s.clone() for s in shadows]
    fused = _kernels.build("fused", shadows, sources)  # one compiled graph, reused for all weights
    ref = _kernels.build("reference", ref_shadows, sources)
    for weight in [1e-4, 0.1, 0.5, 0.9, 1.0, 0.0]:
        bounds = [update_ulp(s, p) for s, p in zip(ref_shadows, sources, strict=True)]
        fused.lerp_(weight)
        ref.lerp_(weight)
        for got, want, bound in zip(shadows, ref_shadows, bounds, strict=True):
            assert ((got - want).abs() <= bound).all(), weight
            got.copy_(want)  # the 1-ulp check is per single update
    assert_close_after_1000_updates(fused, ref, sources, shadows, ref_shadows, seed=4)


def allocated_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_fused_and_foreach_allocate_no_temporaries():
    gen = torch.Generator().manual_seed(5)
    sources = [torch.randn(4096, generator=gen).bfloat16() for _ in range(3)]
    tensor_bytes = sum(s.numel() * 4 for s in sources)
    for kernel in ["fused", "foreach"]:
        shadows = [s.float() for s in sources]
        update = _kernels.build(kernel, shadows, sources)
        update.lerp_(0.1)  # compile / warm up
        assert allocated_bytes(lambda u=update: u.lerp_(0.2)) <= 64, kernel
    # stochastic rounding too: the random bits are made inside the fused loop, never stored
    shadows = [s.clone() for s in sources]
    rounded = _kernels.build("fused", shadows, sources, rounding="stochastic", seed=1)
    rounded.lerp_(0.1)
    assert allocated_bytes(lambda: rounded.lerp_(0.2)) <= 64
    eager = _kernels.build("reference", shadows, sources, rounding="stochastic", seed=1)
    assert allocated_bytes(lambda: eager.lerp_(0.2)) >= tensor_bytes // 3  # bits, fp32 values
    naive = [s.float() for s in sources]
    # the check is not vacuous: the naive upcast allocates a full fp32 copy
    assert (
        allocated_bytes(lambda: torch._foreach_lerp_(naive, [s.float() for s in sources], 0.1))
        >= tensor_bytes
    )


def test_fused_takes_a_device_weight_without_recompiling():
    sources, shadows = make(torch.float32, torch.float32, seed=6)
    ref_shadows = [s.clone() for s in shadows]
    fused = _kernels.build("fused", shadows, sources)
    ref = _kernels.build("reference", ref_shadows, sources)
    for value in [0.25, 0.5, 0.125]:
        fused.lerp_(torch.tensor(value, dtype=torch.float64))
        ref.lerp_(value)
    for got, want, source in zip(shadows, ref_shadows, sources, strict=True):
        assert ((got - want).abs() <= 3 * update_ulp(want, source)).all()


def test_foreach_and_reference_take_a_device_weight():
    sources, shadows = make(torch.bfloat16, torch.float32, seed=7)
    a, b = [s.clone() for s in shadows], [s.clone() for s in shadows]
    _kernels.build("foreach", a, sources).lerp_(torch.tensor(0.3, dtype=torch.float64))
    _kernels.build("reference", b, sources).lerp_(0.3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_is_unbiased_over_a_million_elements():
    n = 1 << 20
    start = torch.full((n,), 1.0, dtype=torch.bfloat16)
    target = torch.full((n,), 1.0 + 2**-8, dtype=torch.float32)  # not a bf16 value
    shadows = [start.clone()]
    update = _kernels.build("fused", shadows, [target], rounding="stochastic", seed=11)
    update.lerp_(0.5)  # exact fp32 result 1 + 2**-9: between bf16 neighbours 1 and 1 + 2**-7
    values = shadows[0].float()
    assert set(values.unique().tolist()) == {1.0, 1.0 + 2**-7}
    p_up = (values > 1).double().mean().item()
    assert abs(p_up - 0.25) < 5 * (0.25 * 0.75 / n) ** 0.5  # P(up) = (2**-9) / (2**-7)
    # the mean is 1 + p_up * 2**-7: the same 5-sigma bound (a fixed 5e-6 was 1.5 sigma)
    assert abs(values.double().mean().item() - (1 + 2**-9)) < 5 * 2**-7 * (0.25 * 0.75 / n) ** 0.5


def test_stochastic_rounding_float_form_matches_the_integer_definition():
    """trunc16(fp32 bits + b), b = bits16 (x >= 0) or bits16 ^ 0xFFFF: the CPU's float formula."""
    from polyak._kernels._stochastic import round_to_bf16_bits, round_to_bf16_float

    gen = torch.Generator().manual_seed(3)
    n = 1 << 18
    exponent = torch.randint(9, 232, (n,), dtype=torch.int32, generator=gen)  # 2**-118..2**105
    mantissa = torch.randint(0, 1 << 23, (n,), dtype=torch.int32, generator=gen)
    sign = torch.randint(0, 2, (n,), dtype=torch.int32, generator=gen) << 31
    raw = sign | (exponent << 23) | mantissa
    raw[:4096] &= -(1 << 31)  # zeros of both signs
    raw[4096:8192] &= -(1 << 16)  # exact bf16 values
    raw[8192:12288] |= 0xFFFF  # a carry out of every low half
    bits = torch.randint(0, 1 << 16, (n,), dtype=torch.int32, generator=gen)
    x = raw.view(torch.float32)
    got, want = round_to_bf16_float(x, bits), round_to_bf16_bits(x, bits)
    same_bits = got.view(torch.int16) == want.view(torch.int16)
    assert bool((same_bits | ((got == 0) & (want == 0))).all())  # a zero may lose its sign
    # the integer form by hand, for a few values: 1 + 2**-9 rounds up iff bits16 >= 2**16 - 2**14
    one_plus = torch.full((4,), 1 + 2**-9)
    b = torch.tensor([0, 49151, 49152, 65535], dtype=torch.int32)
    up = round_to_bf16_bits(one_plus, b).float() > 1
    assert up.tolist() == [False, False, True, True]
    assert torch.equal(up, round_to_bf16_float(one_plus, b).float() > 1)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -1e35])
    for form in (round_to_bf16_bits, round_to_bf16_float):
        out = form(special, torch.full((5,), 65535, dtype=torch.int32)).float()
        assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf")
        assert out[3:].isfinite().all()


def test_stochastic_rounding_in_two_groups_draws_one_key_per_update():
    """bf16 shadows of bf16 and of fp32 weights: two groups on one device, the reference's bits."""
    gen = torch.Generator().manual_seed(4)
    sources = [torch.randn(300, generator=gen).bfloat16(), torch.randn(200, generator=gen)]
    a = [torch.randn(s.shape, generator=gen).bfloat16() for s in sources]
    b = [t.clone() for t in a]
    fused = _kernels.build("fused", a, sources, rounding="stochastic", seed=5)
    ref = _kernels.build("reference", b, sources, rounding="stochastic", seed=5)
    for weight in [0.01, 0.3, 0.01]:
        fused.lerp_(weight)
        ref.lerp_(weight)
    mismatched = sum((x != y).sum().item() for x, y in zip(a, b, strict=True))
    assert mismatched <= 2  # the fp32 lerp may differ by an ulp before rounding, rarely


def test_stochastic_rounding_of_tiny_values_survives_flushing_subnormals():
    """A zero or tiny shadow never turns NaN, even with subnormals flushed to zero."""
    from polyak._kernels._stochastic import round_to_bf16_float

    x = torch.tensor([0.0, -0.0, 1e-40, -1e-38, 2.0**-119, 1e-30])
    bits = torch.tensor([0, 65535, 40000, 123, 65535, 30000], dtype=torch.int32)
    flushed = torch.set_flush_denormal(True)  # False where the CPU cannot flush
    try:
        out = round_to_bf16_float(x, bits).float()
    finally:
        torch.set_flush_denormal(False)
    assert out.isfinite().all(), (flushed, out)
    assert (out.abs() <= 2 * x.abs() + 2.0**-125).all()


def test_stochastic_rounding_is_deterministic_per_seed_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    src = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    runs = []
    for seed in [3, 3, 4]:
        shadow = [src.bfloat16()]
        update = _kernels.build("fused", shadow, [src + 1e-3], rounding="stochastic", seed=seed)
        for _ in range(3):
            update.lerp_(0.01)
        runs.append(shadow[0])
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert torch.equal(torch.get_rng_state(), rng)


def test_reference_stochastic_path_draws_the_same_bits_as_fused():
    src = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    a, b = [src.bfloat16()], [src.bfloat16()]
    _kernels.build("fused", a, [src + 1e-3], rounding="stochastic", seed=9).lerp_(0.01)
    _kernels.build("reference", b, [src + 1e-3], rounding="stochastic", seed=9).lerp_(0.01)
    # identical random bits; the fp32 lerp may differ by an ulp before rounding in rare cases
    assert (a[0] != b[0]).double().mean().item() < 1e-3


def shard_plans(kernel: str):
    """Two ranks' stochastic updates of their rows of a (6, 4) and a (6,) tensor, two slots, and
    the update of the full tensors: ``(full slots, full update, [(rank slots, rank update)])``."""
    gen = torch.Generator().manual_seed(3)
    full = [torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)]
    targets = [t + 1e-3 * torch.randn(t.shape, generator=gen) for t in full]
    whole = [[t.bfloat16() for t in full] for _ in range(2)]
    update = _kernels.build(kernel, whole, targets, rounding="stochastic", seed=4)
    ranks = []
    for rows in (slice(0, 3), slice(3, 6)):
        slots = [[full[0][rows].bfloat16(), full[1][rows].bfloat16()] for _ in range(2)]
        positions = [(24, rows.start * 4), (6, rows.start)]
        sources = [targets[0][rows], targets[1][rows]]
        kwargs = {"rounding": "stochastic", "seed": 4, "positions": positions}
        ranks.append((slots, _kernels.build(kernel, slots, sources, **kwargs)))
    return whole, update, ranks


def test_stochastic_shards_draw_their_full_tensors_bits():
    """Shards updated apart (FSDP2's ranks, each its rows of every tensor), placed by
    ``positions`` (full numel, start of the block), round bit for bit as the full tensors updated
    at once, two slots included; without positions every rank would draw the first rows' bits."""
    whole, update, ranks = shard_plans("reference")
    for _ in range(3):
        update.lerp_([0.3, 0.1])
        for _, shard_update in ranks:
            shard_update.lerp_([0.3, 0.1])
    for k in range(2):
        for i in range(2):
            gathered = torch.cat([ranks[0][0][k][i], ranks[1][0][k][i]])
            assert torch.equal(gathered.view(torch.int16), whole[k][i].view(torch.int16)), (k, i)


def test_fused_plans_the_shards_stream_offsets():
    """The fused kernel keeps the reference's stream offsets for shards (checked on the plan: the
    compiled update draws at the offsets it is given, see test_fused)."""
    # rank r's rows start at 12r of the (6, 4) tensor and 3r of the (6,) one, which starts at 24;
    # slot 1 is shifted by one slot's 30 elements
    expected = [[[0, 24], [30, 54]], [[12, 27], [42, 57]]]
    for plans in (shard_plans("reference")[2], shard_plans("fused")[2]):
        offsets = [update.offsets for _, update in plans]
        assert offsets in (expected, [[e] for e in expected])  # fused: per (device, dtype) group


def test_stochastic_bf16_shadows_track_float64_over_2000_steps():
    """E[shadow] follows the float64 EMA: bias < 1% of the drift, where nearest rounding stalls."""
    n, steps, decay = 1 << 16, 2000, 0.999
    gen = torch.Generator().manual_seed(8)
    start = torch.rand(n, generator=gen) + 1.0
    start = start.bfloat16().float()  # representable starting point
    target = start + 0.01  # a slow drift: each step moves 1e-5, far below bf16's 2**-8 spacing
    stochastic = [start.bfloat16()]
    nearest = [start.bfloat16()]
    sr = _kernels.build("fused", stochastic, [target], rounding="stochastic", seed=1)
    rn = _kernels.build("foreach", nearest, [target.bfloat16()])
    for _ in range(steps):
        sr.lerp_(1 - decay)
        rn.lerp_(1 - decay)
    exact = target.double() + (start.double() - target.double()) * decay**steps
    drift = (exact - start.double()).mean().item()
    bias = (stochastic[0].double() - exact).mean().item()
    assert abs(bias) < 0.01 * drift
    assert (nearest[0].double() - start.double()).abs().max().item() == 0.0  # stalled


def test_stochastic_needs_bf16_shadows():
    with pytest.raises(ValueError, match="stochastic rounding needs bf16 shadows"):
        _kernels.build("fused", [torch.zeros(3)], [torch.zeros(3)], rounding="stochastic")
    with pytest.raises(ValueError, match="cannot round stochastically"):
        _kernels.choose("foreach", [], rounding="stochastic")
    assert _kernels.choose("auto", [], rounding="stochastic") == "fused"


@pytest.mark.parametrize(
    ("device_types", "dtype", "rounding", "capturable", "fits", "want"),
    [
        # CUDA, Triton fits: triton, for every case (issue 12's H200 rows)
        ({"cuda"}, torch.float32, "nearest", False, True, "triton"),
        ({"cuda"}, torch.bfloat16, "nearest", True, True, "triton"),
        ({"cuda"}, torch.bfloat16, "stochastic", False, True, "triton"),
        # CUDA without Triton (not installed, or a pair laid out differently): as on the CPU
        ({"cuda"}, torch.float32, "nearest", False, False, "foreach"),
        ({"cuda"}, torch.float32, "nearest", True, False, "foreach"),
        ({"cuda"}, torch.bfloat16, "nearest", True, False, "fused"),
        ({"cuda"}, torch.bfloat16, "stochastic", False, False, "fused"),
        # off CUDA Triton is never taken, even where it would fit (its interpreter is for tests)
        ({"cpu"}, torch.float32, "nearest", False, True, "foreach"),
        ({"cpu"}, torch.bfloat16, "nearest", True, True, "fused"),
        ({"cpu"}, torch.bfloat16, "stochastic", False, True, "fused"),
        ({"cpu", "cuda"}, torch.float32, "nearest", False, True, "foreach"),
    ],
)
def test_auto_rule(device_types, dtype, rounding, capturable, fits, want):
    """The rule for ``auto``, set from the H200 measurements (issue 12): Triton on CUDA wherever
    it fits (steady time 1.05x / 1.14x the floor against foreach's 1.16x / 2.17x on the 1.31B fp32
    / bf16 models, first update under a second); ``fused`` (compiles per tensor, over 45 s on the
    1.31B model) only off CUDA, where nothing else rounds stochastically or reads a device weight
    in fp32 for bf16 shadows."""
    got = _kernels.auto_kernel(
        device_types=device_types,
        dtypes={dtype},
        rounding=rounding,
        capturable=capturable,
        triton_fits=fits,
    )
    assert got == want


def test_auto_asks_whether_triton_fits_only_for_cuda_shadows(monkeypatch):
    asked = []
    monkeypatch.setattr(_kernels, "_triton_fits", lambda sh, src: asked.append(len(sh)) or True)
    assert _kernels.choose("auto", [torch.zeros(2)]) == "foreach"
    assert asked == []


def test_triton_fits_checks_each_pair(monkeypatch):
    """``auto`` falls back to foreach, instead of failing, for pairs Triton cannot take."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets Triton's checks accept CPU tensors
    shadow = torch.zeros(3, 4)
    assert _kernels._triton_fits([shadow], [torch.ones(3, 4)])
    assert not _kernels._triton_fits([shadow], [torch.ones(4, 3).t()])  # laid out differently
    assert not _kernels._triton_fits([torch.zeros(3, dtype=torch.float8_e4m3fn)], [torch.zeros(3)])
    assert not _kernels._triton_fits([], [])
    monkeypatch.setattr(_kernels, "_has_triton", lambda: False)
    assert not _kernels._triton_fits([shadow], [torch.ones(3, 4)])


def test_auto_chooses_again_when_the_shadows_move(monkeypatch):
    """``kernel="auto"`` is re-chosen by ``ema.to(device)`` (emulated: the rule is made to pick
    ``reference`` for meta tensors); an explicit kernel stays as asked."""
    import polyak

    real = _kernels.auto_kernel

    def by_device(**kw):
        return "reference" if kw["device_types"] == {"meta"} else real(**kw)

    monkeypatch.setattr(_kernels, "auto_kernel", by_device)
    model = nn.Linear(3, 2)
    auto, fixed = polyak.EMA(model), polyak.EMA(model, kernel="foreach")
    assert auto.kernel == fixed.kernel == "foreach"
    model.to("meta")
    auto.to("meta")
    fixed.to("meta")
    assert auto.kernel == "reference" and fixed.kernel == "foreach"
