"""The foreach kernel with N slots and a gate, against ATen's per-tensor lerp (one slot at a time)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polyak import _kernels
from polyak._kernels import _foreach

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (runs on the GPU machine)")

PAIRS = [  # (source dtype, shadow dtype)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float64, torch.float64),
]
FP32_UP = (torch.float32, torch.float64)  # shadows that take device weights in foreach
SHAPE = st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple)
WEIGHT = st.sampled_from([0.0, 1e-4, 0.1, 0.3, 0.5, 0.7, 0.999, 1.0]) | st.floats(0.0, 1.0)


def aten_lerp(shadow: torch.Tensor, source: torch.Tensor, weight: float) -> torch.Tensor:
    """One slot's update by definition: ``shadow.lerp_(source.to(shadow.dtype), w)`` (ATen)."""
    return shadow.clone().lerp_(source.to(shadow.dtype), weight)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN payloads, the sign of zero), not ``==``."""
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(bits), b.view(bits))


def same_result(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, except that a computed NaN may differ in sign and payload.

    ATen's vectorised and scalar loops (which elements take which depends on where a tensor is
    cut, and on the thread count) round a bf16/fp16 NaN result to different NaN patterns.
    """
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    equal = a.view(bits) == b.view(bits)
    return a.dtype == b.dtype and bool((equal | (a.isnan() & b.isnan())).all())


def draw(shapes, src, dst, slots, seed):
    gen = torch.Generator().manual_seed(seed)
    sources = [(torch.randn(s, generator=gen) * 3).to(src) for s in shapes]
    shadows = [[torch.randn(s, generator=gen).to(dst) for s in shapes] for _ in range(slots)]
    return sources, shadows


def special_shadows(shapes, dst):
    """Shadows holding -0.0, +-inf, NaN and subnormals: bits a careless select would change."""
    specials = [-0.0, 0.0, math.inf, -math.inf, math.nan, 1e-40, -3.5]
    out = []
    for shape in shapes:
        n = math.prod(shape)
        values = torch.tensor([specials[i % len(specials)] for i in range(n)], dtype=torch.float64)
        out.append(values.to(dst).view(shape))
    return out


def allocated_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


# ---------------------------------------------------------------- N slots


@settings(max_examples=80, deadline=None)
@given(
    shapes=st.lists(SHAPE, min_size=1, max_size=6),
    pair=st.sampled_from(PAIRS),
    weights=st.lists(WEIGHT, min_size=1, max_size=4),
    tensor_weights=st.booleans(),
    stacked=st.booleans(),
    chunk=st.sampled_from([1, 7, 64, 1 << 20]),
    stack=st.sampled_from([0, 40, 1 << 15]),
    seed=st.integers(0, 2**16),
)
def test_n_slots_equal_n_one_slot_updates_bit_for_bit(
    shapes, pair, weights, tensor_weights, stacked, chunk, stack, seed
):
    """Slot k after one N-slot update is ATen's ``lerp_`` of slot k alone, bit for bit, whatever
    the chunking (``chunk`` elements: 1 cuts every tensor into single elements) and whether the
    slots are separate tensors or rows of one ``(N, *shape)`` tensor per source (updated as rows
    up to ``stack`` elements, slot by slot above)."""
    src, dst = pair
    if dst not in FP32_UP:
        tensor_weights = False  # refused for bf16/fp16 shadows (test_device_weights_...)
    sources, slots = draw(shapes, src, dst, len(weights), seed)
    if stacked:
        slots = stack_slots(slots)
    want = [
        [aten_lerp(s, p, w) for s, p in zip(slot, sources, strict=True)]
        for slot, w in zip(slots, weights, strict=True)
    ]
    passed = [torch.tensor(w, dtype=torch.float64) for w in weights] if tensor_weights else weights
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(_foreach.CHUNK_ELEMENTS, "cpu", chunk)
        mp.setattr(_foreach, "STACK_ELEMENTS", stack)
        update = _kernels.build("foreach", slots, sources)
    update.lerp_(passed)
    for got_slot, want_slot in zip(slots, want, strict=True):
        assert all(same_result(g, w) for g, w in zip(got_slot, want_slot, strict=True))


def stack_slots(slots):
    """The same shadows as rows: slot k's shadow i becomes ``torch.stack(...)[k]``."""
    stacks = [torch.stack(t) for t in zip(*slots, strict=True)]
    return [[stack[k] for stack in stacks] for k in range(len(slots))]


def test_stacked_slots_are_found_only_where_the_rows_lie_apart():
    shapes = [(3,), (4, 5), ()]
    sources, slots = draw(shapes, torch.float32, torch.float32, 3, 1)
    plan = _kernels.build("foreach", stack_slots(slots), sources).chunked
    assert plan.stacked is not None
    assert [tuple(r.shape) for r in plan.stacked] == [(3, 3), (3, 4, 5), (3,)]
    assert _kernels.build("foreach", slots, sources).chunked.stacked is None  # separate tensors
    low_sources, low = draw(shapes, torch.bfloat16, torch.bfloat16, 2, 1)
    assert _kernels.build("foreach", stack_slots(low), low_sources).chunked.stacked is None
    wide = torch.zeros(2, 8)
    rows = [[wide[0, :4]], [wide[1, :4]]]  # rows 8 elements apart, 4 used: apart, not dense
    assert _kernels.build("foreach", rows, [torch.ones(4)]).chunked.stacked is not None
    overlap = torch.zeros(6)
    rows = [[overlap[0:4]], [overlap[2:6]]]  # two elements shared: would be lerped twice
    assert _kernels.build("foreach", rows, [torch.ones(4)]).chunked.stacked is None
    reversed_rows = stack_slots(slots)[::-1]  # row 2 first: a negative step
    assert _kernels.build("foreach", reversed_rows, sources).chunked.stacked is None
    # rows are a CPU path: elsewhere (meta here, standing for CUDA, where a broadcast source
    # would leave the multi-tensor fast path) stacked slots are lerped slot by slot
    meta = torch.zeros(2, 5, device="meta")
    plan = _kernels.build("foreach", [[meta[0]], [meta[1]]], [meta[0].clone()]).chunked
    assert plan.stacked is not None
    assert [(len(c.rows), len(c.slots)) for c in plan.chunks] == [(0, 2)]


def test_one_slot_stays_on_todays_path():
    """One slot (a flat list, or a list of one list) plans the per-group calls, no chunk plan."""
    sources, slots = draw([(3,), (4, 5)], torch.bfloat16, torch.float32, 1, 0)
    for shadows in (slots[0], slots):
        update = _kernels.build("foreach", shadows, sources)
        assert update.chunked is None and update.mixed and not update.same
    two = _kernels.build("foreach", [slots[0], [s.clone() for s in slots[0]]], sources)
    assert two.chunked is not None and not two.same and not two.mixed


def test_n_slots_with_one_weight_list_or_a_bare_weight():
    """``lerp_(w)``, ``lerp_([w])`` and ``lerp_((w,))`` are the same one-slot update."""
    sources, slots = draw([(5,), (2, 3)], torch.float32, torch.float32, 1, 1)
    results = []
    for weights in (0.25, [0.25], (0.25,), torch.tensor(0.25, dtype=torch.float64)):
        shadows = [s.clone() for s in slots[0]]
        _kernels.build("foreach", shadows, sources).lerp_(weights)
        results.append(shadows)
    assert all(all(map(same_bits, r, results[0])) for r in results)
    assert all(
        same_bits(g, aten_lerp(s, p, 0.25))
        for g, s, p in zip(results[0], *slots, sources, strict=True)
    )


@pytest.mark.parametrize("gated", [False, True])
def test_cut_tensors_follow_a_rebound_parameter(monkeypatch, gated):
    """``param.data = other`` after planning: the N-slot plan's cut views see the new storage
    (and so do the device-gated path's, planned separately)."""
    monkeypatch.setitem(_foreach.CHUNK_ELEMENTS, "cpu", 5)
    if gated:
        monkeypatch.setattr(_foreach, "HOST_GATE_DEVICES", frozenset())
    gate = torch.tensor(False) if gated else None
    params = [nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(2))]
    slots = [[torch.zeros(4, 3), torch.zeros(2)] for _ in range(2)]
    update = _kernels.build("foreach", slots, params)
    assert update.chunked.cut == [0]  # 12 elements in pieces of at most 5
    update.lerp_([0.5, 0.25], gate)
    params[0].data = torch.full((4, 3), 8.0)
    with torch.no_grad():
        params[1].set_(torch.full((2,), 4.0))
    update.lerp_([0.5, 0.25], gate)
    assert torch.equal(slots[0][0], torch.full((4, 3), 4.0))
    assert torch.equal(slots[1][0], torch.full((4, 3), 2.0))
    assert torch.equal(slots[0][1], torch.full((2,), 2.0))
    assert torch.equal(slots[1][1], torch.full((2,), 1.0))
    params[0].data = torch.full((4, 3), 6.0)
    update.copy_()
    assert all(torch.equal(slot[0], torch.full((4, 3), 6.0)) for slot in slots)
    assert all(torch.equal(slot[1], torch.full((2,), 4.0)) for slot in slots)


class Calls:
    """Records the foreach calls an update makes: (op, id of the source list, elements)."""

    def __init__(self, monkeypatch):
        self.log = []
        for name in ("_foreach_lerp_", "_foreach_copy_"):
            real = getattr(torch, name)

            def spy(dst, src, *args, _real=real, _name=name, **kwargs):
                self.log.append((_name, dst, src))
                return _real(dst, src, *args, **kwargs)

            monkeypatch.setattr(torch, name, spy)


def covers_once(pieces, tensors):
    """The pieces are views covering every element of ``tensors`` exactly once."""
    hits = {id(t): torch.zeros(t.numel(), dtype=torch.int64) for t in tensors}
    for piece in pieces:
        for t in tensors:
            start = piece.data_ptr() - t.data_ptr()
            if 0 <= start < t.numel() * t.element_size() and piece.dtype == t.dtype:
                offset = start // t.element_size()
                hits[id(t)][offset : offset + piece.numel()] += 1
                break
        else:
            raise AssertionError("a piece that is no view of a source")
    return all(bool((h == 1).all()) for h in hits.values())


@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
def test_each_source_chunk_is_read_for_every_slot_before_the_next_chunk(monkeypatch, src):
    """What the N-slot plan does per update, call by call: per chunk (at most CHUNK_ELEMENTS
    source elements), the upcast copy once (bf16 sources), then one lerp per slot from the same
    source list; the chunks cover every source element once. The second slot's read of a chunk is
    the one a cache can serve (the timing is not asserted here; see the report in ForeachUpdate)."""
    monkeypatch.setitem(_foreach.CHUNK_ELEMENTS, "cpu", 100)
    sources, slots = draw([(250,), (30,), (40, 2), (7,), (333,)], src, torch.float32, 3, 2)
    update = _kernels.build("foreach", slots, sources)
    calls = Calls(monkeypatch)
    update.lerp_([0.1, 0.2, 0.3])
    mixed = src != torch.float32
    per_chunk = 4 if mixed else 3
    assert len(calls.log) == per_chunk * len(update.chunked.chunks)
    seen, slot_pieces = [], [[] for _ in slots]
    for start in range(0, len(calls.log), per_chunk):
        chunk = calls.log[start : start + per_chunk]
        if mixed:
            op, upcast, read = chunk.pop(0)
            assert op == "_foreach_copy_"
            seen += read
            lerped_from = upcast
        else:
            lerped_from = chunk[0][2]
            seen += lerped_from
        assert [op for op, _, _ in chunk] == ["_foreach_lerp_"] * 3
        assert all(src_list is lerped_from for _, _, src_list in chunk)  # one list, three slots
        assert sum(t.numel() for t in lerped_from) <= 100
        for k, (_, dst, _) in enumerate(chunk):  # slot k's pieces, in slot order
            slot_pieces[k] += dst
    assert covers_once(seen, sources)
    assert all(covers_once(pieces, slot) for pieces, slot in zip(slot_pieces, slots, strict=True))
    assert len(update.chunked.chunks) >= 8  # 250 and 333 were cut


@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
def test_small_stacked_slots_read_each_source_once_per_update(monkeypatch, src):
    """Slots laid out as rows of one tensor per source: the small tensors (N * numel at most
    STACK_ELEMENTS) in one ``_foreach_lerp_`` of their ``(N, ...)`` rows per chunk, so one
    elementwise op reads each of their source elements for all N slots; the large ones slot by
    slot from one source list, as for separate tensors."""
    monkeypatch.setitem(_foreach.CHUNK_ELEMENTS, "cpu", 100)
    monkeypatch.setattr(_foreach, "STACK_ELEMENTS", 3 * 40)
    shapes = [(250,), (30,), (20, 2), (7,), (333,), ()]
    sources, slots = draw(shapes, src, torch.float32, 3, 2)
    slots = stack_slots(slots)
    update = _kernels.build("foreach", slots, sources)
    calls = Calls(monkeypatch)
    update.lerp_([0.1, 0.2, 0.3])
    lerps = [(dst, read) for op, dst, read in calls.log if op == "_foreach_lerp_"]
    row_lerps = [(dst, read) for dst, read in lerps if dst[0].shape[0] == 3 and dst[0].dim() > 0]
    assert len(row_lerps) == 1  # 30 + 40 + 7 + 1 elements: one chunk
    rows, read = row_lerps[0]
    assert [tuple(r.shape) for r in rows] == [(3, 30), (3, 20, 2), (3, 7), (3,)]
    assert sum(t.numel() for t in read) == 78
    per_slot = [(dst, read) for dst, read in lerps if (dst, read) not in row_lerps]
    big = sum(math.ceil(n / 100) for n in (250, 333))  # cut into pieces of at most 100
    assert (
        len(per_slot) == 3 * (len(update.chunked.chunks) - 1) and len(update.chunked.chunks) >= big
    )
    for start in range(0, len(per_slot), 3):
        assert per_slot[start][1] is per_slot[start + 1][1] is per_slot[start + 2][1]
    if src == torch.float32:
        seen = list(read) + [t for _, r in per_slot[::3] for t in r]
    else:
        seen = [t for op, _, r in calls.log if op == "_foreach_copy_" for t in r]
    assert covers_once(seen, sources)


def test_no_allocation_per_update():
    """Two slots, bf16 sources (upcast through the scratch), tensor weights, a device gate:
    after the first update nothing is allocated."""
    gen = torch.Generator().manual_seed(5)
    sources = [torch.randn(4096, generator=gen).bfloat16() for _ in range(3)]
    slots = [[s.float() for s in sources] for _ in range(2)]
    update = _kernels.build("foreach", slots, sources)
    weights = [torch.tensor(0.1, dtype=torch.float64), 0.2]
    update.lerp_(weights)
    assert allocated_bytes(lambda: update.lerp_(weights)) <= 64
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_foreach, "HOST_GATE_DEVICES", frozenset())
        gate = torch.tensor(False)
        update.lerp_(weights, gate)
        assert allocated_bytes(lambda: update.lerp_(weights, gate)) <= 64


def test_device_weights_for_low_precision_shadows_are_refused_with_n_slots():
    sources, slots = draw([(3,)], torch.bfloat16, torch.bfloat16, 2, 3)
    update = _kernels.build("foreach", slots, sources)
    update.lerp_([0.5, 0.25])  # Python floats: read in fp32 by ATen
    with pytest.raises(ValueError, match="capturable update of torch.bfloat16 shadows"):
        update.lerp_([0.5, torch.tensor(0.25, dtype=torch.float64)])


def test_copy_sets_every_slot():
    sources, slots = draw([(3,), (2, 2)], torch.bfloat16, torch.float32, 3, 4)
    _kernels.build("foreach", slots, sources).copy_()
    assert all(
        torch.equal(s, p.float()) for slot in slots for s, p in zip(slot, sources, strict=True)
    )


# ---------------------------------------------------------------- the gate


@pytest.fixture(params=["host", "device"])
def gate_path(request, monkeypatch):
    """``host``: a CPU gate read with .item(); ``device``: the select the CUDA path runs."""
    if request.param == "device":
        monkeypatch.setattr(_foreach, "HOST_GATE_DEVICES", frozenset())
    return request.param


@pytest.mark.parametrize(
    ("src", "dst", "tensor_weights"),
    [(*pair, False) for pair in PAIRS] + [(*pair, True) for pair in PAIRS if pair[1] in FP32_UP],
)
@pytest.mark.parametrize("n", [1, 3])
def test_a_set_gate_leaves_every_shadow_bit_identical(gate_path, src, dst, n, tensor_weights):
    """Sources of NaN and inf (a zero weight would not do: 0 * NaN = NaN), shadows holding -0.0,
    inf, NaN and subnormals: a set gate leaves every bit; a clear gate is the ungated update."""
    shapes = [(3,), (4, 5), (), (2, 3, 3), (40,)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(_foreach.CHUNK_ELEMENTS, "cpu", 16)  # cut the (40,) tensor
        poisoned = [
            torch.tensor([math.nan, math.inf, -math.inf]).repeat(40)[: math.prod(s)].view(s).to(src)
            for s in shapes
        ]
        start = [special_shadows(shapes, dst) for _ in range(n)]
        for k in range(n):
            start[k][1].copy_(torch.randn(4, 5, generator=torch.Generator().manual_seed(k)))
        slots = [[t.clone() for t in slot] for slot in start]
        weights = [0.0, 0.5, 1.0][:n]
        passed = (
            [torch.tensor(w, dtype=torch.float64) for w in weights] if tensor_weights else weights
        )
        update = _kernels.build("foreach", slots, poisoned)
        for _ in range(2):  # the second one runs the planned path again
            update.lerp_(passed, gate=torch.tensor(True))
            for got, want in zip(slots, start, strict=True):
                assert all(map(same_bits, got, want))
        sources, _ = draw(shapes, src, dst, 0, 9)
        update = _kernels.build("foreach", slots, sources)
        update.lerp_(passed, gate=torch.tensor(False))
        for got, was, w in zip(slots, start, weights, strict=True):
            want = [aten_lerp(s, p, w) for s, p in zip(was, sources, strict=True)]
            assert all(map(same_result, got, want))


def test_the_device_gate_is_never_read_on_the_host(monkeypatch, no_host_reads):
    """The device path reads the gate only in tensor ops: .item(), bool() and int() would block
    on CUDA, so here they raise."""
    monkeypatch.setattr(_foreach, "HOST_GATE_DEVICES", frozenset())
    sources, slots = draw([(3,), (50,)], torch.bfloat16, torch.float32, 2, 6)
    update = _kernels.build("foreach", slots, sources)
    gate = torch.tensor(True)
    update.lerp_([0.1, 0.2], gate)  # plan outside the check
    before = [[t.clone() for t in slot] for slot in slots]
    with no_host_reads():
        update.lerp_([0.1, 0.2], gate)
    assert all(all(map(same_bits, a, b)) for a, b in zip(slots, before, strict=True))


def test_a_gate_on_another_device_is_refused():
    sources, slots = draw([(3,)], torch.float32, torch.float32, 2, 7)
    update = _kernels.build("foreach", slots, sources)
    with pytest.raises(ValueError, match=r"the gate is on meta but shadows are on \['cpu'\]"):
        update.lerp_([0.1, 0.2], torch.tensor(True, device="meta"))


@needs_cuda
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
def test_cuda_gate_never_syncs_and_keeps_bits(src):
    gen = torch.Generator().manual_seed(8)
    sources = [torch.randn(s, generator=gen).to(src).cuda() for s in [(1000,), (3, 7), ()]]
    slots = [[torch.randn(p.shape, device="cuda") for p in sources] for _ in range(2)]
    start = [[t.clone() for t in slot] for slot in slots]
    update = _kernels.build("foreach", slots, sources)
    nan = torch.tensor(True, device="cuda")
    update.lerp_([0.1, 0.2], nan)  # plans the scratch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in sources:
            p.fill_(math.nan)
        update.lerp_([0.1, 0.2], nan)
        update.lerp_([torch.tensor(0.1, device="cuda", dtype=torch.float64), 0.2], nan)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, want in zip(slots, start, strict=True):
        assert all(map(same_bits, got, want))


# ---------------------------------------------------------------- the gated copy (write-back)

COPY_PAIRS = [  # (source dtype, target dtype): an average written into a weight
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float64, torch.float64),
    (torch.float32, torch.float64),
]


@pytest.mark.parametrize(("src", "dst"), COPY_PAIRS)
def test_the_gated_copy_is_a_copy_or_nothing_bit_for_bit(gate_path, src, dst):
    """A set gate leaves every target's bits (NaN/inf sources included); a clear gate, or none,
    gives ``target.copy_(source)`` (rounded to the target's dtype), NaN and inf included, also
    for a tensor cut into chunks."""
    shapes = [(3,), (4, 5), (), (2, 3, 3), (40,)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(_foreach.CHUNK_ELEMENTS, "cpu", 16)  # cut the tensors of over 16 elements
        specials = [s.to(src) for s in special_shadows(shapes, torch.float64)]
        start = special_shadows(list(reversed(shapes)), dst)[::-1]
        for gate in (torch.tensor(True), torch.tensor(False), None):
            targets = [t.clone() for t in start]
            sources = [s.clone() for s in specials]
            sources[1].copy_(torch.randn(4, 5, generator=torch.Generator().manual_seed(3)) * 1e3)
            copy = _foreach.GatedCopy(targets, sources)
            for _ in range(2):  # the second one runs the planned path again
                copy.copy_(gate)
            expected = start if gate is not None and bool(gate) else sources
            for got, want in zip(targets, expected, strict=True):
                assert same_bits(got, want.to(dst)), (gate, got, want)
        if gate_path == "device":
            assert copy._gated is None  # an ungated copy plans nothing
            copy.copy_(torch.tensor(False))
            assert copy._gated is not None and copy._gated.cut == [1, 3, 4]  # over 16
            # one scratch per group, of the target dtype: no upcast buffer (the copy casts)
            assert len(copy._gated.scratch) == 1 and copy._gated.scratch[0].dtype == dst


def test_the_gated_copy_follows_a_rebound_target(monkeypatch):
    """``param.data = other`` after planning: the cut views of the device path see the new
    storage."""
    monkeypatch.setitem(_foreach.CHUNK_ELEMENTS, "cpu", 5)
    monkeypatch.setattr(_foreach, "HOST_GATE_DEVICES", frozenset())
    param = nn.Parameter(torch.zeros(4, 3))
    source = torch.arange(12.0).view(4, 3)
    copy = _foreach.GatedCopy([param], [source])
    copy.copy_(torch.tensor(False))
    assert copy._gated.cut == [0] and torch.equal(param, source)
    param.data = torch.full((4, 3), 7.0)
    source.add_(1)
    copy.copy_(torch.tensor(False))
    assert torch.equal(param.detach(), source)
    copy.copy_(torch.tensor(True))
    assert torch.equal(param.detach(), source)


def test_the_device_gated_copy_never_reads_the_gate_nor_allocates(monkeypatch, no_host_reads):
    monkeypatch.setattr(_foreach, "HOST_GATE_DEVICES", frozenset())
    gen = torch.Generator().manual_seed(4)
    targets = [torch.randn(s, generator=gen).bfloat16() for s in [(3,), (4096,)]]
    sources = [torch.randn(t.shape, generator=gen) for t in targets]
    copy = _foreach.GatedCopy(targets, sources)
    gate = torch.tensor(True)
    copy.copy_(gate)  # plans the scratch
    before = [t.clone() for t in targets]
    with no_host_reads():
        copy.copy_(gate)
    assert all(map(same_bits, targets, before))
    assert allocated_bytes(lambda: copy.copy_(gate)) <= 64
    gate.fill_(False)
    with no_host_reads():
        copy.copy_(gate)
    assert all(same_bits(t, s.bfloat16()) for t, s in zip(targets, sources, strict=True))


def test_a_gated_copy_gate_on_another_device_is_refused(monkeypatch):
    monkeypatch.setattr(_foreach, "HOST_GATE_DEVICES", frozenset())
    copy = _foreach.GatedCopy([torch.zeros(3)], [torch.ones(3)])
    with pytest.raises(ValueError, match=r"the gate is on meta but the tensors are on \['cpu'\]"):
        copy.copy_(torch.tensor(True, device="meta"))
