"""The fused (torch.compile) kernel with N slots and a gate.

N-slot updates against one-slot updates and closed forms, the gate against NaN and inf sources,
the slot-shifted stochastic stream against its eager definition (``._stochastic``), and the
generated code against the claim that each source is read once for all slots. Every compiled
case costs seconds on a small CPU, so the cases are few and small.
"""

from __future__ import annotations

import re

import pytest
import torch

from polyak._kernels._fused import FusedUpdate
from polyak._kernels._stochastic import stochastic_lerp_, stream_offsets


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (NaN payloads and the sign of zero included)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_bits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(bits(g), bits(w)), i


def clones(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def pairs(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Sources and one slot of shadows in two groups: fp32 shadows of bf16 weights (one of them
    0-dim) and bf16 shadows of fp32 weights (the source is rounded to bf16 first)."""
    gen = torch.Generator().manual_seed(seed)
    sources = [
        torch.randn(37, generator=gen).bfloat16(),
        torch.randn((), generator=gen).bfloat16(),
        torch.randn(5, 3, generator=gen),
    ]
    shadows = [
        torch.randn(37, generator=gen),
        torch.randn((), generator=gen),
        torch.randn(5, 3, generator=gen).bfloat16(),
    ]
    return sources, shadows


def test_two_slots_equal_two_one_slot_updates_bit_for_bit():
    """Each slot of a 2-slot update is what today's one-slot update gives it, for both lerp
    branches (w < 0.5 and w >= 0.5), with float and device weights mixed."""
    sources, start0 = pairs(0)
    _, start1 = pairs(1)
    slots = [clones(start0), clones(start1)]
    two = FusedUpdate(slots, sources)
    scratch = clones(start0)
    one = FusedUpdate(scratch, sources)  # today's form: a plain list is one slot
    want = [clones(start0), clones(start1)]
    for weights in [(0.1, 0.7), (torch.tensor(0.9, dtype=torch.float64), 0.25)]:
        two.lerp_(list(weights))
        for k, weight in enumerate(weights):
            torch._foreach_copy_(scratch, want[k])
            one.lerp_(weight)
            torch._foreach_copy_(want[k], scratch)
        for k in range(2):
            assert_same_bits(slots[k], want[k])
    # and the one-slot update moved the shadows at all (bf16 shadows round: compare loosely)
    for got, s, p in zip(want[0], start0, sources, strict=True):
        first = s.double() + 0.1 * (p.to(s.dtype).double() - s.double())
        exact = first + 0.9 * (p.to(s.dtype).double() - first)
        torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=1e-2)


def test_gate_leaves_every_shadow_bit_identical_with_nan_and_inf_sources():
    inf, nan = float("inf"), float("nan")
    source = torch.tensor([nan, inf, -inf, 1.0, 2.0, -3.0, nan, 0.5])
    shadow = torch.tensor([1.0, -2.0, 0.5, inf, -0.0, 1e-40, 0.0, -inf])
    odd_nan = torch.tensor([0x7F800001, -1], dtype=torch.int32).view(torch.float32)  # sNaN, -NaN
    low = [shadow.bfloat16(), (-shadow).bfloat16()]
    bits(low[1])[6] = 0x7F81  # a signalling NaN in a bf16 shadow
    sources = [source, source.bfloat16(), torch.ones(2)]
    slots = [[shadow.clone(), low[0], odd_nan.clone()], [-shadow, low[1], odd_nan.clone()]]
    before = [clones(slot) for slot in slots]
    update = FusedUpdate(slots, sources)
    gate = torch.ones((), dtype=torch.bool)
    for weights in [(0.5, 0.0), (1.0, torch.tensor(0.25, dtype=torch.float64))]:
        update.lerp_(list(weights), gate=gate)
        assert_same_bits(slots[0], before[0])
        # the documented exception: a NaN already in a 16-bit shadow passes through fp32 in the
        # compiled loop and stays a NaN, not necessarily the same one
        assert slots[1][1][6].isnan()
        slots[1][1][6] = before[1][1][6] = 0.0
        assert_same_bits(slots[1], before[1])
        bits(slots[1][1])[6] = bits(before[1][1])[6] = 0x7F81
    # the check is not vacuous: an open gate (or none) lets the NaN in, as torch.lerp does
    gate.fill_(False)
    update.lerp_([0.5, 0.0], gate=gate)
    opened = [clones(slot) for slot in slots]
    for k in range(2):
        assert opened[k][0][0].isnan() and opened[k][1][0].isnan()
        want = torch.lerp(before[k][0], source, 0.5 if k == 0 else 0.0)
        torch.testing.assert_close(opened[k][0], want, rtol=0, atol=0, equal_nan=True)
    for k in range(2):
        torch._foreach_copy_(slots[k], before[k])
    update.lerp_([0.5, 0.0])
    for k in range(2):
        assert_same_bits(slots[k], opened[k])


def test_compilations_float_and_device_weights_and_gates():
    """Weights filled from floats or given as device tensors (one shared by two slots): one
    compilation ungated, one more gated whatever the flag, none after; and the closed form (exact
    here: fp64, values and weights with few bits)."""
    from torch._dynamo.utils import counters

    source = torch.arange(8, dtype=torch.float64)
    slots = [[torch.zeros(8, dtype=torch.float64)], [torch.full((8,), 4.0, dtype=torch.float64)]]
    update = FusedUpdate(slots, [source])
    before = counters["stats"]["unique_graphs"]
    want = [torch.zeros(8, dtype=torch.float64), torch.full((8,), 4.0, dtype=torch.float64)]
    gate = torch.zeros((), dtype=torch.bool)
    shared = torch.tensor(0.5, dtype=torch.float64)
    steps = [
        ((0.25, 0.5), None, 1),
        ((torch.tensor(0.75, dtype=torch.float64), 0.125), None, 1),
        ((shared, shared), None, 1),
        ((0.5, torch.tensor(1.0, dtype=torch.float64)), gate, 2),
        ((shared, shared), torch.ones((), dtype=torch.bool), 2),
        ((0.5, 0.25), gate, 2),
        ((0.125, 0.375), None, 2),
    ]
    for weights, skip, graphs in steps:
        update.lerp_(list(weights), gate=skip)
        if skip is None or not skip:
            want = [w + float(a) * (source - w) for w, a in zip(want, weights, strict=True)]
        for k in range(2):
            assert torch.equal(slots[k][0], want[k]), (weights, k)
        assert counters["stats"]["unique_graphs"] - before == graphs, weights


def generated_reads(update: FusedUpdate, weights: list[float]) -> tuple[list[int], list[int]]:
    """Per C++ kernel that takes the (only) fp16 input, run by one ``lerp_``: the loads of that
    source in its body, and its stores."""
    from torch._inductor.utils import run_and_get_code

    _, codes = run_and_get_code(update.lerp_, weights)
    (code,) = codes  # one group, one graph
    name = re.search(r"(\w+) = rand_strided\([^\n]*dtype=torch\.float16\)", code).group(1)
    loads, stores = [], []
    for kernel, args in re.findall(r"\n\s+(cpp_fused_\w+)\(([^)]*)\)", code):
        args = [a.strip() for a in args.split(",")]
        if name not in args:
            continue
        body = code[code.index(f"{kernel} = async_compile") :]
        body = body[: body.index("''')")]
        params = re.search(r"kernel\(([^)]*)\)", body).group(1).split(",")
        param = params[args.index(name)].split()[-1].lstrip("*")
        loads.append(len(re.findall(rf"\b{param}\s*(?:\+|\[)", body)))
        stores.append(len(re.findall(r"\.store\(", body)) + len(re.findall(r"\]\s*=[^=]", body)))
    return loads, stores


def test_two_slots_read_each_source_once():
    """In the generated code of a 2-slot update, one kernel reads the source once and writes
    both shadows: the same source loads as a one-slot update (for fp32 weights and shadows, 20
    bytes per element for two slots instead of 24)."""
    source = torch.randn(4096).half()  # the only fp16 input: how the code is searched
    one = FusedUpdate([torch.zeros(4096)], [source])
    two = FusedUpdate([[torch.zeros(4096)], [torch.zeros(4096)]], [source])
    loads1, stores1 = generated_reads(one, [0.5])
    loads2, stores2 = generated_reads(two, [0.5, 0.25])
    assert loads1 == loads2 == [1]  # one kernel, one load of the source in it
    assert stores2 == [2 * stores1[0]]  # that kernel writes both slots


def test_stochastic_slots_draw_the_shifted_stream_and_the_counter_counts_gated_updates():
    """Slot 0 draws exactly the one-slot bits, slot k the stream at ``stream_offsets(., k)``;
    a gated update keeps the bits and still advances the counter. Weight 0.5 and values in
    [1, 2) make the fp32 lerp exact in every formula, so the rounded bits are the stream's."""
    gen = torch.Generator().manual_seed(3)
    sources = [torch.rand(300, generator=gen) + 1, torch.rand(7, 5, generator=gen) + 1]
    start = [(torch.rand(s.shape, generator=gen) + 1).bfloat16() for s in sources]
    slots = [clones(start), clones(start), clones(start)]  # alike: only the stream tells apart
    update = FusedUpdate(slots, sources, stochastic=True, seed=7)
    one = clones(start)
    single = FusedUpdate(one, sources, stochastic=True, seed=7)
    seed = torch.tensor(7)
    want = [clones(start) for _ in range(3)]

    def expected(counter: int, weight: float) -> None:
        for k in range(3):
            for shadow, source, offset in zip(
                want[k], sources, stream_offsets(start, k), strict=True
            ):
                stochastic_lerp_(shadow, source, torch.tensor(weight), seed, torch.tensor(counter),
                                 offset)  # fmt: skip

    update.lerp_([0.5, 0.5, 0.5])
    single.lerp_(0.5)
    expected(1, 0.5)
    for k in range(3):
        assert_same_bits(slots[k], want[k])
    assert_same_bits(slots[0], one)  # slot 0: today's bits
    assert not torch.equal(slots[1][0], slots[0][0])  # the shift draws other bits
    assert not torch.equal(slots[2][0], slots[1][0])
    update.lerp_([0.5, 0.5, 0.5], gate=torch.ones((), dtype=torch.bool))  # counter 2, skipped
    for k in range(3):
        assert_same_bits(slots[k], want[k])
    update.lerp_([0.5, 0.5, 0.5])  # counter 3
    expected(3, 0.5)
    for k in range(3):
        assert_same_bits(slots[k], want[k])


def test_stream_offsets_shift_each_slot_by_the_elements_of_one_slot():
    shadows = [torch.zeros(3), torch.zeros(2, 2), torch.zeros(())]  # 8 elements
    assert stream_offsets(shadows) == stream_offsets(shadows, 0) == [0, 3, 7]
    assert stream_offsets(shadows, 2) == [16, 19, 23]
    assert stream_offsets([], 3) == []


def test_clear_errors_for_bad_slots_weights_and_gates():
    a, b = [torch.zeros(3), torch.zeros(2)], [torch.zeros(3), torch.zeros(2)]
    sources = [torch.ones(3), torch.ones(2)]
    with pytest.raises(ValueError, match="slot 1 holds 1 shadows but there are 2 sources"):
        FusedUpdate([a, b[:1]], sources)
    with pytest.raises(
        ValueError, match=r"slot 1's shadow 0 is torch.float64 on cpu but slot 0's is torch.float32"
    ):
        FusedUpdate([a, [b[0].double(), b[1]]], sources)
    with pytest.raises(
        ValueError, match="slot 1's shadow 1 is the same tensor as an earlier slot's"
    ):
        FusedUpdate([a, [b[0], a[1]]], sources)
    with pytest.raises(TypeError, match="got a list holding Tensor, list; wrap each slot"):
        FusedUpdate([a, b[0]], sources)
    with pytest.raises(TypeError, match="got a list holding Tensor, list; wrap each slot"):
        FusedUpdate([a[0], b], sources)
    with pytest.raises(TypeError, match="slot 1's shadow 1 is a list, not a Tensor"):
        FusedUpdate([a, [b[0], b]], sources)
    with pytest.raises(TypeError, match="shadows must be a list of tensors .* got Tensor"):
        FusedUpdate(a[0], sources)
    update = FusedUpdate([a, b], sources)  # nothing compiles before the first valid update
    with pytest.raises(ValueError, match=r"got 1 weight\(s\) for 2 slot\(s\)"):
        update.lerp_(0.5)
    with pytest.raises(ValueError, match=r"got 3 weight\(s\) for 2 slot\(s\)"):
        update.lerp_([0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"slot 1's weight is a tensor of shape \(2,\)"):
        update.lerp_([0.5, torch.zeros(2)])
    with pytest.raises(TypeError, match="slot 0's weight is a str"):
        update.lerp_(["0.5", 0.5])
    with pytest.raises(TypeError, match="gate must be None or a 0-dim bool tensor.*got bool"):
        update.lerp_([0.5, 0.5], gate=True)
    with pytest.raises(TypeError, match=r"got a torch.float32 tensor of shape \(\)"):
        update.lerp_([0.5, 0.5], gate=torch.zeros(()))
    with pytest.raises(ValueError, match="the gate is on meta but the shadows are on cpu"):
        update.lerp_([0.5, 0.5], gate=torch.zeros((), dtype=torch.bool, device="meta"))
    assert all(torch.equal(t, torch.zeros_like(t)) for t in a + b)
