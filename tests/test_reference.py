"""The reference kernel with N slots and a gate, against ATen's per-tensor lerp and the stream."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_foreach import (
    PAIRS,
    SHAPE,
    WEIGHT,
    aten_lerp,
    draw,
    same_bits,
    same_result,
    special_shadows,
)

from polyak import _kernels
from polyak._kernels._stochastic import stochastic_lerp_

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (runs on the GPU machine)")


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(SHAPE, min_size=1, max_size=6),
    pair=st.sampled_from(PAIRS),
    weights=st.lists(WEIGHT, min_size=1, max_size=4),
    tensor_weights=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_n_slots_equal_n_one_slot_updates_bit_for_bit(shapes, pair, weights, tensor_weights, seed):
    """Slot k is ATen's ``s.lerp_(p.to(s.dtype), float(w_k))``, for float and 0-dim fp64 tensor
    weights alike (a tensor weight is read in fp32, as ATen reads a float one)."""
    src, dst = pair
    sources, slots = draw(shapes, src, dst, len(weights), seed)
    want = [
        [aten_lerp(s, p, w) for s, p in zip(slot, sources, strict=True)]
        for slot, w in zip(slots, weights, strict=True)
    ]
    passed = [torch.tensor(w, dtype=torch.float64) for w in weights] if tensor_weights else weights
    _kernels.build("reference", slots, sources).lerp_(passed)
    for got_slot, want_slot in zip(slots, want, strict=True):
        assert all(same_bits(g, w) for g, w in zip(got_slot, want_slot, strict=True))


@pytest.mark.parametrize(("src", "dst"), PAIRS)
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("tensor_weights", [False, True])
def test_a_set_gate_leaves_every_shadow_bit_identical(src, dst, n, tensor_weights):
    """NaN/inf sources, shadows holding -0.0, inf, NaN, subnormals: a set gate keeps every bit;
    a clear gate writes the ungated update's bits."""
    shapes = [(3,), (4, 5), (), (2, 3, 3)]
    poisoned = [
        torch.tensor([math.nan, math.inf, -math.inf]).repeat(20)[: math.prod(s)].view(s).to(src)
        for s in shapes
    ]
    start = [special_shadows(shapes, dst) for _ in range(n)]
    slots = [[t.clone() for t in slot] for slot in start]
    weights = [0.0, 0.5][:n] if n == 2 else [1.0]
    passed = [torch.tensor(w, dtype=torch.float64) for w in weights] if tensor_weights else weights
    update = _kernels.build("reference", slots, poisoned)
    for _ in range(2):
        update.lerp_(passed, gate=torch.tensor(True))
        for got, want in zip(slots, start, strict=True):
            assert all(map(same_bits, got, want))
    sources, _ = draw(shapes, src, dst, 0, 3)
    _kernels.build("reference", slots, sources).lerp_(passed, gate=torch.tensor(False))
    for got, was, w in zip(slots, start, weights, strict=True):
        want = [aten_lerp(s, p, w) for s, p in zip(was, sources, strict=True)]
        assert all(map(same_result, got, want))


def test_the_gate_is_never_read_on_the_host(no_host_reads):
    sources, slots = draw([(3,), (5, 2)], torch.bfloat16, torch.float32, 2, 4)
    update = _kernels.build("reference", slots, sources)
    gate = torch.tensor(True)
    update.lerp_([0.1, 0.2], gate)  # the scratch is planned at the first gated update
    before = [[t.clone() for t in slot] for slot in slots]
    with no_host_reads():
        update.lerp_([0.1, 0.2], gate)
    assert all(all(map(same_bits, a, b)) for a, b in zip(slots, before, strict=True))


def test_gating_adds_no_allocation():
    """Same-dtype pairs and float weights allocate nothing in a gated update (after the first),
    as in an ungated one: the result scratch is planned once."""
    from test_foreach import allocated_bytes

    sources, slots = draw([(4096,), (100,)], torch.float32, torch.float32, 2, 5)
    update = _kernels.build("reference", slots, sources)
    gate = torch.tensor(False)
    update.lerp_([0.1, 0.2], gate)
    assert allocated_bytes(lambda: update.lerp_([0.1, 0.2], gate)) <= 64
    assert update._scratch[(torch.device("cpu"), torch.float32)].numel() == 4096


# ---------------------------------------------------------------- stochastic rounding


def sr_sources(seed):
    """fp32 sources, bf16 shadows elsewhere: results fall between bf16 neighbours, rounded at random."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(300,), (7, 11), ()]
    sources = [torch.randn(s, generator=gen) for s in shapes]
    start = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    return sources, start


def test_stochastic_slot_0_draws_todays_bits_and_slot_k_the_stream_shifted_by_k_slots():
    """Slot 0 of a 3-slot update is a one-slot update (same seed) bit for bit; slot k is
    ``stochastic_lerp_`` at offset ``k * T + offset_i`` (T: one slot's elements): exactly a one-slot
    update of the three slots' shadows concatenated into one list. Slots started alike end apart."""
    sources, start = sr_sources(1)
    slots = [[t.clone() for t in start] for _ in range(3)]
    update = _kernels.build("reference", slots, sources, rounding="stochastic", seed=7)
    one = [t.clone() for t in start]
    single = _kernels.build("reference", one, sources, rounding="stochastic", seed=7)
    concat = [t.clone() for _ in range(3) for t in start]
    flat = _kernels.build("reference", concat, sources * 3, rounding="stochastic", seed=7)
    by_hand = [[t.clone() for t in start] for _ in range(3)]
    total = sum(t.numel() for t in start)
    for step, weights in enumerate([[0.01] * 3, [0.3, 0.01, 0.5]], start=1):
        update.lerp_(weights)
        single.lerp_(weights[0])
        for k, slot in enumerate(by_hand):
            offset = k * total
            for shadow, source in zip(slot, sources, strict=True):
                w = torch.tensor(weights[k], dtype=torch.float64)
                stochastic_lerp_(shadow, source, w, torch.tensor(7), torch.tensor(step), offset)
                offset += shadow.numel()
        assert all(map(same_bits, slots[0], one))
        for got, want in zip(slots, by_hand, strict=True):
            assert all(map(same_bits, got, want))
        if step == 1:  # one weight for all slots: the concatenated one-slot update is the same
            flat.lerp_(0.01)
            assert all(map(same_bits, [t for slot in slots for t in slot], concat))
            assert not torch.equal(slots[0][0], slots[1][0])  # the same start, other bits


def test_stochastic_counter_advances_at_gated_updates_too():
    """A gated update keeps the shadows and still moves the stream on: the next update draws the
    counter-2 bits, as if the gated one had run."""
    sources, start = sr_sources(2)
    gated = [[t.clone() for t in start] for _ in range(2)]
    update = _kernels.build("reference", gated, sources, rounding="stochastic", seed=3)
    update.lerp_([0.1, 0.2], gate=torch.tensor(True))
    assert all(all(map(same_bits, slot, start)) for slot in gated)
    update.lerp_([0.1, 0.2])
    device = torch.device("cpu")
    assert int(update.state.counters[device]) == 2
    by_hand = [[t.clone() for t in start] for _ in range(2)]
    total = sum(t.numel() for t in start)
    for k, slot in enumerate(by_hand):
        offset = k * total
        for shadow, source in zip(slot, sources, strict=True):
            w = torch.tensor([0.1, 0.2][k], dtype=torch.float64)
            stochastic_lerp_(shadow, source, w, torch.tensor(3), torch.tensor(2), offset)
            offset += shadow.numel()
    for got, want in zip(gated, by_hand, strict=True):
        assert all(map(same_bits, got, want))


@needs_cuda
def test_cuda_gate_never_syncs():
    gen = torch.Generator().manual_seed(8)
    sources = [torch.randn(s, generator=gen).cuda() for s in [(1000,), (3, 7), ()]]
    slots = [[torch.randn(p.shape, device="cuda") for p in sources] for _ in range(2)]
    start = [[t.clone() for t in slot] for slot in slots]
    update = _kernels.build("reference", slots, sources)
    gate = torch.tensor(True, device="cuda")
    update.lerp_([0.1, 0.2], gate)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in sources:
            p.fill_(math.nan)
        update.lerp_([0.1, 0.2], gate)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, want in zip(slots, start, strict=True):
        assert all(map(same_bits, got, want))
