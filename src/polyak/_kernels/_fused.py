"""The fused path: one compiled function per (device, dtype) group, no temporaries.

``torch.compile`` turns the per-tensor update below into fused kernels (Triton on CUDA, vectorised
C++ on the CPU) that read each source and shadow once and write each shadow once: a bf16 source is
upcast in registers, not through a scratch buffer, so the bytes moved are the floor (10 per element
for bf16 weights with fp32 shadows, 12 for fp32, 6 for bf16 shadows with stochastic rounding).

The weight ``w = 1 - decay`` is a 0-dim float64 tensor on the device that the update fills (or that
a capturable EMA computes on the device), so a new decay never recompiles and never synchronises.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from polyak._kernels._base import (
    DeviceState,
    group_by_device_and_dtype,
    lerp_in_compute_dtype,
    require_bf16_shadows,
    segment_offsets,
)
from polyak._kernels._stochastic import keyed_stochastic_lerp_, stream_key


def lerp_group(
    shadows: list[torch.Tensor], sources: list[torch.Tensor], weight: torch.Tensor
) -> None:
    """The pure per-group update the compiler fuses: ``s = lerp(s, p.to(s.dtype), w)``.

    Computed in fp32 (fp64 for fp64 shadows) and rounded once into the shadow, with the weight in
    that dtype too, exactly as ATen's ``lerp_`` with a float weight (see ``compute_dtype``).
    """
    for shadow, source in zip(shadows, sources, strict=True):
        if shadow.dim() == 0:  # inductor drops in-place writes to 0-dim float64 CPU inputs
            shadow, source = shadow.view(1), source.view(1)
        shadow.copy_(lerp_in_compute_dtype(shadow, source, weight))


def advance_key(seed: torch.Tensor, counter: torch.Tensor, key: torch.Tensor) -> None:
    """``counter += 1; key = stream_key(seed, counter)``, in place: the next update's key.

    A kernel of its own, so the big update loops load one int32 instead of hashing (seed,
    counter) again on every iteration.
    """
    counter.add_(1)
    key.copy_(stream_key(seed, counter))


def stochastic_lerp_group(
    shadows: list[torch.Tensor],
    sources: list[torch.Tensor],
    weight: torch.Tensor,
    key: torch.Tensor,
    offsets: list[int],
) -> None:
    """bf16 shadows: the lerp in fp32, stochastically rounded (see :mod:`._stochastic`).

    The same stream as ``stochastic_lerp_`` per tensor, with the update's ``key`` precomputed.
    """
    for shadow, source, offset in zip(shadows, sources, offsets, strict=True):
        if shadow.dim() == 0:  # as in lerp_group
            shadow, source = shadow.view(1), source.view(1)
        keyed_stochastic_lerp_(shadow, source, weight, key, offset)


def copy_group(shadows: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    torch._foreach_copy_(shadows, sources)


def _compile(fn: Callable[..., None], **options: bool) -> Callable[..., None]:
    """``torch.compile`` a private copy of ``fn`` (``options``: inductor's).

    Dynamo caches compiled graphs on the function's code object and stops compiling after
    ``recompile_limit`` (8) distinct shape/dtype sets per code object, silently falling back to
    eager; each update plan compiles its own copy, so many EMAs (or groups) never share that budget,
    and no call checks guards of graphs that belong to other plans.
    """
    private = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    return torch.compile(private, fullgraph=True, dynamic=False, options=options or None)


class FusedUpdate:
    """Compiled per-group updates; optionally stochastic rounding into bf16 shadows."""

    def __init__(
        self,
        shadows: list[torch.Tensor],
        sources: list[torch.Tensor],
        *,
        stochastic: bool = False,
        seed: int = 0,
    ) -> None:
        self.groups = list(group_by_device_and_dtype(shadows, sources).items())
        devices = {device for (device, _, _), _ in self.groups}
        self.state = DeviceState(devices, seed)
        self.stochastic = stochastic
        if stochastic:
            require_bf16_shadows(shadows)
            self.keys = {d: torch.zeros((), dtype=torch.int32, device=d) for d in devices}
            # element offsets in the concatenation of *all* shadows, as the reference path uses,
            # so every tensor draws its own stretch of the random stream
            start = {id(s): o for s, o in zip(shadows, segment_offsets(shadows), strict=True)}
            self.offsets = [[start[id(s)] for s in group] for _, (group, _) in self.groups]
            self._sr = _compile(stochastic_lerp_group)
            self._advance = _compile(advance_key)
        # inductor drops the rounding of an fp32 source cast to bf16/fp16 shadows unless told to
        # emulate it; the reference (and ATen) round the source first
        self._lerp = _compile(lerp_group, emulate_precision_casts=True)
        self._copy = copy_group

    def lerp_(self, weight: float | torch.Tensor) -> None:
        self.state.fill(weight)
        if self.stochastic:  # one key per update and device, shared by all its groups
            for device, key in self.keys.items():
                self._advance(self.state.seeds[device], self.state.counters[device], key)
        for index, ((device, _, _), (shadows, sources)) in enumerate(self.groups):
            w = self.state.weight(weight, device)
            if self.stochastic:
                self._sr(shadows, sources, w, self.keys[device], self.offsets[index])
            else:
                self._lerp(shadows, sources, w)

    def copy_(self) -> None:
        for _, (shadows, sources) in self.groups:
            self._copy(shadows, sources)
