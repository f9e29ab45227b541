"""Non-finite weights (``nonfinite=``): whether an averaging update's tensors hold NaN or Inf, decided
without a host sync, and what the EMA does about it.

A NaN or Inf that reaches a shadow never leaves it: every later average of it is NaN. So under
``"skip"`` and ``"raise"`` each averaging update first reduces the tracked floating tensors to one
flag, and a set flag becomes the kernels' device gate, which leaves every shadow (averaged and
copied) bit for bit as it was:

- ``"skip"``: an update whose tensors hold NaN/Inf is left out, counted in :attr:`NonFinite.skipped`
  and otherwise forgotten. With a constant decay the averages equal, bit for bit, those of a run
  without those updates. :attr:`polyak.EMA.step` still counts the call (a schedule advances over
  it), and so does ``num_averages`` and a rule's own state (e.g. ``Uniform``'s count): the shadows
  alone stay untouched.
- ``"raise"``: the first such update trips a flag that gates it *and every later update*, so the
  averages stay those of the update before it; the next call that reads the averages anyway
  (swapping them in, ``copy_to``, exports, ``save``, ``state_dict``) raises
  :class:`~polyak.errors.NonFiniteError` naming the tensors and the step, until
  :meth:`NonFinite.clear` (``ema.clear_nonfinite()``) or a load.
- ``"detect"`` (the default): no check per update (the update is as cheap as it can be, and
  under FSDP2 runs no collective), so a NaN/Inf that reaches a shadow stays there; the next call
  that reads the averages (the same calls as ``"raise"``) reduces the shadows to one flag, reads
  it, and raises :class:`~polyak.errors.NonFiniteError` naming the tensors. The averages are
  lost (load a checkpoint), but never used, exported or saved silently. Under FSDP2 each rank
  checks its own shards, without a collective (a rank that raises stops the job).
- ``"ignore"``: no check at all; NaN reaches the averages and whatever reads them.

Two ways to decide, chosen per plan:

- :class:`NonFinite` in *device* mode (CUDA, capturable updates, or whenever the gate is not read on
  the host): ``torch._foreach_norm(tensors, inf)`` (one multi-tensor op; the max-norm is finite
  exactly when every element is, and cannot overflow), stacked into one float64 vector, reduced
  to a 0-dim flag with ``out=`` ops into persistent buffers; the step and the per-tensor norms of
  the first tripping update are kept on the device for the error message. No host sync, nothing
  read on the host, capturable in a CUDA graph.
- in *host* mode (CPU tensors, non-capturable; a CPU flag costs no device sync to read, and the
  CPU ``foreach`` kernel reads its gate on the host anyway): the 2-norm per tensor, which ATen
  vectorises on the CPU where the max-norm runs several times slower; a non-finite 2-norm
  (NaN: certainly; Inf: Inf, or a finite tensor whose squares overflowed) is then settled exactly
  for that tensor alone by ``isfinite``. An update with finite tensors passes no gate at all.

FSDP2 (DTensor) tensors are checked on each rank's local shards and the flag is all-reduced (max)
over the mesh, so every rank skips the same updates; a shard on one rank alone would otherwise
leave the ranks' averages of one parameter out of step.

Cost: one extra read of every tracked tensor per averaging update (the update itself reads the
weights and shadows and writes the shadows), plus a handful of 0-dim ops;
``bench/nonfinite_cost.py`` measures it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from polyak.errors import NonFiniteError

__all__ = ["DEFAULT", "POLICIES", "NonFinite", "check_policy"]

POLICIES = ("detect", "raise", "skip", "ignore")
# "detect" costs nothing per update; "raise"/"skip" one more read of every tracked tensor per
# averaging update (1.3-2.1x the update on the CPU bench workloads) and, under FSDP2, an
# all-reduce: opt-in, for those who want the averages kept, not only the error
DEFAULT = "detect"


def check_policy(nonfinite: Any) -> str:
    """``nonfinite`` if it is one of :data:`POLICIES`, else a ``ValueError`` naming them."""
    if nonfinite not in POLICIES:
        raise ValueError(
            f"nonfinite must be one of {POLICIES}, got nonfinite={nonfinite!r}: 'detect' (the "
            f"default) raises when the averages are read if NaN/Inf reached them, 'raise' keeps "
            f"NaN/Inf out of the averages and raises at the next read of them, 'skip' leaves "
            f"such updates out and goes on, 'ignore' does not check."
        )
    return nonfinite


def _mesh_groups(tensors: Sequence[torch.Tensor]) -> list[Any]:
    """The process groups of the first DTensor's mesh (one per mesh dimension), or none."""
    for tensor in tensors:
        mesh = getattr(tensor, "device_mesh", None)
        if mesh is not None:
            return [mesh.get_group(dim) for dim in range(mesh.ndim)]
    return []


class NonFinite:
    """The check of one EMA, and its state: ``skipped`` (averaging updates left out), ``tripped``
    (``"raise"``: a non-finite update happened), ``first_step`` and ``first_norms`` (the step and
    each floating tensor's norm at the update that tripped it), all 0-dim or 1-dim tensors beside
    the tracked tensors.

    ``names``: the floating tracked tensors, in model order, fixed for the EMA's life (the kernels
    plan per tensor set; this is planned with them by :meth:`plan`).
    """

    def __init__(self, policy: str, names: Sequence[str], device: torch.device) -> None:
        self.policy = check_policy(policy)
        self.names = list(names)
        self._order = list(range(len(self.names)))  # plan position -> index into names
        self._alloc_state(device)
        self.host = False
        self.sources: list[torch.Tensor] = []
        self.groups: list[Any] = []  # the mesh's process groups (FSDP2), else none
        self._by_dtype: list[
            tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
        ] = []

    @property
    def active(self) -> bool:
        """Whether each averaging update is checked (``"raise"``, ``"skip"``)."""
        return self.policy in ("raise", "skip") and bool(self.names)

    def _alloc_state(self, device: torch.device) -> None:
        self.device = device
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.tripped = torch.zeros((), dtype=torch.bool, device=device)
        self.first_step = torch.zeros((), dtype=torch.int64, device=device)
        # in plan order (the tensors grouped by dtype), so that each group's record is a view
        self.first_norms = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        # per-update scratch: the flags, the step as a tensor
        self._ok = torch.zeros((), dtype=torch.bool, device=device)
        self._bad = torch.zeros((), dtype=torch.bool, device=device)
        self._due = torch.zeros((), dtype=torch.bool, device=device)
        self._gate = torch.zeros((), dtype=torch.bool, device=device)
        self._counted = torch.zeros((), dtype=torch.bool, device=device)
        self._now = torch.zeros((), dtype=torch.int64, device=device)
        self._true = torch.ones((), dtype=torch.bool, device=device)
        self._shared = torch.zeros((), dtype=torch.int32, device=device)

    def plan(
        self,
        sources: Mapping[str, torch.Tensor],
        *,
        capturable: bool,
        host_devices: frozenset[str],
        live: Sequence[torch.Tensor] = (),
    ) -> None:
        """Check ``sources`` (name -> the tensor a kernel reads, every name of :attr:`names`) from
        now on: the state moves to their device, and the mode is chosen (see the module
        docstring). One device only, unless the policy is ``"ignore"``. ``live``: the tracked
        tensors themselves, where DTensors show the mesh to agree over."""
        self.sources = [sources[n] for n in self.names]
        if not self.active:
            return
        devices = sorted({str(t.device) for t in self.sources})
        if len(devices) > 1:
            raise ValueError(
                f"nonfinite={self.policy!r} decides on one device whether an update holds NaN or "
                f"Inf, but the tracked tensors are on {devices}. Keep the model on one device, or "
                f"pass nonfinite='ignore' (no check)."
            )
        device = self.sources[0].device
        if device != self.device:
            self.to(device)
        self.host = device.type in host_devices and not capturable
        self.groups = _mesh_groups(live)
        self._plan_dtypes()

    def _plan_dtypes(self) -> None:
        """One group per dtype (a norm has its tensor's dtype; stacking norms of one dtype into a
        buffer of it costs no conversion): its tensors, their norms, the group's max (or sum),
        its flag, and its stretch of the record."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, tensor in enumerate(self.sources):
            by_dtype.setdefault(tensor.dtype, []).append(index)
        order = [index for indices in by_dtype.values() for index in indices]
        if order != self._order:  # the record follows the new order
            position = {index: p for p, index in enumerate(self._order)}
            permutation = torch.tensor([position[i] for i in order], device=self.device)
            self.first_norms = self.first_norms.index_select(0, permutation)
            self._order = order
        self._by_dtype = []
        start = 0
        for k, (dtype, indices) in enumerate(by_dtype.items()):
            n = len(indices)
            self._by_dtype.append(
                (
                    [self.sources[i] for i in indices],
                    torch.zeros(n, dtype=dtype, device=self.device),
                    torch.zeros((), dtype=dtype, device=self.device),
                    self._ok if k == 0 else torch.zeros((), dtype=torch.bool, device=self.device),
                    self.first_norms[start : start + n],
                )
            )
            start += n

    def to(self, device: torch.device) -> None:
        """Move the state (counters, flag, record) to ``device``."""
        kept = {
            "skipped": self.skipped,
            "tripped": self.tripped,
            "first_step": self.first_step,
            "first_norms": self.first_norms,
        }
        self._alloc_state(device)
        for name, value in kept.items():
            getattr(self, name).copy_(value)
        if self.sources:
            self._plan_dtypes()

    # ------------------------------------------------------------------ per update

    def gate(
        self, step: int | torch.Tensor, off: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Check the tensors for this averaging update (``off``: a capturable EMA's gate, True on a
        call that does not average); returns ``(lerp gate, copy gate)``: ``None`` where nothing is
        skipped as far as the host knows, else 0-dim bool tensors, True to skip.

        ``step``: this call's :attr:`polyak.EMA.step` (an int, or the device counter), recorded
        where ``"raise"`` trips.
        """
        if not self.active:
            return off, None
        if self.host:
            return self._host_gate(step)
        return self._device_gate(step, off)

    def _host_gate(
        self, step: int | torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.policy == "raise" and bool(self.tripped):  # every rank tripped alike
            self.skipped.add_(1)
            return self._true, self._true
        bad = self._host_bad(record=self.policy == "raise")
        if self.groups:
            bad = self._all_ranks(bad)
        if not bad:
            return None, None
        if self.policy == "raise":
            self.tripped.fill_(True)
            self.first_step.fill_(int(step))
        self.skipped.add_(1)
        return self._true, self._true

    def _host_bad(self, record: bool) -> bool:
        """Whether any tensor holds NaN/Inf: per dtype group, the sum of the 2-norms; where it is
        not finite, ``isfinite`` on each tensor of the group whose 2-norm is not (an Inf may be
        an overflow of finite squares). ``record``: the record gets NaN for each tensor that holds
        NaN/Inf and 0 for the others (only where one does)."""
        suspects = []
        for sources, norms, total, _, _ in self._by_dtype:
            torch.stack(torch._foreach_norm(sources, 2), out=norms)
            torch.sum(norms, dim=0, out=total)
            if not math.isfinite(total.item()):
                suspects.append((sources, norms))
        if not suspects:
            return False
        found = False
        for sources, norms in suspects:
            for index in torch.isfinite(norms).logical_not().nonzero().flatten().tolist():
                if not bool(torch.isfinite(sources[index]).all()):
                    found = True
                    norms[index] = math.nan
                else:
                    norms[index] = 0.0
        if found and record:
            for _, norms, _, _, first in self._by_dtype:
                first.copy_(torch.where(torch.isnan(norms), math.nan, 0.0))
        return found

    def _all_ranks(self, bad: bool) -> bool:
        """``bad`` on any rank of the mesh (host mode: gloo on the CPU)."""
        import torch.distributed as dist

        self._shared.fill_(int(bad))
        for group in self.groups:
            dist.all_reduce(self._shared, op=dist.ReduceOp.MAX, group=group)
        return bool(self._shared)

    def _device_gate(
        self, step: int | torch.Tensor, off: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for k, (sources, norms, top, ok, _) in enumerate(self._by_dtype):
            torch.stack(torch._foreach_norm(sources, math.inf), out=norms)
            torch.amax(norms, dim=0, out=top)  # NaN propagates
            torch.lt(top, math.inf, out=ok)  # False for Inf and NaN
            if k:
                torch.logical_and(self._ok, ok, out=self._ok)
        torch.logical_not(self._ok, out=self._bad)
        if self.groups:
            import torch.distributed as dist

            self._shared.copy_(self._bad)
            for group in self.groups:
                dist.all_reduce(self._shared, op=dist.ReduceOp.MAX, group=group)
            torch.ne(self._shared, 0, out=self._bad)
        if off is not None:  # a call that does not average: its values reach no shadow
            torch.logical_not(off, out=self._due)
            torch.logical_and(self._bad, self._due, out=self._bad)
        if self.policy == "raise":
            if not isinstance(step, torch.Tensor):
                self._now.fill_(step)
                step = self._now
            # until the flag trips, the record follows every update; then it stays
            torch.where(self.tripped, self.first_step, step, out=self.first_step)
            for _, norms, _, _, first in self._by_dtype:
                torch.where(self.tripped, first, norms, out=first)
            torch.logical_or(self.tripped, self._bad, out=self.tripped)
            skip = self.tripped
        else:
            skip = self._bad
        if off is None:
            self.skipped.add_(skip)
            return skip, skip
        torch.logical_and(skip, self._due, out=self._counted)
        self.skipped.add_(self._counted)
        torch.logical_or(off, skip, out=self._gate)
        return self._gate, skip

    # ------------------------------------------------------------------ at the reading points

    def raise_if_tripped(self) -> None:
        """``"raise"``: raise :class:`~polyak.errors.NonFiniteError` if an update met NaN/Inf
        (reads one flag: call it where the averages are read anyway)."""
        if self.policy != "raise" or not self.names or not bool(self.tripped):
            return
        norms = self.first_norms.tolist()  # in plan order
        found = {self._order[p] for p, v in enumerate(norms) if not math.isfinite(v)}
        bad = [name for index, name in enumerate(self.names) if index in found]
        step = int(self.first_step)
        left_out = int(self.skipped)
        shown = repr(bad[0]) if bad else "a tracked tensor"
        more = f" (and {len(bad) - 1} more: {bad[1:6]})" if len(bad) > 1 else ""
        raise NonFiniteError(
            f"ema.update() at step {step} found NaN or Inf in {shown}{more}. With "
            f"nonfinite='raise' the averages were kept as they were before that update, and "
            f"{left_out} averaging update(s) since, that one included, were left out. The "
            f"weights have likely diverged (learning rate, a bad batch, fp16 overflow). To go "
            f"on: load a checkpoint (ema.load_state(path) or ema.load_state_dict(...)), or call "
            f"ema.clear_nonfinite() to average on from the kept averages; nonfinite='skip' "
            f"leaves such updates out without raising.",
            names=bad,
            step=step,
        )

    def detect(self, names: Sequence[str], slots: Sequence[Sequence[torch.Tensor]]) -> None:
        """``"detect"``: raise :class:`~polyak.errors.NonFiniteError` if a shadow holds NaN/Inf.

        ``slots``: per slot, the averaged shadows (local tensors) of ``names``. One max-norm per
        shadow (``torch._foreach_norm(..., inf)`` per device and dtype: finite exactly when every
        element is, and it cannot overflow), one flag read per group: a host sync, where the
        averages are read anyway."""
        if self.policy != "detect" or not names:
            return
        groups: dict[tuple[torch.device, torch.dtype], list[tuple[int, torch.Tensor]]] = {}
        for slot in slots:
            for index, shadow in enumerate(slot):
                if shadow.is_floating_point() and shadow.numel():
                    groups.setdefault((shadow.device, shadow.dtype), []).append((index, shadow))
        bad: set[int] = set()
        for members in groups.values():
            norms = torch.stack(torch._foreach_norm([t for _, t in members], math.inf))
            if bool(torch.isfinite(norms).all()):
                continue
            finite = torch.isfinite(norms).tolist()
            bad.update(index for (index, _), ok in zip(members, finite, strict=True) if not ok)
        if not bad:
            return
        found = [name for index, name in enumerate(names) if index in bad]
        more = f" (and {len(found) - 1} more: {found[1:6]})" if len(found) > 1 else ""
        raise NonFiniteError(
            f"the averages of {found[0]!r}{more} hold NaN or Inf: a non-finite weight reached "
            f"them at an update since they were last read (with nonfinite='detect', the "
            f"default, updates are not checked, so they cost nothing more). They cannot be "
            f"recovered: load a checkpoint (ema.load_state(path) or ema.load_state_dict(...)). "
            f"The weights have likely diverged (learning rate, a bad batch, fp16 overflow). "
            f"nonfinite='raise' keeps the averages of the update before a NaN/Inf and raises, "
            f"'skip' leaves such updates out, each at one more read of the weights per update.",
            names=found,
            step=None,
        )

    def clear(self) -> None:
        """Forget a tripped ``"raise"``: the next updates average again."""
        self.tripped.fill_(False)
