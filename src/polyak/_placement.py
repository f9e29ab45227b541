"""How averages enter a model, and how the model's own values come back, bit for bit.

The one idea: given ``(live, value)`` pairs (a tensor the model computes with, and the tensor it
should compute with for a while), make the model compute with ``value``, keep what ``live`` held
in a :class:`Backup`, and later put that back. Two strategies, chosen per tensor by how the model
reads it (:func:`in_place`):

- **re-point** (plain tensors): ``live.data = value``. No copy when dtype and device match: the
  model's tensor views the value's storage. The backup is the previous ``.data`` object, put back
  the same way, so the way back copies nothing either and is exact.
- **copy in place** (DTensor parameters, such as FSDP2's ``fully_shard``): FSDP2 all-gathers a
  parameter from its own sharded storage, of which the DTensor's local tensor is a view, so a
  re-pointed ``.data`` is never read and the model would compute with its trained weights. Here the
  live local shard is first copied into a backup tensor, then the value's local shard is copied into
  the live one. The way back copies the backup into the live shard, and the parameter's storage is
  never replaced.

FSDP2 gathers a module's parameters again only after it has resharded them, and after a forward
pass without gradients a root module keeps them unsharded: then an in-place write into the shards
would not be seen, and the averages gathered for an evaluation would stay in the model after the
way back. So callers :func:`reshard` the model before they place anything (and before they read
which tensors it holds: an unsharded root holds plain tensors) and again on the way back.

:func:`save`, :func:`write` and :func:`take_back` are the copy-in-place forms behind
``store()``, ``copy_to()`` and ``restore()``. They copy for every tensor and never re-point, because
a captured CUDA graph keeps the storage it was captured with.

:class:`WriteBack` is the planned form of :func:`write` that an update runs (Switch-EMA writes the
averages into the weights the model trains on, :class:`polyak.averagers.SwitchEMA`): planned once
over the live tensors' local shards (for FSDP2, the shards the optimizer steps, so the write is
seen as an optimizer step's is: no reshard), one multi-tensor copy, and gated on the device for
a capturable update (:class:`polyak._kernels._foreach.GatedCopy`).

Nothing here knows names or averaging: callers pass tensors. FSDP2 and DTensor are looked up only
where ``torch.distributed`` already loaded them (a model cannot hold a DTensor before that), so this
module imports nothing of torch.distributed at import time.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from polyak._kernels._foreach import GatedCopy
from polyak._store import local

__all__ = [
    "Backup",
    "WriteBack",
    "in_place",
    "local",
    "put",
    "reshard",
    "save",
    "take_back",
    "write",
]

Pairs = Sequence[tuple[torch.Tensor, torch.Tensor]]


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def in_place(tensor: torch.Tensor) -> bool:
    """Whether values enter ``tensor`` by an in-place copy into its local shard (a DTensor:
    FSDP2 reads its own sharded storage) rather than by re-pointing ``.data``."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def reshard(model: nn.Module | None) -> None:
    """Reshard every FSDP2 module in ``model`` (a no-op for a plain model, or ``None``).

    The model then holds its sharded DTensor parameters again, the next forward pass gathers them
    from the local shards, and what an in-place write put there is what it computes with.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if model is None or fsdp is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


class Backup:
    """What the live tensors held while values are placed in them.

    One entry per live tensor: ``(live, saved, repointed)``, where ``saved`` is the previous
    ``.data`` (``repointed``: put back by re-pointing) or a copy of the local shard (put back by
    an in-place copy). Empty when nothing is held.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def __bool__(self) -> bool:
        return bool(self.entries)

    def lives(self) -> list[torch.Tensor]:
        """The live tensors whose values are held, in the order they were placed into."""
        return [live for live, _, _ in self.entries]


def _check(pairs: Pairs) -> None:
    """Refuse, before anything changes, a pair whose value cannot enter its live tensor."""
    for live, value in pairs:
        if in_place(live) != in_place(value):
            sharded, plain = (
                ("live tensor", "value") if in_place(live) else ("value", "live tensor")
            )
            raise TypeError(
                f"cannot place a value of shape {tuple(value.shape)}: the {sharded} is a DTensor "
                f"(sharded, e.g. by FSDP2's fully_shard) but the {plain} is a plain tensor. Place "
                f"averages into a model sharded the same way as the one the EMA was built on, or "
                f"gather them first with DTensor.full_tensor()."
            )
        if in_place(live) and local(live).shape != local(value).shape:
            raise ValueError(
                f"cannot place a value into a DTensor of shape {tuple(live.shape)}: its local "
                f"shard has shape {tuple(local(live).shape)} here, the value's "
                f"{tuple(local(value).shape)}. The model must be sharded as it was when the EMA "
                f"was built (same device mesh and placements)."
            )


def put(pairs: Pairs, backup: Backup) -> None:
    """Make each live tensor hold its value; what it held goes into ``backup`` (empty before).

    Re-pointed tensors view the value itself where dtype and device match (a cast copy otherwise);
    DTensors get the value copied into their local shard, cast to their dtype.
    """
    if backup:
        raise RuntimeError("the backup still holds values: take them back before placing again.")
    _check(pairs)
    with torch.no_grad():
        for live, value in pairs:
            if in_place(live):
                shard = local(live)
                backup.entries.append((live, shard.clone(), False))
                shard.copy_(local(value))
            else:
                backup.entries.append((live, live.data, True))
                same = value.dtype == live.dtype and value.device == live.device
                live.data = value if same else value.to(live.device, live.dtype)


def save(lives: Sequence[torch.Tensor], backup: Backup) -> None:
    """Copy what each live tensor holds (its local shard, for a DTensor) into ``backup``."""
    if backup:
        raise RuntimeError("the backup still holds values: take them back before saving again.")
    with torch.no_grad():
        backup.entries = [(live, local(live).clone(), False) for live in lives]


def write(pairs: Pairs) -> None:
    """Copy each value into its live tensor in place (local shard into local shard for DTensors),
    cast to the live tensor's dtype."""
    _check(pairs)
    with torch.no_grad():
        for live, value in pairs:
            local(live).copy_(local(value))


def take_back(backup: Backup) -> None:
    """Give each live tensor back what it held before :func:`put` or :func:`save`, bit for bit:
    re-pointed ones get their own ``.data`` object, the others a copy into their storage. Empties
    ``backup``."""
    with torch.no_grad():
        for live, saved, repointed in backup.entries:
            if repointed:
                live.data = saved
            else:
                local(live).copy_(saved)
    backup.entries = []


class WriteBack:
    """Values copied into live tensors in place, planned once: ``lives[i] <- values[i]``.

    The planned form of :func:`write` for the update path: the live tensors' local shards (a
    DTensor's, as :func:`write` writes them) and the values' are taken once, here, and every call
    is one multi-tensor copy, cast to each live tensor's dtype (an fp32 average into a bf16 weight
    is rounded to nearest; the value keeps its bits). ``gate``: ``None``, or a 0-dim bool tensor on
    the tensors' device, ``True`` to skip, read there without a host sync (capturable updates).

    Values in pinned host memory (``offload="cpu"``) are copied with ``non_blocking=False``: the
    host may write those values again right after (a loaded state dict), which must not race a
    copy still reading them. Callers wait for the update that wrote the values first.
    """

    def __init__(self, lives: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        pairs = list(zip(lives, values, strict=True))
        _check(pairs)
        self.copy = GatedCopy([local(t) for t, _ in pairs], [local(v) for _, v in pairs])

    def __call__(self, gate: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            self.copy.copy_(gate)
