"""Where the averages live: one shadow per (slot, name), made and kept by one dtype policy.

A rule keeps one or more averages of the same weights (slots: ``("ema",)`` for an EMA, two power
EMAs for post-hoc EMA). Averaged tensors get a shadow per slot; copied tensors (integer buffers such
as ``num_batches_tracked``) are the same in every slot, so they get one shadow, shared.

The dtype policy: copied tensors keep their dtype; averaged ones take ``shadow_dtype`` where given,
else their own, except bf16/fp16, which get fp32 (a bf16 shadow cannot move by less than half an
ulp, 2**-9 of its value, so a slow average stalls). Offloaded shadows live in host memory, pinned
when their tensor is on CUDA.

A DTensor parameter (FSDP2, tensor or expert parallel, HSDP) gets a DTensor shadow with exactly
its placements, which is what users read; the kernels get local views (the local shard, made once
when an update is planned rather than a ``to_local()`` per tensor per update; on the CPU the
two cost about the same, bench/results/sharded_speed_cpu_2026-12-05b.json), so an update never
dispatches through DTensor and never communicates. Each rank's shadows then take its
parameters' local shards' bytes: the full shadow divided by the shards.
:func:`shard_start` says where a local shard's elements sit among the full tensor's, so that the
stochastic-rounding stream draws distinct bits for distinct elements on every rank, and the same
bits for replicas of one shard.

With several slots, a plain tensor's shadows are the rows of one ``(N, *shape)`` tensor (each row
laid out like the tensor), so a kernel can update all of a weight's averages in one op that reads
the weight once (``foreach``'s stacked path: on 1024 tiny tensors 0.76x the time of two separate
averages, where N separate tensors take 0.99x). Moving or re-casting a name moves its rows
together; every slot's shadow stays its own tensor object for users (``average(name, slot=)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel works on: a DTensor's local shard (a view of the storage FSDP2 gathers
    from, not a differentiable copy of it), else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    if to_local is None:
        return tensor
    with torch.no_grad():
        return to_local()


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a DTensor's local shard, ``to_local``, is what kernels see)."""
    return hasattr(tensor, "to_local")


def shard_start(tensor: torch.Tensor) -> int:
    """Where this rank's local block of ``tensor`` starts among the full tensor's elements.

    The shards of a DTensor tile the full tensor in blocks: a local block of shape
    :math:`(l_0, \\dots, l_{D-1})` at global offset :math:`(o_0, \\dots, o_{D-1})`. Counting
    blocks in row-major order of their offsets, the elements of the blocks before this one are

    .. math:: \\mathrm{start} = \\sum_{d} \\Big(\\prod_{e<d} l_e\\Big)\\, o_d
              \\prod_{e>d} n_e

    for the full shape :math:`(n_0, \\dots)`: term ``d`` counts the blocks that share this
    one's index ranges in the dimensions before ``d`` and come before it in dimension ``d``
    (:math:`l_e` indices in each earlier dimension, :math:`o_d` in ``d``, all :math:`n_e` in each
    later one). So the ranges ``[start, start + local numel)`` of the distinct shards partition ``[0, numel)``,
    replicas of one shard (``Replicate()`` mesh dimensions, HSDP) get the same range, and for
    ``Shard(0)`` (FSDP2) ``start`` is the shard's first element's index in the flattened full
    tensor, so ``start + i`` is local element ``i``'s. ``0`` for a plain tensor.
    """
    if not is_dtensor(tensor):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    full = tuple(tensor.shape)
    shape, offset = compute_local_shape_and_global_offset(
        full, tensor.device_mesh, tensor.placements
    )
    return sum(
        math.prod(shape[:d]) * offset[d] * math.prod(full[d + 1 :]) for d in range(len(full))
    )


def assign(shadow: torch.Tensor, value: torch.Tensor) -> None:
    """``shadow.copy_(value)`` across layouts: a plain (full) value into a DTensor shadow copies
    the shadow's block of it (every rank holds the full value: nothing is sent), a DTensor value
    into a plain shadow gathers it (a collective). For loading a plain checkpoint into sharded
    shadows and a sharded one into plain shadows."""
    if is_dtensor(shadow) and not is_dtensor(value):
        from torch.distributed.tensor import distribute_tensor

        block = distribute_tensor(value, shadow.device_mesh, shadow.placements, src_data_rank=None)
        local(shadow).copy_(local(block))
    elif is_dtensor(value) and not is_dtensor(shadow):
        shadow.copy_(value.full_tensor())
    else:
        shadow.copy_(value)


class ShadowStore:
    """Shadows keyed by (slot, name) for ``tracked`` = ordered ``(name, tensor, kind)``."""

    def __init__(
        self,
        tracked: Sequence[tuple[str, torch.Tensor, str]],
        slots: Sequence[str] = ("ema",),
        *,
        shadow_dtype: torch.dtype | None = None,
        offload: str | None = None,
    ) -> None:
        if not slots or len(set(slots)) != len(slots):
            raise ValueError(
                f"slots must be distinct names, at least one, got {list(slots)!r}; e.g. ('ema',)."
            )
        self.slots = tuple(slots)
        self.shadow_dtype = shadow_dtype
        self.offload = offload
        self.averaged: list[str] = []
        self.copied: list[str] = []
        self._shadows: dict[str, dict[str, torch.Tensor]] = {slot: {} for slot in self.slots}
        self._copies: dict[str, torch.Tensor] = {}
        self._rows: dict[str, torch.Tensor] = {}  # name -> (N, *shape): its slots' shadows
        for name, tensor, kind in tracked:
            if kind == "average":
                self.averaged.append(name)
                rows = self._make_rows(tensor)
                if rows is not None:
                    self._rows[name] = rows
                for k, slot in enumerate(self.slots):
                    self._shadows[slot][name] = (
                        rows[k] if rows is not None else self.make(tensor, kind)
                    )
            elif kind == "copy":
                self.copied.append(name)
                self._copies[name] = self.make(tensor, kind)
            else:
                raise ValueError(f"kind must be 'average' or 'copy', got {kind!r} for {name!r}.")

    # ------------------------------------------------------------------ the dtype policy

    def dtype_for(self, tensor: torch.Tensor, kind: str) -> torch.dtype:
        """Copied tensors keep their dtype; averaged ones take ``shadow_dtype``, else their own,
        with fp32 for bf16/fp16."""
        if kind != "average":
            return tensor.dtype
        if self.shadow_dtype is not None:
            return self.shadow_dtype
        return torch.float32 if tensor.dtype in LOW_PRECISION else tensor.dtype

    def placed(self, shadow: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """``shadow`` where it lives: beside its tensor, or in host memory if offloaded, pinned
        when ``tensor`` is on CUDA (asynchronous copies; a CPU-only machine cannot pin). An
        offloaded DTensor shadow keeps its mesh and placements over a host local shard, as FSDP2's
        own ``CPUOffloadPolicy`` keeps its parameters."""
        if self.offload != "cpu":
            return shadow
        shard = local(shadow).cpu()
        if tensor.is_cuda:
            shard = shard.pin_memory()
        if not is_dtensor(shadow):
            return shard
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            shard,
            shadow.device_mesh,
            shadow.placements,
            shape=shadow.shape,
            stride=shadow.stride(),
        )

    def make(self, tensor: torch.Tensor, kind: str) -> torch.Tensor:
        """A new shadow of ``tensor``: its value, in the policy's dtype, where shadows live."""
        shadow = tensor.detach().to(dtype=self.dtype_for(tensor, kind), copy=True)
        return self.placed(shadow, tensor)

    def _make_rows(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The N slots' shadows of ``tensor`` as the rows of one new ``(N, *shape)`` tensor, each
        row laid out as :meth:`make` lays out a shadow; ``None`` for one slot, an empty tensor or
        a DTensor (whose shadows keep their placements)."""
        n = len(self.slots)
        if n == 1 or tensor.numel() == 0 or is_dtensor(tensor):
            return None
        value = tensor.detach()
        where = torch.device("cpu") if self.offload == "cpu" else value.device
        like = torch.empty_like(value, dtype=self.dtype_for(tensor, "average"), device="meta")
        rows = torch.empty_strided(
            (n, *like.shape),
            (like.numel(), *like.stride()),
            dtype=like.dtype,
            device=where,
            pin_memory=self.offload == "cpu" and value.is_cuda,
        )
        rows.copy_(value.unsqueeze(0).expand(rows.shape))
        return rows

    def _repoint_rows(self, name: str, rows: torch.Tensor) -> None:
        """Make ``name``'s slot shadows the rows of ``rows`` (keeping the objects)."""
        self._rows[name] = rows
        for k, slot in enumerate(self.slots):
            self._shadows[slot][name].data = rows[k]

    # ------------------------------------------------------------------ reading

    def kind(self, name: str) -> str | None:
        if name in self._copies:
            return "copy"
        return "average" if name in self._shadows[self.slots[0]] else None

    def get(self, name: str, slot: str | None = None) -> torch.Tensor | None:
        """The shadow of ``name`` in ``slot`` (the first slot by default; copies are shared)."""
        if name in self._copies:
            return self._copies[name]
        return self._shadows[self._slot(slot)].get(name)

    def shadow(self, name: str, slot: str | None = None) -> torch.Tensor:
        """:meth:`get` for a tracked ``name`` (a ``KeyError`` for an unknown one)."""
        found = self.get(name, slot)
        if found is None:
            raise KeyError(f"{name!r} is not tracked.")
        return found

    def names(self) -> list[str]:
        """Every tracked name, averaged first, then copied (the kernels' order)."""
        return self.averaged + self.copied

    def items(self, slot: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, shadow)`` of one slot, copied tensors included."""
        shadows = self._shadows[self._slot(slot)]
        for name in self.averaged:
            yield name, shadows[name]
        for name in self.copied:
            yield name, self._copies[name]

    def all(self) -> Iterator[torch.Tensor]:
        """Every shadow once: each slot's averaged shadows, then the shared copies."""
        for slot in self.slots:
            yield from self._shadows[slot].values()
        yield from self._copies.values()

    def slot_lists(self) -> list[list[torch.Tensor]]:
        """Per slot, the averaged shadows as the kernels take them (local shards)."""
        return [[local(self._shadows[s][n]) for n in self.averaged] for s in self.slots]

    def copy_list(self) -> list[torch.Tensor]:
        """The copied shadows as the kernels take them (local shards)."""
        return [local(self._copies[n]) for n in self.copied]

    def positions(self) -> list[tuple[int, int]]:
        """Per averaged name, where its local shadow sits in the full tensor: ``(numel of the
        full tensor, start of the local block)`` (:func:`shard_start`; ``(numel, 0)`` unsharded),
        for the stochastic-rounding stream."""
        first = self._shadows[self.slots[0]]
        return [(first[n].numel(), shard_start(first[n])) for n in self.averaged]

    # ------------------------------------------------------------------ changing

    def recast(self, name: str, tensor: torch.Tensor) -> None:
        """Re-cast ``name``'s shadows by the policy for ``tensor`` (a tensor that changed dtype),
        keeping the shadow objects: callers of ``average(name)`` hold them."""
        kind = self.kind(name)
        if kind is None:
            raise KeyError(name)
        dtype = self.dtype_for(tensor, kind)
        rows = self._rows.get(name)
        if rows is not None:
            if rows.dtype != dtype:
                self._repoint_rows(name, self.placed(rows.to(dtype), tensor))
            return
        for shadow in self._of(name):
            if shadow.dtype != dtype:
                shadow.data = self.placed(shadow.data.to(dtype), tensor)

    def to(self, device: torch.device | str) -> None:
        """Move every shadow to ``device``, keeping the objects where the tensor type allows."""
        stacked = set(self._rows)
        for name, rows in list(self._rows.items()):
            moved = rows.to(device)
            if torch._has_compatible_shallow_copy_type(rows, moved):
                self._repoint_rows(name, moved)
            else:  # e.g. to or from "meta": new tensors, no longer rows of one
                del self._rows[name]
                for k, slot in enumerate(self.slots):
                    self._shadows[slot][name] = moved[k]
        for table in (*self._shadows.values(), self._copies):
            for name, shadow in table.items():
                if name in stacked and table is not self._copies:
                    continue  # moved with its rows
                moved = shadow.data.to(device)
                if torch._has_compatible_shallow_copy_type(shadow, moved):
                    shadow.data = moved
                else:  # e.g. to or from "meta": a new tensor type
                    table[name] = moved

    # ------------------------------------------------------------------ helpers

    def _slot(self, slot: str | None) -> str:
        if slot is None:
            return self.slots[0]
        if slot not in self._shadows:
            raise KeyError(f"no slot {slot!r}; this average keeps the slots {list(self.slots)}.")
        return slot

    def _of(self, name: str) -> list[torch.Tensor]:
        if name in self._copies:
            return [self._copies[name]]
        return [self._shadows[slot][name] for slot in self.slots]

    def __repr__(self) -> str:
        info: dict[str, Any] = {
            "slots": list(self.slots),
            "averaged": len(self.averaged),
            "copied": len(self.copied),
        }
        return f"ShadowStore({info})"
