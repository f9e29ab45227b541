"""The kernel contract's shared pieces: slots, weights and gates, and their errors."""

from __future__ import annotations

import pytest
import torch

from polyak import _kernels
from polyak._kernels._base import SlotState, as_slots, as_weights
from polyak._kernels._stochastic import stream_offsets

KERNELS = ["reference", "foreach"]


def test_as_slots_takes_one_slot_or_n():
    a, b = [torch.zeros(2), torch.zeros(3)], [torch.ones(2), torch.ones(3)]
    assert as_slots(a) == [a]
    assert as_slots([a, b]) == [a, b]
    assert as_slots((tuple(a), tuple(b))) == [a, b]
    assert as_slots([]) == [[]]  # one empty slot, as an EMA without copied tensors builds
    with pytest.raises(TypeError, match=r"got a list holding Tensor, list; wrap each slot"):
        as_slots([a[0], b])


def test_as_weights():
    w = torch.tensor(0.5, dtype=torch.float64)
    assert as_weights(0.5, 1) == [0.5]
    assert as_weights(1, 1) == [1]
    assert as_weights(w, 1) == [w]
    assert as_weights([0.5, w], 2) == [0.5, w]
    assert as_weights((0.5, 0.25), 2) == [0.5, 0.25]
    with pytest.raises(ValueError, match=r"got 1 weight\(s\) for 2 slot\(s\); pass one weight"):
        as_weights(0.5, 2)
    with pytest.raises(ValueError, match=r"got 3 weight\(s\) for 2 slot\(s\)"):
        as_weights([0.1, 0.2, 0.3], 2)
    with pytest.raises(ValueError, match=r"weight tensor of shape \(2,\); pass one weight per"):
        as_weights(torch.tensor([0.1, 0.2]), 2)


def test_slot_offsets_shift_each_slot_by_one_slots_elements():
    slots = [[torch.zeros(3), torch.zeros(2, 2), torch.zeros(())] for _ in range(3)]
    assert [stream_offsets(slots[0], k) for k in range(3)] == [[0, 3, 7], [8, 11, 15], [16, 19, 23]]
    assert stream_offsets([], 0) == []


def test_stream_offsets_place_shards_at_their_full_tensors_positions():
    """Shards (local blocks, ``positions[i] = (full numel, block start)``) start at their block's
    place in their full tensor, and the tensors after them after the full tensor: a (4, 3) tensor
    whose rank holds rows 2-3 (start 6), then a (5,) tensor held whole."""
    shard, whole = torch.zeros(2, 3), torch.zeros(5)
    assert stream_offsets([shard, whole], 0, [(12, 6), (5, 0)]) == [6, 12]
    assert stream_offsets([shard, whole], 2, [(12, 6), (5, 0)]) == [40, 46]  # shifted by 2 * 17
    with pytest.raises(ValueError, match="expected one \\(numel, start\\) per shadow, 2, got 1"):
        stream_offsets([shard, whole], 0, [(12, 6)])


def test_slot_state_keeps_one_weight_per_slot():
    cpu = torch.device("cpu")
    state = SlotState({cpu}, slots=3, seed=4)
    given = torch.tensor(0.75, dtype=torch.float64)
    state.fill([0.5, given, 0.25])
    assert state.weights[cpu].tolist() == [0.5, 0.0, 0.25]  # one vector, the slots its views
    tensors = state.slot_tensors([0.5, given, 0.25], cpu)
    assert tensors[1] is given and tensors[2] is state.slot_weights[cpu][2]
    # a device weight given for two slots goes into the second slot's view (distinct inputs)
    twice = state.slot_tensors([given, given, 0.25], cpu)
    assert twice[0] is given and twice[1] is state.slot_weights[cpu][1] and float(twice[1]) == 0.75
    assert int(state.seeds[cpu]) == 4 and not bool(state.never[cpu])
    state.advance()
    assert int(state.counters[cpu]) == 1


@pytest.mark.parametrize("kernel", KERNELS)
def test_mismatched_slots_are_refused_clearly(kernel):
    sources = [torch.zeros(2, 3), torch.zeros(4)]
    good = [torch.zeros(2, 3), torch.zeros(4)]
    cases = [
        ([good, [torch.zeros(2, 3)]], r"slot 1 holds 1 shadows but there are 2 sources"),
        ([good, [torch.zeros(2, 3), torch.zeros(5)]], r"slot 1's shadow 1 has shape \(5,\) but"),
        ([[torch.zeros(3, 2), torch.zeros(4)]], r"slot 0's shadow 0 has shape \(3, 2\) but its"),
        (
            [good, [torch.zeros(2, 3), torch.zeros(4, dtype=torch.float64)]],
            r"slot 1's shadow 1 is torch.float64 on cpu but slot 0's is torch.float32 on cpu",
        ),
        ([good, [torch.zeros(2, 3), good[1]]], r"slot 1's shadow 1 is the same tensor as an"),
    ]
    for slots, message in cases:
        with pytest.raises(ValueError, match=message):
            _kernels.build(kernel, slots, sources)
    with pytest.raises(ValueError, match="slot 0 holds 0 shadows but there are 2 sources"):
        _kernels.build(kernel, [], sources)  # an empty list is one empty slot
    with pytest.raises(ValueError, match="got 0 slots of shadows; pass at least one list"):
        _kernels.KERNELS[kernel]([], sources)  # the class itself, given no slot at all


@pytest.mark.parametrize("kernel", KERNELS)
def test_wrong_weights_and_gates_are_refused_clearly(kernel):
    sources = [torch.ones(3)]
    update = _kernels.build(kernel, [[torch.zeros(3)], [torch.zeros(3)]], sources)
    with pytest.raises(ValueError, match=r"got 1 weight\(s\) for 2 slot\(s\)"):
        update.lerp_(0.5)
    with pytest.raises(ValueError, match=r"got 3 weight\(s\) for 2 slot\(s\)"):
        update.lerp_([0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"got 1 weight\(s\) for 2 slot\(s\)"):
        update.lerp_(0.5, gate=torch.tensor(True))  # refused even where the update is skipped
    with pytest.raises(TypeError, match=r"0-dim bool tensor .* got a torch.float32 tensor of"):
        update.lerp_([0.5, 0.5], gate=torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"got a torch.bool tensor of shape \(1,\)"):
        update.lerp_([0.5, 0.5], gate=torch.tensor([True]))
    with pytest.raises(TypeError, match=r"got bool True"):
        update.lerp_([0.5, 0.5], gate=True)


def test_every_kernel_takes_n_slots_through_build(monkeypatch):
    """build() hands N slots to every kernel; each equals N one-slot updates (triton under its
    CPU interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels = ["reference", "foreach", "fused"] + (["triton"] if _kernels._has_triton() else [])
    source = torch.tensor([1.0, 2.0, 4.0])
    for kernel in kernels:
        slots = [[torch.zeros(3)], [torch.full((3,), 8.0)]]
        _kernels.build(kernel, slots, [source]).lerp_([0.5, 0.25])
        assert torch.equal(slots[0][0], source / 2), kernel
        assert torch.equal(slots[1][0], 8.0 + 0.25 * (source - 8.0)), kernel
