"""The one interface every kernel implements, and helpers they share."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

import torch


class Update(Protocol):
    """An update planned once for fixed lists of shadows and sources.

    ``lerp_(w)``: :math:`s_i \\leftarrow s_i + w (p_i - s_i)` for every pair, in the shadow's dtype
    (``w = 1 - decay``, a Python float, or a 0-dim tensor on the device for capturable updates).
    ``copy_()``: :math:`s_i \\leftarrow p_i`.
    """

    def lerp_(self, weight: float | torch.Tensor) -> None: ...

    def copy_(self) -> None: ...


Group = tuple[list[torch.Tensor], list[torch.Tensor]]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an update is computed in: fp64 for fp64 shadows, else fp32.

    This is ATen's "opmath" type: ``bf16_shadow.lerp_(p, 1e-4)`` upcasts to fp32, takes the
    Python-float weight in fp32 and rounds the result once. A weight held as a *tensor* must be
    read in this dtype too, not in the shadow's: bf16 would turn ``1 - 0.9999`` into
    ``1.00136e-4`` (an EMA horizon 0.14% short), and fp16 rounds ``1e-8`` to zero.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def lerp_in_compute_dtype(
    shadow: torch.Tensor, source: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``lerp(s, p.to(s.dtype), w)`` computed in ``compute_dtype(s.dtype)``, not yet rounded.

    The source is rounded to the shadow's dtype first; ``shadow.copy_(...)`` of the result then
    rounds once, which is ATen's ``shadow.lerp_(p, float(w))`` bit for bit.
    """
    c = compute_dtype(shadow.dtype)
    return torch.lerp(shadow.to(c), source.to(shadow.dtype).to(c), weight.to(c))


def segment_offsets(shadows: Sequence[torch.Tensor]) -> list[int]:
    """The start of each tensor in the concatenation of all of them (random-stream positions)."""
    offsets, total = [], 0
    for shadow in shadows:
        offsets.append(total)
        total += shadow.numel()
    return offsets


def group_by_device_and_dtype(
    shadows: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]
) -> dict[tuple[torch.device, torch.dtype, torch.dtype], Group]:
    """Pairs grouped by (device, shadow dtype, source dtype), order kept within each group."""
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype], Group] = defaultdict(
        lambda: ([], [])
    )
    for shadow, source in zip(shadows, sources, strict=True):
        if shadow.device != source.device:
            raise ValueError(
                f"a shadow is on {shadow.device} but its tensor is on {source.device}; "
                f"keep the model on one device, or call ema.to(device) after moving it."
            )
        key = (shadow.device, shadow.dtype, source.dtype)
        groups[key][0].append(shadow)
        groups[key][1].append(source)
    return dict(groups)


def require_bf16_shadows(shadows: Sequence[torch.Tensor]) -> None:
    """Stochastic rounding rounds into bf16 only: refuse any other shadow dtype, clearly."""
    for shadow in shadows:
        if shadow.dtype != torch.bfloat16:
            raise ValueError(
                f"stochastic rounding needs bf16 shadows, got {shadow.dtype}; pass "
                f"shadow_dtype=torch.bfloat16 with rounding='stochastic'."
            )


class DeviceState:
    """Per device, the 0-dim tensors an update reads on the device instead of from the host.

    ``weights``: ``w = 1 - decay`` (fp64), filled from a Python float by :meth:`weight`, so a new
    decay never recompiles or synchronises; ``seeds`` and ``counters`` (int64): the stochastic
    stream's seed and update counter, advanced by :meth:`advance` (captured, it advances at
    every replay).
    """

    def __init__(self, devices: set[torch.device], seed: int = 0) -> None:
        self.weights = {d: torch.zeros((), dtype=torch.float64, device=d) for d in devices}
        self.seeds = {d: torch.tensor(seed, dtype=torch.int64, device=d) for d in devices}
        self.counters = {d: torch.zeros((), dtype=torch.int64, device=d) for d in devices}

    def fill(self, weight: float | torch.Tensor) -> None:
        """Write a Python-float weight into every device's weight tensor (a tensor is used as is)."""
        if not isinstance(weight, torch.Tensor):
            for w in self.weights.values():
                w.fill_(weight)

    def weight(self, weight: float | torch.Tensor, device: torch.device) -> torch.Tensor:
        """The weight as a tensor on ``device``: the caller's, or the one :meth:`fill` wrote."""
        return weight if isinstance(weight, torch.Tensor) else self.weights[device]

    def advance(self) -> None:
        for counter in self.counters.values():
            counter.add_(1)
