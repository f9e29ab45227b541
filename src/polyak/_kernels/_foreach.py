"""Multi-tensor updates: ``torch._foreach_*`` calls per (device, dtype) group, N slots, a gate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from polyak._kernels._base import (
    Weight,
    Weights,
    as_weights,
    check_gate,
    check_slots,
    compute_dtype,
    group_by_device_and_dtype,
    group_indices,
)

# Upper bound on the scratch buffer that upcasts low-precision sources, or the largest single tensor
# if that is bigger. On a CPU a chunk must stay in cache between the upcast and the lerp (4 MiB of
# fp32, well inside L3; a 64 MiB chunk ran 3x slower on a 32 MiB-L3 EPYC); on a GPU larger chunks
# mean fewer launches (64 MiB).
SCRATCH_ELEMENTS = {"cpu": 1 << 20}
SCRATCH_ELEMENTS_DEFAULT = 1 << 24

# N >= 2 slots (and device-gated updates) run chunk by chunk: every slot's lerp of one chunk before
# the next, so later slots read the chunk's sources from cache. On a 2-core EPYC (2 MiB L2 per
# core, 32 MiB L3), two slots of the bench workloads (bench/slots_speed.py, three quiet runs):
# 1M elements (4 MiB of fp32) gave the best or near-best ratio on each; 512K ran up to 1.11x
# (bf16 shadows) and 4M up to 0.93x (ResNet-50) where 1M gave 0.96-0.99x and 0.81-0.88x; below
# 256K the per-piece call cost wins (ResNet-50 1.07x at 256K). On a GPU a chunk bounds the gated
# path's scratch (64 MiB of fp32) and, being large, adds few launches.
CHUNK_ELEMENTS = {"cpu": 1 << 20}
CHUNK_ELEMENTS_DEFAULT = 1 << 24

# Where the slots are rows of one tensor per source (``stacked_rows``), CPU tensors of at most this
# many elements in all N rows are updated by one lerp of the rows: ATen runs an op below its grain
# size (32768) on one thread, and there the per-tensor cost of a call dominates. Larger ones are
# lerped slot by slot: an op over the rows gives each thread a row of its own, so both read the
# whole source (two fp32 slots of ResNet-50 ran 1.14x two one-slot updates that way, on 2 cores).
STACK_ELEMENTS = 1 << 15

# Device types whose gate tensor is read on the host: a CPU tensor's value needs no device sync.
HOST_GATE_DEVICES = frozenset({"cpu"})


def rounds_device_weight(dtypes: set[torch.dtype]) -> list[str]:
    """The shadow dtypes (bf16, fp16) to which ``_foreach_lerp_`` would round a device weight.

    ATen reads a Python-float weight in fp32 (``compute_dtype``), but casts a tensor weight to the
    list's dtype, and no multi-tensor op takes an fp32 weight for bf16 lists.
    """
    return sorted(str(d) for d in dtypes if compute_dtype(d) != d)


def check_device_weight(dtypes: set[torch.dtype]) -> None:
    """Refuse a device weight for bf16/fp16 shadows (see ``rounds_device_weight``)."""
    low = rounds_device_weight(dtypes)
    if low:
        raise ValueError(
            f"kernel='foreach' cannot run a capturable update of {', '.join(low)} shadows: a "
            f"multi-tensor lerp rounds the device weight to the shadow's dtype (1 - 0.9999 would "
            f"become 1.00136e-4 in bf16). Use kernel='auto', 'fused' or 'triton', or fp32 shadows."
        )


_INT_VIEWS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


class _Chunk:
    """Sources upcast into views of the shared scratch, then lerped into their shadows."""

    __slots__ = ("shadows", "sources", "views")

    def __init__(
        self, shadows: list[torch.Tensor], sources: list[torch.Tensor], views: list[torch.Tensor]
    ) -> None:
        self.shadows, self.sources, self.views = shadows, sources, views


class _SlotChunk:
    """One cache-sized stretch of one group: pieces of sources and of every slot's shadows.

    ``sources``: the live source tensors where whole, flat views where a tensor was cut;
    ``slots[k]``: slot ``k``'s pieces alike; ``upcast``: views of the group's upcast scratch (bf16
    sources of fp32 shadows), else ``None``; ``values``/``value_span``/``slot_bits``: the gated
    path's result scratch, the stretch of it this chunk uses, and the shadows, all as integer
    views; ``weights[k]``: slot ``k``'s device-weight list (one persistent 0-dim tensor repeated);
    ``rows``/``row_weights``: for small tensors whose slots are rows of one tensor, those
    ``(N, ...)`` views and the ``(N, 1, ...)`` views of the per-slot weights they lerp with (such a
    chunk has no ``slots``).
    """

    __slots__ = (
        "row_weights",
        "rows",
        "slot_bits",
        "slots",
        "sources",
        "upcast",
        "value_bits",
        "value_span",
        "values",
        "weights",
    )

    def __init__(self) -> None:
        self.slots: list[list[torch.Tensor]] = []
        self.sources: list[torch.Tensor] = []
        self.upcast: list[torch.Tensor] | None = None
        self.values: list[torch.Tensor] = []
        self.value_bits: list[torch.Tensor] = []
        self.value_span: torch.Tensor | None = None
        self.slot_bits: list[list[torch.Tensor]] = []
        self.weights: list[list[torch.Tensor]] = []
        self.rows: list[torch.Tensor] = []
        self.row_weights: list[torch.Tensor] = []


def stacked_rows(slots: list[list[torch.Tensor]]) -> list[torch.Tensor] | None:
    """Each source's N shadows as one ``(N, *shape)`` view, where the slots are laid out so.

    That is: for every ``i``, ``slots[k][i]`` are fp32/fp64 tensors in one storage, with the same
    strides, ``k * step`` elements apart for a ``step`` that keeps the rows apart (e.g. the rows of
    ``torch.empty(N, *shape)``). Otherwise ``None``. bf16/fp16 shadows are left out: a lerp with a
    tensor weight reads it in the shadow's dtype (``check_device_weight``).
    """
    if len(slots) < 2:
        return None
    rows = []
    for i, first in enumerate(slots[0]):
        if first.dtype not in (torch.float32, torch.float64) or first.numel() == 0:
            return None
        storage = first.untyped_storage().data_ptr()
        step = slots[1][i].storage_offset() - first.storage_offset()
        span = 1 + sum((n - 1) * abs(d) for n, d in zip(first.shape, first.stride(), strict=True))
        if step < span:
            return None
        for k, slot in enumerate(slots):
            shadow = slot[i]
            if (
                shadow.untyped_storage().data_ptr() != storage
                or shadow.storage_offset() != first.storage_offset() + k * step
                or shadow.stride() != first.stride()
            ):
                return None
        shape, strides = (len(slots), *first.shape), (step, *first.stride())
        rows.append(first.as_strided(shape, strides, first.storage_offset()))
    return rows


class _ChunkPlan:
    """The update of N slots, or a gated one, cut into chunks of at most ``CHUNK_ELEMENTS``.

    Each group's tensors are packed in order into chunks; a contiguous tensor larger than a chunk
    is cut into equal flat pieces (views, planned once), a non-contiguous one stays whole. Views of
    a source go stale when its storage moves (``param.data = ...``, ``set_``): :meth:`follow`
    compares the data pointers of the cut sources (one ``data_ptr()`` each) and replans.

    Where every source's N shadows are rows of one tensor (:func:`stacked_rows`) and the update is
    not gated, the small CPU tensors (``STACK_ELEMENTS``) go into chunks of their own, each one
    ``_foreach_lerp_`` of those ``(N, ...)`` views with ``(N, 1, ...)`` weights: one elementwise op
    per tensor reads the source once for all slots.
    """

    def __init__(
        self,
        slots: list[list[torch.Tensor]],
        sources: list[torch.Tensor],
        *,
        gated: bool,
        upcast: bool = True,
    ) -> None:
        self.slots, self.sources, self.gated = slots, sources, gated
        self.upcast = upcast  # False: no scratch of the shadow dtype (a copy casts on its own)
        self.groups = group_indices(slots[0], sources)
        self.stacked = None if gated else stacked_rows(slots)
        # per (device, shadow dtype), for stacked rows: the N weights, written once per update
        self.row_weights = {
            (device, dtype): torch.zeros(len(slots), dtype=dtype, device=device)
            for device, dtype, _ in self.groups
        }
        self.row_fills = {key: list(w.unbind()) for key, w in self.row_weights.items()}
        # per (device, shadow dtype): one 0-dim weight per slot, read by _foreach_lerp_ as a list
        self.weight_tensors = {
            (device, dtype): [torch.zeros((), dtype=dtype, device=device) for _ in slots]
            for device, dtype, _ in self.groups
        }
        if gated:  # per (device, integer view dtype): gate and not-gate as 1/0
            self.keep: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
            self.take: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
            self.not_gate = {
                d: torch.zeros((), dtype=torch.bool, device=d) for d, _, _ in self.groups
            }
            for device, dtype, _ in self.groups:
                bits = _INT_VIEWS[dtype.itemsize]
                self.keep[(device, bits)] = torch.zeros((), dtype=bits, device=device)
                self.take[(device, bits)] = torch.zeros((), dtype=bits, device=device)
        self._plan()

    def _plan(self) -> None:
        self.chunks: list[_SlotChunk] = []
        self.scratch: list[torch.Tensor] = []
        self.cut: list[int] = []
        for (device, dtype, source_dtype), indices in self.groups.items():
            limit = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS_DEFAULT)
            rows: list[tuple[int, int, int]] = []  # (index, start, stop); stop -1: whole
            pieces: list[tuple[int, int, int]] = []
            for i in indices:
                n = self.sources[i].numel()
                if self._in_rows(i, device):
                    rows.append((i, 0, -1))
                elif n > limit and self._cuttable(i):
                    parts = -(-n // limit)
                    step = -(-n // parts)
                    pieces += [(i, lo, min(lo + step, n)) for lo in range(0, n, step)]
                    self.cut.append(i)
                else:
                    pieces.append((i, 0, -1))
            packed = [(True, c) for c in self._pack(rows, limit)]
            packed += [(False, c) for c in self._pack(pieces, limit)]
            capacity = max(sum(self._size(p) for p in chunk) for _, chunk in packed)
            upcast = values = None
            if dtype != source_dtype and self.upcast:
                upcast = torch.empty(capacity, dtype=dtype, device=device)
                self.scratch.append(upcast)
            if self.gated:
                values = torch.empty(capacity, dtype=dtype, device=device)
                self.scratch.append(values)
            for in_rows, chunk_pieces in packed:
                key = (device, dtype)
                self.chunks.append(self._chunk(chunk_pieces, key, upcast, values, in_rows))
        self.cut_pointers = [self.sources[i].data_ptr() for i in self.cut]

    def _in_rows(self, i: int, device: torch.device) -> bool:
        """Whether tensor ``i`` is updated as stacked rows: small, on the CPU (see STACK_ELEMENTS)."""
        return (
            self.stacked is not None
            and device.type == "cpu"
            and len(self.slots) * self.sources[i].numel() <= STACK_ELEMENTS
        )

    def _pack(
        self, pieces: list[tuple[int, int, int]], limit: int
    ) -> list[list[tuple[int, int, int]]]:
        """Pieces in order, in chunks of at most ``limit`` elements (a larger piece: its own)."""
        packed: list[list[tuple[int, int, int]]] = []
        filled = 0
        for piece in pieces:
            size = self._size(piece)
            if not packed or (packed[-1] and filled + size > limit):
                packed.append([])
                filled = 0
            packed[-1].append(piece)
            filled += size
        return packed

    def _size(self, piece: tuple[int, int, int]) -> int:
        i, start, stop = piece
        return self.sources[i].numel() if stop < 0 else stop - start

    def _cuttable(self, i: int) -> bool:
        return self.sources[i].is_contiguous() and all(s[i].is_contiguous() for s in self.slots)

    def _chunk(
        self,
        pieces: list[tuple[int, int, int]],
        key: tuple[torch.device, torch.dtype],
        upcast: torch.Tensor | None,
        values: torch.Tensor | None,
        in_rows: bool,
    ) -> _SlotChunk:
        def piece_of(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            return tensor if stop < 0 else tensor.detach().view(-1)[start:stop]

        chunk = _SlotChunk()
        chunk.sources = [piece_of(self.sources[i], a, b) for i, a, b in pieces]
        shapes, offset = [], 0
        for piece in pieces:
            i, a, b = piece
            shapes.append((offset, self.slots[0][i].shape if b < 0 else torch.Size([b - a])))
            offset += self._size(piece)
        if in_rows and self.stacked is not None:  # whole tensors, never cut
            chunk.rows = [self.stacked[i] for i, _, _ in pieces]
            weights = self.row_weights[key]
            chunk.row_weights = [weights.view(-1, *[1] * (r.dim() - 1)) for r in chunk.rows]
        else:
            chunk.slots = [[piece_of(slot[i], a, b) for i, a, b in pieces] for slot in self.slots]
        if upcast is not None:
            chunk.upcast = [upcast[o : o + s.numel()].view(s) for o, s in shapes]
        if values is not None:
            bits = _INT_VIEWS[values.dtype.itemsize]
            chunk.values = [values[o : o + s.numel()].view(s) for o, s in shapes]
            chunk.value_bits = [t.view(bits) for t in chunk.values]
            chunk.value_span = values[:offset].view(bits)
            chunk.slot_bits = [[t.view(bits) for t in slot] for slot in chunk.slots]
        chunk.weights = [[w] * len(pieces) for w in self.weight_tensors[key]]
        return chunk

    def follow(self) -> None:
        """Replan if a cut source's storage moved since planning (its views would read the old)."""
        if self.cut and [self.sources[i].data_ptr() for i in self.cut] != self.cut_pointers:
            self._plan()

    def fill(self, weights: list[Weight]) -> list[bool]:
        """Copy tensor weights into the planned 0-dim ones; which slots read them as a list."""
        listed = [isinstance(w, torch.Tensor) for w in weights]
        if any(listed):
            check_device_weight({dtype for _, dtype in self.weight_tensors})
            for tensors in self.weight_tensors.values():
                for k, weight in enumerate(weights):
                    if listed[k]:
                        tensors[k].copy_(weight)
        return listed

    def fill_rows(self, weights: list[Weight]) -> None:
        """Write the N weights into each (device, dtype)'s ``(N,)`` weight tensor."""
        for rows in self.row_fills.values():
            for row, weight in zip(rows, weights, strict=True):
                if isinstance(weight, torch.Tensor):
                    row.copy_(weight)
                else:
                    row.fill_(weight)

    def set_gate(self, gate: torch.Tensor) -> None:
        """``keep = gate``, ``take = not gate`` as 0/1 in every integer view dtype, on the device."""
        for device, not_gate in self.not_gate.items():
            torch.logical_not(gate, out=not_gate)
            for (d, _), keep in self.keep.items():
                if d == device:
                    keep.copy_(gate)
            for (d, _), take in self.take.items():
                if d == device:
                    take.copy_(not_gate)


class SlotGatedCopy:
    """``shadow <- source`` for every slot and pair unless a device gate is set, bit for bit and
    without a host read: through integer views of both (same dtype: every copied tensor keeps its
    source's dtype), ``s = s * gate + p * (1 - gate)`` per (device, element size) group with
    multi-tensor ops (one factor is 0, the other 1: exact for any bits). Pairs whose dtypes differ,
    or whose element size has no integer view, take a ``torch.where`` each.

    The views are planned once and again when a source's storage moves (one ``data_ptr()`` per
    copied tensor and gated update: copied tensors are few, e.g. ``num_batches_tracked``).
    """

    def __init__(self, slots: list[list[torch.Tensor]], sources: list[torch.Tensor]) -> None:
        self.slots, self.sources = slots, sources
        self._plan()

    def _plan(self) -> None:
        self.pointers = [t.data_ptr() for t in self.sources]
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[list[torch.Tensor]], list]] = {}
        self.others: list[int] = []
        for i, source in enumerate(self.sources):
            bits = _INT_VIEWS.get(source.element_size())
            if bits is None or any(slot[i].dtype != source.dtype for slot in self.slots):
                self.others.append(i)
                continue
            shadows, sources = groups.setdefault(
                (source.device, bits), ([[] for _ in self.slots], [])
            )
            for k, slot in enumerate(self.slots):
                shadows[k].append(slot[i].view(bits))
            sources.append(source.view(bits))
        self.groups = [
            (
                shadows,
                sources,
                torch.zeros((), dtype=bits, device=device),
                [torch.zeros((), dtype=bits, device=device)] * len(sources),
            )
            for (device, bits), (shadows, sources) in groups.items()
        ]
        self.not_gate = {
            device: torch.zeros((), dtype=torch.bool, device=device) for device, _ in groups
        }

    def run(self, gate: torch.Tensor) -> None:
        if [t.data_ptr() for t in self.sources] != self.pointers:
            self._plan()
        for device, not_gate in self.not_gate.items():
            if device == gate.device:
                torch.logical_not(gate, out=not_gate)
        for shadows, sources, keep, take in self.groups:
            keep.copy_(gate)
            take[0].copy_(self.not_gate[keep.device])
            for slot in shadows:
                torch._foreach_mul_(slot, keep)
                torch._foreach_addcmul_(slot, sources, take)
        for i in self.others:
            for slot in self.slots:
                torch.where(gate, slot[i], self.sources[i].to(slot[i].dtype), out=slot[i])


def gated_copy_(
    holder: Any, slots: list[list[torch.Tensor]], sources: list[torch.Tensor], gate: torch.Tensor
) -> bool:
    """The gated copy every kernel shares: ``True`` where it was done (skipped or selected on the
    device), ``False`` where the caller should copy as usual (a CPU gate read as False on the
    host). ``holder`` keeps the :class:`SlotGatedCopy` plan (as ``_gated_copy``)."""
    check_gate(gate)
    if gate.device.type in HOST_GATE_DEVICES:
        return bool(gate.item())  # a CPU tensor: no device to wait for
    if getattr(holder, "_gated_copy", None) is None:
        holder._gated_copy = SlotGatedCopy(slots, sources)
    holder._gated_copy.run(gate)
    return True


class ForeachUpdate:
    """``_foreach_lerp_`` / ``_foreach_copy_`` per group; mixed dtypes through a scratch buffer.

    ``_foreach_lerp_`` refuses a source whose dtype differs from its shadow's (bf16 weights with fp32
    shadows), so such groups copy their sources into one persistent scratch of the shadow dtype
    (exact: every bf16/fp16 value is an fp32 value), a chunk at a time, then lerp from there.

    One slot: one ``_foreach_lerp_`` per group (and chunk of upcast sources), as ever.

    N >= 2 slots: no multi-tensor op lerps one source into several shadows, so the update walks the
    tensors in chunks of at most ``CHUNK_ELEMENTS`` (a contiguous tensor larger than that is cut
    into flat pieces, planned once) and runs every slot's ``_foreach_lerp_`` over a chunk before
    the next one: the second slot reads the source chunk (or its upcast copy, made once per chunk)
    from cache. Where each source's N shadows are rows of one tensor (``torch.empty(N, *shape)``,
    fp32/fp64: :func:`stacked_rows`), one ``_foreach_lerp_`` per chunk updates all N rows with
    ``(N, 1, ...)`` weights, reading each source element once per update, and the per-tensor cost
    of a CPU foreach call (about 3 µs) is paid once instead of N times. Either way the results
    are each slot's one-slot update bit for bit (the same elementwise lerp on the same values;
    only a NaN result may take another NaN bit pattern, as ATen's vector and scalar loops differ).

    Measured on a 2-core EPYC (32 MiB L3; ``bench/slots_speed.py``, paired ratios, four quiet
    runs, the last in ``bench/results/slots_speed_cpu_2026-12-04.json``), two slots against two
    one-slot updates of the same shapes: ResNet-50 (25.6M fp32) 0.81-0.88x, with its buffers
    0.75-0.92x, ViT-S 0.79-0.87x, the CPU-scale transformer 0.82-0.91x, bf16 weights with fp32
    shadows 0.73-0.80x (one upcast for both slots). Little is saved where memory traffic is not
    the cost: 1024 tiny tensors 0.90-0.99x (the per-call cost dominates; as stacked rows
    0.74-0.82x) and bf16 weights with bf16 shadows 0.96-0.99x (ATen's bf16 lerp is bound by
    compute there, 43 GB/s against 60 for fp32). The traffic floor is 20/24 = 0.83x for fp32
    (the source read once instead of twice).

    The gate (``True`` skips the update):

    - read on the host where it is a CPU tensor (``HOST_GATE_DEVICES``): a CPU tensor needs no
      device sync, so a skipped update costs one ``.item()`` and an update that runs costs nothing
      more;
    - on the device otherwise (CUDA: no host sync, nothing allocated after the first gated update,
      which plans a result scratch of at most ``CHUNK_ELEMENTS`` per group): per chunk and slot the
      result is computed into the scratch by the same ``_foreach_lerp_`` (a copy of the shadows
      first), then selected bit for bit through integer views of both,
      ``s = s * gate + r * (1 - gate)`` (one factor is 0, the other 1: exact for any bits, NaN and
      inf included). That is five multi-tensor passes instead of one (about 4x the memory
      traffic of an ungated update); the Triton and fused kernels gate within their one pass.
    """

    def __init__(
        self,
        slots: list[list[torch.Tensor]],
        sources: list[torch.Tensor],
        *,
        stochastic: bool = False,
        seed: int = 0,
        positions: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if stochastic:
            raise ValueError(
                "the foreach kernel cannot round stochastically (no multi-tensor op does it); use "
                "kernel='fused' (or 'auto') with rounding='stochastic'."
            )
        check_slots(slots, sources)
        self.slots, self.sources = slots, sources
        self.weights: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        self.same: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.mixed: list[_Chunk] = []
        self.scratch: list[torch.Tensor] = []
        self.chunked: _ChunkPlan | None = None
        self._gated: _ChunkPlan | None = None
        if len(slots) > 1:
            self.chunked = _ChunkPlan(slots, sources, gated=False)
            self.copies = [
                ([[slot[i] for i in indices] for slot in slots], [sources[i] for i in indices])
                for indices in self.chunked.groups.values()
            ]
            return
        for (device, shadow_dtype, source_dtype), (
            group_shadows,
            group_sources,
        ) in group_by_device_and_dtype(slots[0], sources).items():
            if shadow_dtype == source_dtype:
                self.same.append((group_shadows, group_sources))
            else:
                self._plan_scratch(device, shadow_dtype, group_shadows, group_sources)

    def _plan_scratch(
        self,
        device: torch.device,
        dtype: torch.dtype,
        shadows: list[torch.Tensor],
        sources: list[torch.Tensor],
    ) -> None:
        sizes = [s.numel() for s in shadows]
        limit = SCRATCH_ELEMENTS.get(device.type, SCRATCH_ELEMENTS_DEFAULT)
        capacity = max(max(sizes), min(sum(sizes), limit))
        scratch = torch.empty(capacity, dtype=dtype, device=device)
        self.scratch.append(scratch)
        chunk = _Chunk([], [], [])
        offset = 0
        for shadow, source, size in zip(shadows, sources, sizes, strict=True):
            if offset + size > capacity:
                self.mixed.append(chunk)
                chunk, offset = _Chunk([], [], []), 0
            chunk.shadows.append(shadow)
            chunk.sources.append(source)
            chunk.views.append(scratch[offset : offset + size].view(shadow.shape))
            offset += size
        self.mixed.append(chunk)

    def _weights(self, weight: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """A device weight as the per-tensor list ``_foreach_lerp_`` takes, planned once per group."""
        key = (like[0].device, like[0].dtype)
        if key not in self.weights:
            check_device_weight({key[1]})
            self.weights[key] = [torch.zeros((), dtype=key[1], device=key[0])]
        cached = self.weights[key]
        cached[0].copy_(weight)
        return cached * len(like)

    def lerp_(self, weights: Weights, gate: torch.Tensor | None = None) -> None:
        if gate is not None:
            check_gate(gate)
            listed = as_weights(weights, len(self.slots))  # refused alike, gated or not
            if gate.device.type not in HOST_GATE_DEVICES:
                self._lerp_gated(listed, gate)
                return
            if gate.item():  # a CPU tensor: no device to wait for
                return
        if self.chunked is not None:
            self._lerp_chunked(self.chunked, as_weights(weights, len(self.slots)))
            return
        weight = weights if isinstance(weights, float) else as_weights(weights, 1)[0]
        tensor = isinstance(weight, torch.Tensor)
        for shadows, sources in self.same:
            w = self._weights(weight, shadows) if tensor else weight
            torch._foreach_lerp_(shadows, sources, w)
        for chunk in self.mixed:
            torch._foreach_copy_(chunk.views, chunk.sources)
            w = self._weights(weight, chunk.shadows) if tensor else weight
            torch._foreach_lerp_(chunk.shadows, chunk.views, w)

    def _lerp_chunked(self, plan: _ChunkPlan, weights: list[Weight]) -> None:
        """N slots, chunk by chunk: every slot's lerp of a chunk before the next chunk."""
        plan.follow()
        listed = plan.fill(weights)
        if plan.stacked is not None:
            plan.fill_rows(weights)
        for chunk in plan.chunks:
            sources = chunk.sources
            if chunk.upcast is not None:
                torch._foreach_copy_(chunk.upcast, sources)
                sources = chunk.upcast
            if chunk.rows:
                torch._foreach_lerp_(chunk.rows, sources, chunk.row_weights)
            for k, shadows in enumerate(chunk.slots):
                torch._foreach_lerp_(
                    shadows, sources, chunk.weights[k] if listed[k] else weights[k]
                )

    def _lerp_gated(self, weights: list[Weight], gate: torch.Tensor) -> None:
        """The device-side gate: each result into the scratch, then a bit-exact integer select."""
        if self._gated is None:
            devices = {device for device, _, _ in group_indices(self.slots[0], self.sources)}
            if devices - {gate.device}:
                raise ValueError(
                    f"the gate is on {gate.device} but shadows are on "
                    f"{sorted(str(d) for d in devices)}; pass the gate on the shadows' device "
                    f"(or as a CPU tensor, read on the host)."
                )
            self._gated = _ChunkPlan(self.slots, self.sources, gated=True)
        plan = self._gated
        plan.follow()
        listed = plan.fill(weights)
        plan.set_gate(gate)
        for chunk in plan.chunks:
            sources = chunk.sources
            if chunk.upcast is not None:
                torch._foreach_copy_(chunk.upcast, sources)
                sources = chunk.upcast
            key = (chunk.value_span.device, chunk.value_span.dtype)
            keep, take = plan.keep[key], plan.take[key]
            for k, shadows in enumerate(chunk.slots):
                torch._foreach_copy_(chunk.values, shadows)
                torch._foreach_lerp_(
                    chunk.values, sources, chunk.weights[k] if listed[k] else weights[k]
                )
                torch._foreach_mul_(chunk.slot_bits[k], keep)
                chunk.value_span.mul_(take)
                torch._foreach_add_(chunk.slot_bits[k], chunk.value_bits)

    def copy_(self, gate: torch.Tensor | None = None) -> None:
        """``shadow <- source`` for every slot, unless ``gate`` (as in :meth:`lerp_`)."""
        if gate is not None and gated_copy_(self, self.slots, self.sources, gate):
            return
        if self.chunked is not None:
            for slots, sources in self.copies:
                for shadows in slots:
                    torch._foreach_copy_(shadows, sources)
            return
        for shadows, sources in self.same:
            torch._foreach_copy_(shadows, sources)
        for chunk in self.mixed:
            torch._foreach_copy_(chunk.shadows, chunk.sources)


class GatedCopy:
    """``target.copy_(source)`` for every pair, cast to the target's dtype, unless a gate says no.

    ``copy_(gate=None)``: every target takes its source's value (rounded to nearest where the
    target's dtype is narrower: an fp32 average into a bf16 weight), one ``_foreach_copy_`` over
    the lists. ``gate``, a 0-dim bool tensor (``True``: skip the copy), is read on the host where
    it is a CPU tensor (``HOST_GATE_DEVICES``, no device to wait for), and on the device otherwise:
    per chunk of at most ``CHUNK_ELEMENTS`` the sources are copied (cast) into a scratch of the
    target dtype, then selected bit for bit through integer views, ``t = t * gate + c * (1 - gate)``
    (exact for any bits, NaN and inf included), as :class:`ForeachUpdate`'s gated lerp does. No
    host sync, and nothing allocated after the first gated call, which plans the scratch.

    Used by the EMA to write averages back into a model's weights (Switch-EMA,
    :class:`polyak.averagers.SwitchEMA`): targets are the live tensors (local shards),
    sources the shadows. The ungated copy may cross devices (shadows offloaded to the host).
    """

    def __init__(self, targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        check_slots([targets], sources)
        self.targets, self.sources = targets, sources
        self._gated: _ChunkPlan | None = None
        self._pointers: list[tuple[int, int]] = []

    def copy_(self, gate: torch.Tensor | None = None) -> None:
        if gate is not None:
            check_gate(gate)
            if gate.device.type not in HOST_GATE_DEVICES:
                self._copy_gated(gate)
                return
            if gate.item():  # a CPU tensor: no device to wait for
                return
        torch._foreach_copy_(self.targets, self.sources)

    def _cut_pointers(self, plan: _ChunkPlan) -> list[tuple[int, int]]:
        return [(self.targets[i].data_ptr(), self.sources[i].data_ptr()) for i in plan.cut]

    def _copy_gated(self, gate: torch.Tensor) -> None:
        if self._gated is None:
            devices = {device for device, _, _ in group_indices(self.targets, self.sources)}
            if devices - {gate.device}:
                raise ValueError(
                    f"the gate is on {gate.device} but the tensors are on "
                    f"{sorted(str(d) for d in devices)}; pass the gate on the tensors' device "
                    f"(or as a CPU tensor, read on the host)."
                )
            self._gated = _ChunkPlan([self.targets], self.sources, gated=True, upcast=False)
            self._pointers = self._cut_pointers(self._gated)
        plan = self._gated
        # views of a cut tensor go stale when its storage moves (a weight's .data re-pointed)
        if plan.cut and self._cut_pointers(plan) != self._pointers:
            plan._plan()
            self._pointers = self._cut_pointers(plan)
        plan.set_gate(gate)
        for chunk in plan.chunks:
            key = (chunk.value_span.device, chunk.value_span.dtype)  # type: ignore[union-attr]
            torch._foreach_copy_(chunk.values, chunk.sources)
            torch._foreach_mul_(chunk.slot_bits[0], plan.keep[key])
            chunk.value_span.mul_(plan.take[key])  # type: ignore[union-attr]
            torch._foreach_add_(chunk.slot_bits[0], chunk.value_bits)
