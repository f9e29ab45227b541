"""The single-tensor reference path: the definition every faster kernel is tested against."""

from __future__ import annotations

import torch

from polyak._kernels._base import DeviceState, lerp_in_compute_dtype, segment_offsets
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
            # the stream's state lives beside the shadows: a captured update advances it on the
            # device at every replay, and no update copies it from the host
            self.state = DeviceState({s.device for s in shadows}, seed)
            self.offsets = segment_offsets(shadows)

    def lerp_(self, weight: float | torch.Tensor) -> None:
        if self.stochastic:
            self.state.advance()
            self.state.fill(weight)
        for index, (shadow, source) in enumerate(zip(self.shadows, self.sources, strict=True)):
            if self.stochastic:
                device = shadow.device
                stochastic_lerp_(
                    shadow,
                    source,
                    self.state.weight(weight, device),
                    self.state.seeds[device],
                    self.state.counters[device],
                    self.offsets[index],
                )
            elif isinstance(weight, torch.Tensor):  # as ATen reads a float one (compute_dtype)
                shadow.copy_(lerp_in_compute_dtype(shadow, source, weight))
            else:
                shadow.lerp_(source.to(shadow.dtype), weight)

    def copy_(self) -> None:
        for shadow, source in zip(self.shadows, self.sources, strict=True):
            shadow.copy_(source)
