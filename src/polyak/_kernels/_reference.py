"""The single-tensor reference path: the definition every faster kernel is tested against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polyak._kernels._base import (
    SlotState,
    Weight,
    Weights,
    as_weights,
    check_gate,
    check_slots,
    lerp_in_compute_dtype,
)
from polyak._kernels._stochastic import stochastic_lerp_, stream_offsets


class ReferenceUpdate:
    """One ``lerp_`` per tensor and slot, the source cast to the shadow's dtype first.

    For every slot ``k`` and pair ``i``: ``s[k][i].lerp_(p[i].to(s.dtype), w[k])`` (ATen rounds
    once, computing in fp32, or fp64 for fp64 shadows); a tensor weight is read in that compute
    dtype too (``lerp_in_compute_dtype``).

    With ``stochastic=True`` the bf16 shadows are rounded stochastically from the fp32 lerp, with
    the same random bits as the fused path (same seed, counter and element offsets); slot ``k``
    draws the stream at offsets shifted by ``k`` times one slot's element count (``stream_offsets``,
    with the shards' ``positions`` in their full tensors where given),
    so slot 0 draws exactly a one-slot update's bits. The counter advances once per ``lerp_``,
    gated or not.

    A ``gate`` (0-dim bool tensor, ``True`` skips) is applied on the device, never read on the host:
    each tensor's result is computed into a scratch tensor (one per device and dtype, as large as
    the largest shadow, allocated at the first gated update) by the very same operation, and
    ``torch.where(gate, s, result, out=s)`` keeps or replaces it, so a skipped update leaves the
    shadow's bits as they were (NaN or inf sources included) and an update that runs writes the
    ungated bits. Cost: a copy and a select per tensor on top of the lerp.
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
        check_slots(slots, sources)
        self.slots = slots
        self.shadows = slots[0]
        self.sources = sources
        self.stochastic = stochastic
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        if stochastic:
            # the stream's state lives beside the shadows: a captured update advances it on the
            # device at every replay, and no update copies it from the host
            self.state = SlotState({s.device for s in slots[0]}, len(slots), seed)
            # each slot draws its own stretch of the stream, at the full tensors' positions
            self.offsets = [stream_offsets(slots[0], k, positions) for k in range(len(slots))]

    def lerp_(self, weights: Weights, gate: torch.Tensor | None = None) -> None:
        weights = as_weights(weights, len(self.slots))
        check_gate(gate)
        if self.stochastic:
            self.state.advance()
            self.state.fill(weights)
        for k, shadows in enumerate(self.slots):
            for i, (shadow, source) in enumerate(zip(shadows, self.sources, strict=True)):
                if gate is None:
                    self._lerp(shadow, source, weights, k, i)
                else:
                    result = self._result_buffer(shadow)
                    result.copy_(shadow)
                    self._lerp(result, source, weights, k, i)
                    torch.where(gate, shadow, result, out=shadow)

    def _lerp(
        self, shadow: torch.Tensor, source: torch.Tensor, weights: list[Weight], k: int, i: int
    ) -> None:
        """Slot ``k``'s update of pair ``i``, written into ``shadow`` (the shadow or its copy)."""
        weight = weights[k]
        if self.stochastic:
            device = shadow.device
            stochastic_lerp_(
                shadow,
                source,
                self.state.slot_tensors(weights, device)[k],
                self.state.seeds[device],
                self.state.counters[device],
                self.offsets[k][i],
            )
        elif isinstance(weight, torch.Tensor):  # as ATen reads a float one (compute_dtype)
            shadow.copy_(lerp_in_compute_dtype(shadow, source, weight))
        else:
            shadow.lerp_(source.to(shadow.dtype), weight)

    def _result_buffer(self, shadow: torch.Tensor) -> torch.Tensor:
        """A contiguous scratch tensor of ``shadow``'s shape, reused by every gated update."""
        key = (shadow.device, shadow.dtype)
        if key not in self._scratch:
            size = max((s.numel() for s in self.shadows if (s.device, s.dtype) == key), default=0)
            self._scratch[key] = torch.empty(size, dtype=shadow.dtype, device=shadow.device)
        flat = self._scratch[key]
        return flat[: shadow.numel()].view(shadow.shape)

    def copy_(self, gate: torch.Tensor | None = None) -> None:
        """``shadow <- source`` for every slot; with ``gate``: ``where(gate, shadow, source)``."""
        check_gate(gate)
        for shadows in self.slots:
            for shadow, source in zip(shadows, self.sources, strict=True):
                if gate is None:
                    shadow.copy_(source)
                else:
                    torch.where(gate, shadow, source.to(shadow.dtype), out=shadow)
