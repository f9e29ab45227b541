"""The one interface every kernel implements, and helpers they share."""

from __future__ import annotations

import numbers
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


# ---------------------------------------------------------------- N slots (shared by fused, triton)

Slots = list[list[torch.Tensor]]
GroupKey = tuple[torch.device, torch.dtype, torch.dtype]


def as_slots(
    slots: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]],
    sources: Sequence[torch.Tensor],
) -> Slots:
    """``slots`` as N lists of shadows, each parallel to ``sources``; a clear error otherwise.

    ``slots[k][i]`` is slot k's shadow of ``sources[i]``. A plain list of tensors is one slot (the
    one-slot form of today's callers), and so is an empty list. Every slot holds the same shapes,
    dtypes and devices, and no tensor appears twice (each slot owns its shadows).
    """
    if isinstance(slots, torch.Tensor) or not isinstance(slots, Sequence):
        raise TypeError(
            f"slots must be a list of N lists of shadows (or one list of shadows for one slot), "
            f"got {type(slots).__name__}."
        )
    if not slots or isinstance(slots[0], torch.Tensor):
        slots = [slots]  # type: ignore[list-item]
    out: Slots = []
    for k, slot in enumerate(slots):
        if isinstance(slot, torch.Tensor) or not isinstance(slot, Sequence):
            raise TypeError(
                f"slot {k} is a {type(slot).__name__}, expected a list of shadows; pass "
                f"slots=[[s0_a, s0_b, ...], [s1_a, s1_b, ...]] (or one list for one slot)."
            )
        if len(slot) != len(sources):
            raise ValueError(
                f"slot {k} holds {len(slot)} shadows for {len(sources)} sources; give every slot "
                f"one shadow per source, in the sources' order."
            )
        for i, shadow in enumerate(slot):
            if not isinstance(shadow, torch.Tensor):
                raise TypeError(
                    f"slot {k}'s shadow {i} is a {type(shadow).__name__}, not a Tensor."
                )
        out.append(list(slot))
    seen: dict[int, tuple[int, int]] = {}
    for k, slot in enumerate(out):
        for i, shadow in enumerate(slot):
            first = out[0][i]
            if (shadow.shape, shadow.dtype, shadow.device) != (
                first.shape,
                first.dtype,
                first.device,
            ):
                raise ValueError(
                    f"slot {k}'s shadow {i} is {shadow.dtype} {tuple(shadow.shape)} on "
                    f"{shadow.device}, but slot 0's is {first.dtype} {tuple(first.shape)} on "
                    f"{first.device}; every slot holds the same shapes, dtypes and devices."
                )
            if id(shadow) in seen:
                raise ValueError(
                    f"slot {k}'s shadow {i} is the same tensor as slot {seen[id(shadow)][0]}'s "
                    f"shadow {seen[id(shadow)][1]}; every shadow needs its own tensor."
                )
            seen[id(shadow)] = (k, i)
    return out


def as_weights(weights: object, slots: int) -> list[float | torch.Tensor]:
    """``weights`` as one weight per slot: a float or a 0-dim tensor each.

    A single float or 0-dim tensor is a one-slot call (today's ``lerp_(w)``).
    """
    if isinstance(weights, torch.Tensor | numbers.Real):
        weights = [weights]
    if not isinstance(weights, Sequence) or isinstance(weights, str):
        raise TypeError(
            f"weights must be a float or 0-dim tensor per slot, got {type(weights).__name__}."
        )
    if len(weights) != slots:
        raise ValueError(
            f"got {len(weights)} weights for {slots} slots; pass one weight per slot (a float or "
            f"a 0-dim float64 tensor on the shadows' device each)."
        )
    for k, weight in enumerate(weights):
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
    return list(weights)


def check_gate(gate: torch.Tensor, device: torch.device) -> None:
    """A gate is a 0-dim bool tensor on ``device`` (read there, never on the host)."""
    if not isinstance(gate, torch.Tensor) or gate.dtype != torch.bool or gate.dim() != 0:
        what = (
            f"a {gate.dtype} tensor of shape {tuple(gate.shape)}"
            if isinstance(gate, torch.Tensor)
            else f"a {type(gate).__name__}"
        )
        raise TypeError(
            f"gate must be None or a 0-dim bool tensor (True skips the update), got {what}; "
            f"e.g. torch.zeros((), dtype=torch.bool, device=...)."
        )
    if gate.device != device:
        raise ValueError(
            f"the gate is on {gate.device} but the shadows are on {device}; keep the gate on the "
            f"shadows' device (it is read there, without a host sync)."
        )


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
    """Per device, the tensors an N-slot update reads on the device instead of from the host.

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
