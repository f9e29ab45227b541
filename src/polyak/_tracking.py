"""Which tensors an EMA tracks, and noticing when the model stops holding them.

A model or ``(name, tensor)`` pairs become an ordered list of ``(name, live tensor, kind)``, kind
``"average"`` or ``"copy"``. The EMA keeps the live tensor objects, so an optimizer's in-place
writes and ``param.data = ...`` are seen; but users also replace those objects
(``model.load_state_dict(sd, assign=True)``, ``model.fc = nn.Linear(...)``, ``model.to(...)``,
which makes new buffer objects) or change their dtype or device in place (``model.half()``,
``model.cuda()``), or remove them (``module.bias = None``, ``del module.weight``). :class:`Watch`
notices all of these on the host, cheaply:

- global module and parameter registration hooks mark the watch dirty when one is registered on a
  module of the tracked model (``assign=True`` loads and replaced layers go through them; a
  replaced layer still holds the old tensors, so nothing else would show it);
- ``Module._apply`` (``to``, ``half``, ``to_empty``) replaces buffers without registering them,
  and a removed parameter reports to no hook, so every tracked tensor is checked for identity
  against its owner's ``_parameters`` / ``_buffers`` entry, which also covers buffers assigned
  anew and parameters replaced by ``_apply`` in overwrite mode or by a direct dict write. The
  check is one C-level pass per owner dict, ``owner == snapshot`` against a plain copy taken when
  the watch was made: CPython's dict equality compares values by identity first, so an unchanged
  dict costs no tensor comparison (about 35 us for the 1024 dicts of 2048 tensors, half the cost
  of a per-tensor ``dict.get``/``is`` pass; once an update has evicted the dicts from the cache,
  either is a trip to memory per dict, about 0.3 us a module). A changed value falls through to
  ``Tensor.__eq__``, whose result must never read as "equal": that holds where every value is
  ``None`` or a plain ``Tensor``/``Parameter`` of more than one element (``bool()`` of a
  many-element result raises, which reads as stale; ``t == None`` is false). A dict that holds
  anything else (a one-element or empty tensor, a DTensor, a lazy parameter) is checked entry by
  entry for identity instead (``map(operator.is_, ...)``, about 35 ns a tensor). The one change
  this misses is a tensor subclass whose own ``__eq__`` answers a plain ``True``, written
  directly over a plain tensor; no torch subclass does that;
- a whole-model conversion keeps the parameter objects and changes them in place: the first tensor
  of each (kind, dtype, device) group is checked for dtype, device and identity;
- a DTensor (FSDP2) parameter is averaged through its local shard, a view the update plans once
  (rather than a ``to_local()`` per tensor per update). FSDP2 replaces that view in place of
  the parameter (re-padding it at its lazy initialisation after ``load_state_dict(...,
  assign=True)``, or after ``model.to(...)``), so each DTensor's local tensor is checked for
  identity (~30 ns a tensor).

A partial in-place conversion (``model.fc.half()`` alone, in a model without buffers there) is
caught by the kernel's own dtype check; the EMA then asks :meth:`Watch.changes` what happened and
says so.

What the EMA does with a change is decided here too: :func:`followable` accepts a tensor of the
same shape (on the same device, or the one the EMA is moving to) and refuses anything else with an
error that names each tensor and the fix; :func:`failed_update` explains a kernel error that a
change the cheap check missed caused; :func:`matched` finds the tracked names in another model.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from polyak.errors import ModelChangedError

Include = Callable[[str, torch.Tensor], bool]
Tracked = list[tuple[str, torch.Tensor, str]]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(_compiled_original(model), nn.Module):  # torch.compile
            model = _compiled_original(model)
        else:
            return model


def _compiled_original(model: object) -> object:
    """``model._orig_mod``, read where ``OptimizedModule`` registers it (``_modules``): a
    ``getattr`` of a name a module lacks raises inside ``nn.Module.__getattr__`` (~1 µs), paid
    at every update of the timm drop-ins."""
    modules = getattr(model, "_modules", None)
    return modules.get("_orig_mod") if isinstance(modules, dict) else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def named_tensors(model: nn.Module, include: Include | None, buffers: str) -> Tracked:
    """A module's trainable parameters (averaged) and, unless ``buffers="none"``, its buffers
    (floating ones averaged under ``"average"``, the rest copied)."""
    tracked = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen: no shadow, exports read the live value
        if include is not None and not include(name, param):
            continue
        tracked.append((name, param, "average"))
    if buffers != "none":
        for name, buf in model.named_buffers():
            if include is not None and not include(name, buf):
                continue
            averaged = buffers == "average" and buf.is_floating_point()
            tracked.append((name, buf, "average" if averaged else "copy"))
    return tracked


def named_pairs(pairs: Iterable[Any], include: Include | None) -> Tracked:
    """``(name, tensor)`` pairs, or bare tensors (``model.parameters()``, torch_ema's habit),
    which are named ``"0"``, ``"1"``, ... by position (frozen ones keep their number)."""
    if isinstance(pairs, (torch.Tensor, str, bytes)) or not isinstance(pairs, Iterable):
        raise TypeError(
            f"EMA tracks an nn.Module, an iterable of (name, tensor) pairs or an iterable of "
            f"tensors, got {type(pairs).__name__}; e.g. polyak.EMA(model) or "
            f"polyak.EMA(model.named_parameters())."
        )
    tracked: Tracked = []
    seen: set[str] = set()
    bare: bool | None = None
    for index, item in enumerate(pairs):
        is_bare = isinstance(item, torch.Tensor)
        is_pair = (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)
        )
        if not (is_bare or is_pair) or (bare is not None and bare != is_bare):
            got = (
                f"a {type(item[1]).__name__} paired with {type(item[0]).__name__}"
                if isinstance(item, tuple) and len(item) == 2
                else f"a {type(item).__name__}"
            )
            raise TypeError(
                f"EMA expects (name, tensor) pairs or bare tensors, not a mix of them or other "
                f"objects; item {index} is {got}. Pass model.named_parameters(), a dict's "
                f".items(), model.parameters(), or the module itself."
            )
        bare = is_bare
        name, tensor = (str(index), item) if is_bare else item
        if name in seen:
            raise ValueError(f"the name {name!r} appears twice; names must be unique.")
        seen.add(name)
        if isinstance(tensor, nn.Parameter) and not tensor.requires_grad:
            continue
        if include is not None and not include(name, tensor):
            continue
        if not tensor.is_floating_point():
            raise TypeError(
                f"cannot average {name!r}: it is a {dtype_name(tensor.dtype)} tensor and an "
                f"average needs a floating dtype. Exclude it with include=, or track the module "
                f"itself (integer buffers are then copied, not averaged)."
            )
        tracked.append((name, tensor, "average"))
    return tracked


def owner_of(model: nn.Module, name: str) -> tuple[dict[str, Any], str] | None:
    """The ``_parameters`` or ``_buffers`` dict that holds ``name`` in ``model``, and its key."""
    module_name, _, key = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    for owner in (module._parameters, module._buffers):
        if owner.get(key) is not None:
            return owner, key
    return None


# Watches whose model the registration hooks should mark dirty; the hooks are installed once.
_WATCHES: weakref.WeakSet[Watch] = weakref.WeakSet()
_HOOKS: list[Any] = []


def _registered(module: nn.Module, name: str, value: Any) -> None:
    for watch in list(_WATCHES):
        if id(module) in watch.module_ids:
            watch.dirty = True


def _install_hooks() -> None:
    if not _HOOKS:
        hooks = nn.modules.module
        _HOOKS.extend(
            register(_registered)
            for register in (
                hooks.register_module_module_registration_hook,
                hooks.register_module_parameter_registration_hook,
            )
        )


# the types whose ``==`` with another tensor is an elementwise comparison (see _comparable)
_PLAIN = (torch.Tensor, nn.Parameter)


def _comparable(owner: dict[str, Any]) -> bool:
    """Whether ``owner == dict(owner)`` can only be true while every value is the same object:
    each value is ``None`` or a plain ``Tensor``/``Parameter`` of more than one element, so a
    replaced value's ``Tensor.__eq__`` gives a many-element result, whose ``bool()`` raises (or
    ``False`` against ``None``), never a one-element "equal"."""
    return all(
        value is None or (type(value) in _PLAIN and value.numel() > 1) for value in owner.values()
    )


class Watch:
    """Host-side facts about the tracked tensors, checked at every update (see module docstring).

    ``entries``: ``(owner dict, key, tensor)`` checked for identity (every tracked tensor of a
    model; empty for pairs): those whose owner dict is :func:`_comparable` through
    ``owner == snapshot`` per dict, the rest as three parallel lists for a C-level pass;
    ``sentinels``: ``(tensor, dtype, device)``, each group's first.
    """

    def __init__(self, model: nn.Module | None, live: dict[str, torch.Tensor]) -> None:
        self.dirty = False
        self.entries: list[tuple[dict[str, Any], str, torch.Tensor]] = []
        self.module_ids: frozenset[int] = frozenset()
        self.planned = {n: (t.shape, t.dtype, t.device) for n, t in live.items()}
        groups: dict[tuple[bool, torch.dtype, torch.device], str] = {}
        for name, tensor in live.items():
            key = (isinstance(tensor, nn.Parameter), tensor.dtype, tensor.device)
            groups.setdefault(key, name)
        firsts = set(groups.values())
        self.sentinels = [(live[n], live[n].dtype, live[n].device) for n in firsts]
        # DTensors and the local shards the update was planned with
        self.shards = [(t, t._local_tensor) for t in live.values() if hasattr(t, "_local_tensor")]
        if model is not None:
            for name, tensor in live.items():
                found = owner_of(model, name)
                if found is not None and found[0][found[1]] is tensor:
                    self.entries.append((found[0], found[1], tensor))
            self.module_ids = frozenset(id(m) for m in model.modules())
            _install_hooks()
            _WATCHES.add(self)
        # owner dicts compared whole against a snapshot where that is exact (module docstring),
        # the rest entry by entry
        owners = {id(owner): owner for owner, _, _ in self.entries}  # model order, once each
        self._dicts = [owner for owner in owners.values() if _comparable(owner)]
        whole = {id(owner) for owner in self._dicts}
        self._snapshots = [dict(owner) for owner in self._dicts]
        exact = [entry for entry in self.entries if id(entry[0]) not in whole]
        self._owners = [owner for owner, _, _ in exact]
        self._keys = [key for _, key, _ in exact]
        self._held = [tensor for _, _, tensor in exact]

    def stale(self) -> bool:
        """Whether the model may no longer hold the planned tensors (cheap; false alarms are ok)."""
        if self.dirty:
            return True
        try:
            if not all(map(operator.eq, self._dicts, self._snapshots)):
                return True
        except Exception:  # a changed value's ``==`` raised: changed all the same
            return True
        if not all(map(operator.is_, map(dict.get, self._owners, self._keys), self._held)):
            return True
        for tensor, dtype, device in self.sentinels:
            if tensor.dtype is not dtype or tensor.device != device:
                return True
        return any(tensor._local_tensor is not shard for tensor, shard in self.shards)

    def changes(
        self, model: nn.Module | None, live: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor | None, str]]:
        """Per tracked name whose tensor changed: the model's tensor now (``None`` if gone) and
        what changed, in words."""
        out: dict[str, tuple[torch.Tensor | None, str]] = {}
        shards = {id(t): shard for t, shard in self.shards}
        for name, old in live.items():
            if model is None:
                tensor = old
            else:
                found = owner_of(model, name)
                if found is None:
                    out[name] = (None, "is no longer in the model")
                    continue
                tensor = found[0][found[1]]
            shape, dtype, device = self.planned[name]
            what = []
            if tensor is not old:
                what.append("was replaced by another tensor object")
            elif id(old) in shards and old._local_tensor is not shards[id(old)]:
                what.append("got a new local shard (FSDP2 re-allocated it)")
            if tensor.shape != shape:
                what.append(f"changed shape from {tuple(shape)} to {tuple(tensor.shape)}")
            if tensor.dtype != dtype:
                what.append(f"changed dtype from {dtype_name(dtype)} to {dtype_name(tensor.dtype)}")
            if tensor.device != device:
                what.append(f"moved from {device} to {tensor.device}")
            if what:
                out[name] = (tensor, " and ".join(what))
        return out


def followable(
    watch: Watch,
    model: nn.Module | None,
    live: dict[str, torch.Tensor],
    shapes: Mapping[str, torch.Size],
    device: torch.device | None = None,
) -> dict[str, tuple[torch.Tensor, str]]:
    """The tracked tensors the model replaced or re-cast (:meth:`Watch.changes`), checked to be
    followable: the shape of their average (``shapes``), and on the device planned (or on
    ``device``, where the EMA is being moved). Otherwise a
    :class:`~polyak.errors.ModelChangedError` (a ``RuntimeError``) names each tensor that
    cannot be followed and says how to fix it; nothing was changed."""
    changes = watch.changes(model, live)
    reshaped, moved = [], []
    for name, (tensor, what) in changes.items():
        if tensor is None or tensor.shape != shapes[name]:
            reshaped.append(f"{name} {what}")
        elif tensor.device not in (watch.planned[name][2], device):
            moved.append((f"{name} {what}", str(tensor.device)))
    if reshaped or moved:
        problems = reshaped + [text for text, _ in moved]
        fixes = []
        if moved:
            devices = sorted({d for _, d in moved})
            where = repr(devices[0]) if len(devices) == 1 else "device"
            fixes.append(f"after moving the model, move the EMA too: ema.to({where})")
        if reshaped:
            fixes.append(
                "after changing the model's architecture, build a new EMA on it (a checkpoint "
                "of the old one loads into a model of the old architecture)"
            )
        raise ModelChangedError(
            "the model no longer holds the tensors this EMA averages, and the EMA cannot "
            "follow:\n  "
            + "\n  ".join(problems[:10])
            + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
            + "\nNothing was changed. To fix: "
            + "; ".join(fixes)
            + "."
        )
    return changes  # type: ignore[return-value]


def failed_update(
    error: RuntimeError, watch: Watch, model: nn.Module | None, live: dict[str, torch.Tensor]
) -> ModelChangedError | None:
    """Why an update raised ``error``, in words a user can act on, or ``None`` (re-raise it as is).

    A tensor changed in place where the cheap check (:meth:`Watch.stale`) did not look (a
    partial ``model.fc.half()``) is named, and the watch marked dirty so that the next update
    follows it or says why not; a kernel's device mismatch gets the fix (``ema.to(device)``).
    """
    changes = watch.changes(model, live)
    if changes:
        watch.dirty = True
        return ModelChangedError(
            "ema.update() failed because the model's tensors changed since the EMA "
            "planned its update: "
            + "; ".join(f"{n} {what}" for n, (_, what) in list(changes.items())[:10])
            + ". Some shadows may already hold this update. The next ema.update() "
            "follows tensors of a new dtype; after moving the model to another "
            "device, call ema.to(device) first."
        )
    if "device" in str(error):
        return ModelChangedError(
            f"{error}\nThe model's tensors and the EMA's shadows are on different "
            f"devices: call ema.to(device) after moving the model."
        )
    return None


def matched(model: nn.Module, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` (another than the tracked one: averages put into a copy) under
    the tracked names, in ``shapes``' order; a ``ValueError`` lists missing names and shape
    mismatches at once."""
    available = dict(model.named_parameters(remove_duplicate=False))
    available.update(model.named_buffers(remove_duplicate=False))
    missing = [n for n in shapes if n not in available]
    wrong = [
        f"{n}: model {tuple(available[n].shape)} vs average {tuple(shape)}"
        for n, shape in shapes.items()
        if n in available and available[n].shape != shape
    ]
    if missing or wrong:
        raise ValueError(
            "this EMA was built on another model: "
            + (
                f"missing names {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                if missing
                else ""
            )
            + (f"shape mismatches {wrong[:10]}; " if wrong else "")
            + "pass the model the EMA tracks, or one with the same architecture."
        )
    return {n: available[n] for n in shapes}
