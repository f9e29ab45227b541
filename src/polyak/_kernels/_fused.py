"""The fused path: one compiled function per (device, dtype) group, no temporaries.

``torch.compile`` turns the per-tensor update below into fused kernels (Triton on CUDA, vectorised
C++ on the CPU) that read each source and shadow once and write each shadow once: a bf16 source is
upcast in registers, not through a scratch buffer, so the bytes moved are the floor (10 per element
for bf16 weights with fp32 shadows, 12 for fp32, 6 for bf16 shadows with stochastic rounding).

With N slots (several averages of the same weights) the function updates every slot's shadow of a
tensor from one read of the source: inductor fuses the N writes into one loop per tensor, so the
floor is ``p + 2N s`` bytes per element (20 for two fp32 slots, against 24 for two one-slot
updates).

Each slot's weight ``w_k = 1 - decay_k`` is a 0-dim float64 tensor on the device that the update
fills (or that a capturable EMA computes on the device), so a new decay never recompiles and never
synchronises. The gate, a 0-dim bool tensor on the device, selects the old shadow where it is set
(``torch.where``: a select, so a NaN or inf source cannot leak in, as it would through a zero
weight); the flag's value never recompiles. Gated and ungated updates are two compiled variants,
each compiled on its first use: compilation is what this kernel costs (per tensor: over 45 s for a
289-tensor model on an H200, against under a second for the Triton kernel), so an update given no
gate compiles exactly the graph it did before gates existed, and a caller that always passes a
gate compiles only the gated one. (One variant reading a persistent False gate would save the
second compilation only for callers that mix the two, and cost every other caller the select's
share of the compile time, about 10% on a 20-tensor CPU model.)

A set gate leaves every shadow bit-identical, with one exception: a bf16/fp16 shadow that already
holds a NaN passes through fp32 in the compiled loop and may come back as another NaN (quieted, a
canonical payload). The Triton kernel, which skips its stores, keeps even those bits.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence

import torch

from polyak._kernels._base import SlotKernel, group_slots, lerp_in_compute_dtype
from polyak._kernels._foreach import gated_copy_
from polyak._kernels._stochastic import keyed_stochastic_lerp, stream_key, stream_offsets


def lerp_group(
    slots: list[list[torch.Tensor]],
    sources: list[torch.Tensor],
    weights: list[torch.Tensor],
    gate: torch.Tensor | None,
) -> None:
    """The pure per-group update the compiler fuses, for every slot ``k``:

    :math:`s_k \\leftarrow s_k` where ``gate``, else :math:`\\mathrm{lerp}(s_k, p, w_k)` with
    ``p`` cast to the shadow's dtype first, computed in fp32 (fp64 for fp64 shadows) and rounded
    once into the shadow, the weight in that dtype too: ATen's ``lerp_`` with a float weight (see
    ``compute_dtype``). The loop runs over tensors, then slots, so each source is read once.
    ``gate=None`` traces no select at all (a variant of its own, see the module docstring).
    """
    for index, source in enumerate(sources):
        if source.dim() == 0:  # inductor drops in-place writes to 0-dim float64 CPU inputs
            source = source.view(1)
        for shadows, weight in zip(slots, weights, strict=True):
            shadow = shadows[index]
            if shadow.dim() == 0:
                shadow = shadow.view(1)
            new = lerp_in_compute_dtype(shadow, source, weight).to(shadow.dtype)
            shadow.copy_(new if gate is None else torch.where(gate, shadow, new))


def advance_key(seed: torch.Tensor, counter: torch.Tensor, key: torch.Tensor) -> None:
    """``counter += 1; key = stream_key(seed, counter)``, in place: the next update's key.

    A kernel of its own, so the big update loops load one int32 instead of hashing (seed,
    counter) again on every iteration.
    """
    counter.add_(1)
    key.copy_(stream_key(seed, counter))


def stochastic_lerp_group(
    slots: list[list[torch.Tensor]],
    sources: list[torch.Tensor],
    weights: list[torch.Tensor],
    gate: torch.Tensor | None,
    key: torch.Tensor,
    offsets: list[list[int]],
) -> None:
    """bf16 shadows: the lerp in fp32, stochastically rounded (see :mod:`._stochastic`).

    The same stream as ``stochastic_lerp_`` per tensor, with the update's ``key`` precomputed;
    ``offsets[k][i]`` is where slot ``k``'s shadow ``i`` starts in the stream (``stream_offsets``).
    """
    for index, source in enumerate(sources):
        if source.dim() == 0:  # as in lerp_group
            source = source.view(1)
        for shadows, weight, starts in zip(slots, weights, offsets, strict=True):
            shadow = shadows[index]
            if shadow.dim() == 0:
                shadow = shadow.view(1)
            new = keyed_stochastic_lerp(shadow, source, weight, key, starts[index])
            shadow.copy_(new if gate is None else torch.where(gate, shadow, new))


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


class FusedUpdate(SlotKernel):
    """Compiled per-group updates of N slots; optionally stochastic rounding into bf16 shadows.

    ``slots[k][i]`` is slot ``k``'s shadow of ``sources[i]`` (a plain list of shadows is one slot).
    """

    def __init__(
        self,
        slots: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]],
        sources: list[torch.Tensor],
        *,
        stochastic: bool = False,
        seed: int = 0,
        positions: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self._take_slots(slots, sources, stochastic)
        grouped = group_slots(self.slots, sources)
        # per group: its key, its tensors in every slot, its sources
        self.groups = [
            (key, [[slot[i] for i in index] for slot in self.slots], [sources[i] for i in index])
            for key, index in grouped
        ]
        devices = {device for (device, _, _), _, _ in self.groups}
        self._keep_state(devices, seed)
        if stochastic:
            self.keys = {d: torch.zeros((), dtype=torch.int32, device=d) for d in devices}
            # each slot draws its own stretch of the random stream (see stream_offsets)
            starts = [stream_offsets(self.slots[0], k, positions) for k in range(len(self.slots))]
            self.offsets = [[[start[i] for i in index] for start in starts] for _, index in grouped]
            # ungated and gated: two private copies, each compiled on its first call
            self._sr = _compile(stochastic_lerp_group)
            self._sr_gated = _compile(stochastic_lerp_group)
            self._advance = _compile(advance_key)
        # inductor drops the rounding of an fp32 source cast to bf16/fp16 shadows unless told to
        # emulate it; the reference (and ATen) round the source first
        self._lerp = _compile(lerp_group, emulate_precision_casts=True)
        self._lerp_gated = _compile(lerp_group, emulate_precision_casts=True)
        self._copy = copy_group

    def _run(self, weights: list[float | torch.Tensor], gate: torch.Tensor | None) -> None:
        if self.stochastic:  # one key per update and device, shared by all its groups and slots
            for device, key in self.keys.items():
                self._advance(self.state.seeds[device], self.state.counters[device], key)
        for index, ((device, _, _), slots, sources) in enumerate(self.groups):
            w = self.state.slot_tensors(weights, device)
            if self.stochastic:
                sr = self._sr if gate is None else self._sr_gated
                sr(slots, sources, w, gate, self.keys[device], self.offsets[index])
            else:
                (self._lerp if gate is None else self._lerp_gated)(slots, sources, w, gate)

    def copy_(self, gate: torch.Tensor | None = None) -> None:
        """Every slot: :math:`s_k \\leftarrow p`, unless ``gate`` (see ``gated_copy_``)."""
        if gate is not None and gated_copy_(self, self.slots, self.sources, gate):
            return
        for _, slots, sources in self.groups:
            for shadows in slots:
                self._copy(shadows, sources)
