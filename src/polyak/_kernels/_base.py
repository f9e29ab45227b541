"""The one interface every kernel implements, and helpers they share."""

from __future__ import annotations

import numbers
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

import torch

Weight = float | torch.Tensor
"""One slot's lerp weight ``w = 1 - decay``: a Python float, or a 0-dim fp64 tensor on the device."""

Weights = Weight | Sequence[Weight]
"""What ``lerp_`` takes: one weight per slot, or a single weight for a one-slot update."""


class Update(Protocol):
    """An update planned once for one source list and N >= 1 slots of shadows.

    ``slots[k][i]`` is slot ``k``'s shadow of ``sources[i]``; every slot holds shadows of the same
    shapes, dtypes and devices (:func:`check_slots`).

    ``lerp_(weights, gate=None)``: for every slot ``k`` and pair ``i``,
    :math:`s_{k,i} \\leftarrow s_{k,i} + w_k (p_i - s_{k,i})`, in the shadow's compute dtype and
    rounded once into the shadow (``w_k = 1 - decay_k``, a Python float, or a 0-dim fp64 tensor on
    the device for capturable updates; a single weight is a one-slot call, :func:`as_weights`).
    ``gate``: ``None``, or a 0-dim bool tensor on the tensors' device; ``True`` skips the update,
    leaving every shadow bit for bit as it was, even where a source holds NaN or inf, without a
    host sync on CUDA and without allocating per update.
    ``copy_(gate=None)``: :math:`s_{k,i} \\leftarrow p_i` for every slot, unless ``gate`` (as
    for ``lerp_``: every shadow keeps its bits).
    """

    def lerp_(self, weights: Weights, gate: torch.Tensor | None = None) -> None: ...

    def copy_(self, gate: torch.Tensor | None = None) -> None: ...


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


def as_slots(
    shadows: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]],
) -> list[list[torch.Tensor]]:
    """One slot's shadows (a list of tensors, today's form) or N slots' (a list of lists), as N lists.

    An empty list is one empty slot.
    """
    if isinstance(shadows, torch.Tensor) or not isinstance(shadows, Sequence):
        raise TypeError(
            f"shadows must be a list of tensors (one slot) or a list of lists of tensors (one list "
            f"per slot), got {type(shadows).__name__}."
        )
    if all(isinstance(s, torch.Tensor) for s in shadows):
        return [list(shadows)]  # type: ignore[arg-type]
    if all(isinstance(s, (list, tuple)) for s in shadows):
        return [list(slot) for slot in shadows]  # type: ignore[union-attr]
    kinds = sorted({type(s).__name__ for s in shadows})
    raise TypeError(
        f"shadows must be a list of tensors (one slot) or a list of lists of tensors (one list per "
        f"slot), got a list holding {', '.join(kinds)}; wrap each slot's shadows in its own list."
    )


def check_slots(slots: Sequence[Sequence[torch.Tensor]], sources: Sequence[torch.Tensor]) -> None:
    """Refuse slots that do not each hold one shadow per source, laid out alike, with a clear error.

    Every slot needs ``len(sources)`` shadows, and slot ``k``'s shadow ``i`` must have the shape of
    ``sources[i]`` and the dtype and device of slot 0's shadow ``i``; no tensor may sit in two
    slots (the second lerp would read the first one's result).
    """
    if len(slots) == 0:
        raise ValueError(
            "got 0 slots of shadows; pass at least one list of shadows (one per source), e.g. "
            "build(kernel, [shadows], sources)."
        )
    for k, slot in enumerate(slots):
        if len(slot) != len(sources):
            raise ValueError(
                f"slot {k} holds {len(slot)} shadows but there are {len(sources)} sources; every "
                f"slot needs one shadow per source, in the sources' order."
            )
        for i, shadow in enumerate(slot):
            if not isinstance(shadow, torch.Tensor):
                raise TypeError(
                    f"slot {k}'s shadow {i} is a {type(shadow).__name__}, not a Tensor; each slot "
                    f"is a flat list of shadows, one per source."
                )
    for i, source in enumerate(sources):
        first = slots[0][i]
        for k, slot in enumerate(slots):
            shadow = slot[i]
            if shadow.shape != source.shape:
                raise ValueError(
                    f"slot {k}'s shadow {i} has shape {tuple(shadow.shape)} but its source has "
                    f"shape {tuple(source.shape)}; allocate each shadow like its source "
                    f"(torch.empty_like(source, dtype=shadow_dtype))."
                )
            if k and (shadow.dtype, shadow.device) != (first.dtype, first.device):
                raise ValueError(
                    f"slot {k}'s shadow {i} is {shadow.dtype} on {shadow.device} but slot 0's is "
                    f"{first.dtype} on {first.device}; every slot must hold shadows of the same "
                    f"dtypes and devices (allocate each slot like slot 0)."
                )
            if k and any(shadow is slots[j][i] for j in range(k)):
                raise ValueError(
                    f"slot {k}'s shadow {i} is the same tensor as an earlier slot's; give each "
                    f"slot its own tensors (a shared one would be updated twice)."
                )


def as_weights(weights: Weights, slots: int) -> list[Weight]:
    """``lerp_``'s ``weights`` as a list of ``slots`` weights, or a clear error.

    A Python number or a 0-dim tensor is a one-slot call (today's ``lerp_(w)``); otherwise one
    weight per slot, in slot order.
    """
    if isinstance(weights, numbers.Real) or (
        isinstance(weights, torch.Tensor) and weights.dim() == 0
    ):
        listed: list[Weight] = [weights]  # type: ignore[list-item]
    elif isinstance(weights, torch.Tensor):
        raise ValueError(
            f"got a weight tensor of shape {tuple(weights.shape)}; pass one weight per slot as a "
            f"sequence of floats or 0-dim tensors (e.g. list(w.unbind()))."
        )
    elif isinstance(weights, str) or not isinstance(weights, Sequence):
        raise TypeError(
            f"weights must be a float or 0-dim tensor per slot, got {type(weights).__name__}."
        )
    else:
        listed = list(weights)
    if len(listed) != slots:
        raise ValueError(
            f"got {len(listed)} weight(s) for {slots} slot(s); pass one weight (1 - decay) per "
            f"slot, e.g. lerp_([w0, w1]) for two slots."
        )
    for k, weight in enumerate(listed):
        if isinstance(weight, torch.Tensor):
            if weight.dim() != 0:
                raise ValueError(
                    f"slot {k}'s weight is a tensor of shape {tuple(weight.shape)}; a device "
                    f"weight is a 0-dim tensor (torch.tensor(w, dtype=torch.float64, device=...))."
                )
        elif not isinstance(weight, numbers.Real):
            raise TypeError(
                f"slot {k}'s weight is a {type(weight).__name__}; expected a float or a 0-dim "
                f"tensor."
            )
    return listed


def check_gate(gate: torch.Tensor | None, device: torch.device | None = None) -> None:
    """``gate`` must be ``None`` or a 0-dim bool tensor (``True``: skip this update), on ``device``
    where given (it is read there, never on the host)."""
    if gate is None:
        return
    if not isinstance(gate, torch.Tensor) or gate.dtype != torch.bool or gate.dim() != 0:
        got = (
            f"a {gate.dtype} tensor of shape {tuple(gate.shape)}"
            if isinstance(gate, torch.Tensor)
            else f"{type(gate).__name__} {gate!r}"
        )
        raise TypeError(
            f"gate must be None or a 0-dim bool tensor on the tensors' device (True skips the "
            f"update), got {got}; e.g. gate=~torch.isfinite(loss)."
        )
    if device is not None and gate.device != device:
        raise ValueError(
            f"the gate is on {gate.device} but the shadows are on {device}; keep the gate on the "
            f"shadows' device (it is read there, without a host sync)."
        )


def group_indices(
    shadows: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]
) -> dict[tuple[torch.device, torch.dtype, torch.dtype], list[int]]:
    """Pair indices grouped by (device, shadow dtype, source dtype), in order within each group.

    Indices, not tensors, so that N slots can take their own shadows of one group.
    """
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype], list[int]] = defaultdict(list)
    for index, (shadow, source) in enumerate(zip(shadows, sources, strict=True)):
        if shadow.device != source.device:
            raise ValueError(
                f"a shadow is on {shadow.device} but its tensor is on {source.device}; "
                f"keep the model on one device, or call ema.to(device) after moving it."
            )
        groups[(shadow.device, shadow.dtype, source.dtype)].append(index)
    return dict(groups)


def group_by_device_and_dtype(
    shadows: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]
) -> dict[tuple[torch.device, torch.dtype, torch.dtype], Group]:
    """Pairs grouped by (device, shadow dtype, source dtype), order kept within each group."""
    return {
        key: ([shadows[i] for i in indices], [sources[i] for i in indices])
        for key, indices in group_indices(shadows, sources).items()
    }


def require_bf16_shadows(shadows: Sequence[torch.Tensor]) -> None:
    """Stochastic rounding rounds into bf16 only: refuse any other shadow dtype, clearly."""
    for shadow in shadows:
        if shadow.dtype != torch.bfloat16:
            raise ValueError(
                f"stochastic rounding needs bf16 shadows, got {shadow.dtype}; pass "
                f"shadow_dtype=torch.bfloat16 with rounding='stochastic'."
            )


# ------------------------------------------------ N slots, and the device state every kernel reads

Slots = list[list[torch.Tensor]]
GroupKey = tuple[torch.device, torch.dtype, torch.dtype]


def group_slots(slots: Slots, sources: Sequence[torch.Tensor]) -> list[tuple[GroupKey, list[int]]]:
    """The pair indices of each (device, shadow dtype, source dtype) group, order kept.

    Grouped as :func:`group_by_device_and_dtype` groups slot 0 (all slots are alike), by index, so
    each group can be taken from every slot.
    """
    indices: dict[GroupKey, list[int]] = defaultdict(list)
    group_by_device_and_dtype(slots[0], sources)  # its device check and error
    for i, (shadow, source) in enumerate(zip(slots[0], sources, strict=True)):
        indices[(shadow.device, shadow.dtype, source.dtype)].append(i)
    return list(indices.items())


class SlotState:
    """Per device, the tensors an N-slot update reads on the device instead of from the host
    (every kernel that reads weights, a gate or a random stream there keeps one).

    ``weights[d]``: the N per-slot weights ``w_k = 1 - decay_k`` as one fp64 vector, and
    ``slot_weights[d]`` its N 0-dim views, filled from Python floats by :meth:`fill` (a new decay
    never recompiles or synchronises); ``never[d]``: a False gate, which the Triton kernel reads
    when an update is given none; ``seeds`` and ``counters`` (int64): the stochastic stream's seed
    and update counter, advanced once per update, gated or not (captured, at every replay).
    """

    def __init__(self, devices: set[torch.device], slots: int, seed: int = 0) -> None:
        self.weights = {d: torch.zeros(slots, dtype=torch.float64, device=d) for d in devices}
        self.slot_weights = {d: list(v.unbind(0)) for d, v in self.weights.items()}
        self.never = {d: torch.zeros((), dtype=torch.bool, device=d) for d in devices}
        self.seeds = {d: torch.tensor(seed, dtype=torch.int64, device=d) for d in devices}
        self.counters = {d: torch.zeros((), dtype=torch.int64, device=d) for d in devices}

    def fill(self, weights: list[float | torch.Tensor]) -> None:
        """Write each Python-float weight into its slot on every device (tensors are used as is)."""
        for k, weight in enumerate(weights):
            if not isinstance(weight, torch.Tensor):
                for views in self.slot_weights.values():
                    views[k].fill_(weight)

    def slot_tensors(
        self, weights: list[float | torch.Tensor], device: torch.device
    ) -> list[torch.Tensor]:
        """The N weights as 0-dim tensors: the caller's, or the views :meth:`fill` wrote.

        A device weight given for two slots is copied into the second slot's view: a compiled
        function guards on its inputs being distinct and would compile again for the alias.
        """
        tensors: list[torch.Tensor] = []
        for weight, view in zip(weights, self.slot_weights[device], strict=True):
            if not isinstance(weight, torch.Tensor):
                tensors.append(view)
            elif any(weight is t for t in tensors):
                tensors.append(view.copy_(weight))
            else:
                tensors.append(weight)
        return tensors

    def advance(self) -> None:
        for counter in self.counters.values():
            counter.add_(1)


class SlotKernel:
    """What the kernels that plan per group (fused, triton) share: the slots checked against the
    sources, the device state, and the start of every ``lerp_``.

    A subclass calls :meth:`_take_slots` first in its ``__init__``, then :meth:`_keep_state` with
    the devices its groups run on, and implements :meth:`_run`.
    """

    slots: Slots
    sources: list[torch.Tensor]
    stochastic: bool
    state: SlotState

    def _take_slots(
        self,
        slots: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]],
        sources: Sequence[torch.Tensor],
        stochastic: bool,
    ) -> Slots:
        """Check and keep ``slots`` (one list of shadows, or N) and ``sources``."""
        self.slots = as_slots(slots)
        check_slots(self.slots, sources)
        if stochastic:
            require_bf16_shadows(self.slots[0])
        self.sources = list(sources)
        self.stochastic = stochastic
        return self.slots

    def _keep_state(self, devices: set[torch.device], seed: int) -> None:
        self.state = SlotState(devices, len(self.slots), seed)

    def lerp_(self, weights: Weights, gate: torch.Tensor | None = None) -> None:
        """Every slot ``k``: :math:`s_k \\leftarrow \\mathrm{lerp}(s_k, p, w_k)`, unless ``gate``.

        ``weights``: one float or 0-dim tensor per slot (one alone for one slot). ``gate``: None,
        or a 0-dim bool tensor on the shadows' device; True leaves every shadow as it was.
        """
        weights = as_weights(weights, len(self.slots))
        if gate is not None:
            for device in self.state.counters:
                check_gate(gate, device)
        self.state.fill(weights)
        self._run(weights, gate)

    def _run(self, weights: list[Weight], gate: torch.Tensor | None) -> None:
        raise NotImplementedError
