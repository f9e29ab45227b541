"""The single-tensor reference path: the definition every faster kernel is tested against."""

from __future__ import annotations

import torch

from polyak._kernels._base import lerp_in_compute_dtype, segment_offsets
from polyak._kernels._stochastic import stochastic_lerp_


class ReferenceUpdate:
    """One ``lerp_`` per tensor, the source cast to the shadow's dtype first.

    With ``stochastic=True`` the bf16 shadows are rounded stochastically from the fp32 lerp, with
    the same random bits as the fused path (same seed, counter and element offsets).
    """

    def __init__(
        self,
        shadows: list[torch.Tensor],
        sources: list[torch.Tensor],
        *,
        stochastic: bool = False,
        seed: int = 0,
    ) -> None:
        self.shadows = shadows
        self.sources = sources
        self.stochastic = stochastic
        if stochastic:
            self.seed = torch.tensor(seed, dtype=torch.int64)
            self.counter = torch.zeros((), dtype=torch.int64)
            self.offsets = segment_offsets(shadows)

    def lerp_(self, weight: float | torch.Tensor) -> None:
        if self.stochastic:
            self.counter.add_(1)
        for index, (shadow, source) in enumerate(zip(self.shadows, self.sources, strict=True)):
            if self.stochastic:
                w = torch.as_tensor(weight, dtype=torch.float32, device=shadow.device)
                stochastic_lerp_(
                    shadow,
                    source,
                    w,
                    self.seed.to(shadow.device),
                    self.counter.to(shadow.device),
                    self.offsets[index],
                )
            elif isinstance(weight, torch.Tensor):  # as ATen reads a float one (compute_dtype)
                shadow.copy_(lerp_in_compute_dtype(shadow, source, weight))
            else:
                shadow.lerp_(source.to(shadow.dtype), weight)

    def copy_(self) -> None:
        for shadow, source in zip(self.shadows, self.sources, strict=True):
            shadow.copy_(source)
