"""Multi-tensor updates: one ``torch._foreach_*`` call per (device, dtype) group."""

from __future__ import annotations

import torch

from polyak._kernels._base import compute_dtype, group_by_device_and_dtype

# Upper bound on the scratch buffer that upcasts low-precision sources, or the largest single tensor
# if that is bigger. On a CPU a chunk must stay in cache between the upcast and the lerp (4 MiB of
# fp32, well inside L3; a 64 MiB chunk ran 3x slower on a 32 MiB-L3 EPYC); on a GPU larger chunks
# mean fewer launches (64 MiB).
SCRATCH_ELEMENTS = {"cpu": 1 << 20}
SCRATCH_ELEMENTS_DEFAULT = 1 << 24


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


class _Chunk:
    """Sources upcast into views of the shared scratch, then lerped into their shadows."""

    __slots__ = ("shadows", "sources", "views")

    def __init__(
        self, shadows: list[torch.Tensor], sources: list[torch.Tensor], views: list[torch.Tensor]
    ) -> None:
        self.shadows, self.sources, self.views = shadows, sources, views


class ForeachUpdate:
    """``_foreach_lerp_`` / ``_foreach_copy_`` per group; mixed dtypes through a scratch buffer.

    ``_foreach_lerp_`` refuses a source whose dtype differs from its shadow's (bf16 weights with fp32
    shadows), so such groups copy their sources into one persistent scratch of the shadow dtype
    (exact: every bf16/fp16 value is an fp32 value), a chunk at a time, then lerp from there.
    """

    def __init__(
        self,
        shadows: list[torch.Tensor],
        sources: list[torch.Tensor],
        *,
        stochastic: bool = False,
        seed: int = 0,
    ) -> None:
        if stochastic:
            raise ValueError(
                "the foreach kernel cannot round stochastically (no multi-tensor op does it); use "
                "kernel='fused' (or 'auto') with rounding='stochastic'."
            )
        self.weights: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        self.same: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.mixed: list[_Chunk] = []
        self.scratch: list[torch.Tensor] = []
        for (device, shadow_dtype, source_dtype), (
            group_shadows,
            group_sources,
        ) in group_by_device_and_dtype(shadows, sources).items():
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

    def lerp_(self, weight: float | torch.Tensor) -> None:
        tensor = isinstance(weight, torch.Tensor)
        for shadows, sources in self.same:
            w = self._weights(weight, shadows) if tensor else weight
            torch._foreach_lerp_(shadows, sources, w)
        for chunk in self.mixed:
            torch._foreach_copy_(chunk.views, chunk.sources)
            w = self._weights(weight, chunk.shadows) if tensor else weight
            torch._foreach_lerp_(chunk.shadows, chunk.views, w)

    def copy_(self) -> None:
        for shadows, sources in self.same:
            torch._foreach_copy_(shadows, sources)
        for chunk in self.mixed:
            torch._foreach_copy_(chunk.shadows, chunk.sources)
