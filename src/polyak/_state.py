"""The EMA's state-dict schema: its versions, the upgrades between them, and validation.

One idea: what :meth:`polyak.EMA.state_dict` writes and what :meth:`polyak.EMA.load_state_dict`
accepts. A state dict is plain data (str, int, float, list, dict, tensors), keyed by names, never
by position, and readable with ``torch.load(path, weights_only=True)``. Loading runs in two
phases: :func:`parse` upgrades the dict to the current version, checks all of it against the EMA
that loads it and reports every problem in one ``ValueError`` *before* anything is changed; the
EMA then applies the :class:`Plan` it returns, which cannot fail. :func:`write` builds the current
version from a :class:`~polyak._store.ShadowStore`.

Version 2 (written since issue 14)::

    {
      "format": "polyak.EMA",
      "version": 2,
      "step": int,                 # calls of update()
      "num_averages": int,         # averaging updates (step // update_every when never changed)
      "update_every": int,
      "buffers": "average" | "copy" | "none",
      "rule": {                    # the averaging rule (polyak.averagers)
        "type": "Exponential",     # its class name
        "settings": {"decay": {"name": "constant", "decay": 0.999}},
                                   # its constructor's fields as data (schedules as
                                   # schedules.to_state; a user callable is not stored)
        "state": {},               # rule.state_dict(): counts, ring positions, ... ({} if none)
        "slots": ["ema"],          # the averages it keeps of every tensor, by name
      },
      "shadows": {"ema": {name: tensor, ...}},   # per slot: the averaged tensors' shadows
      "copies": {name: tensor, ...},             # copied tensors (num_batches_tracked, ...)
      "shadow_dtypes": {name: "float32", ...},   # every name, averaged and copied
      "rng_counter": int,          # only with stochastic rounding: the random stream's position
    }

Version 1 (polyak up to commit acc3dec; ``tests/fixtures/state_v1`` holds files it wrote) had one
average per name: ``"shadows": {name: tensor}`` for averaged and copied names alike, their kinds in
``"kinds": {name: "average" | "copy"}``, the decay schedule at the top (``"schedule"``) and no
rule. :func:`upgrade` turns it into version 2 as a pure function of the dict (:func:`_v1_to_v2`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch

from polyak import schedules
from polyak._store import ShadowStore, assign
from polyak._tracking import dtype_name
from polyak.errors import StateMismatchError, VersionError

__all__ = [
    "FORMAT",
    "VERSION",
    "Layout",
    "Plan",
    "encode_rule",
    "parse",
    "rule_slots",
    "upgrade",
    "write",
]

FORMAT = "polyak.EMA"
VERSION = 2
DEFAULT_SLOTS = ("ema",)  # a rule that declares no slots keeps one average (today's Exponential)
_KEYS = frozenset(
    {
        "format",
        "version",
        "step",
        "num_averages",
        "update_every",
        "buffers",
        "rule",
        "shadows",
        "copies",
        "shadow_dtypes",
        "rng_counter",
    }
)
_RULE_KEYS = frozenset({"type", "settings", "state", "slots"})
_PLAIN = (type(None), bool, int, float, str)


# ------------------------------------------------------------------ versions and upgrades


def _v1_to_v2(state: Mapping[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: one slot ``"ema"`` of the exponential rule, copied tensors apart.

    Pure and total: it never raises. What version 1 lacked or held malformed is carried into the
    version-2 fields where :func:`parse` reports it (a version-1 dict without ``"kinds"`` puts
    every tensor in the slot, and the copied names are then reported as misplaced).
    """
    out = {k: v for k, v in state.items() if k not in ("version", "schedule", "shadows", "kinds")}
    out["version"] = 2
    settings = {"decay": state["schedule"]} if "schedule" in state else {}
    out["rule"] = {"type": "Exponential", "settings": settings, "state": {}, "slots": ["ema"]}
    shadows, kinds = state.get("shadows"), state.get("kinds")
    if isinstance(shadows, Mapping) and isinstance(kinds, Mapping):
        out["shadows"] = {"ema": {n: t for n, t in shadows.items() if kinds.get(n) != "copy"}}
        out["copies"] = {n: t for n, t in shadows.items() if kinds.get(n) == "copy"}
    else:
        out["shadows"] = {"ema": shadows} if shadows is not None else None
        out["copies"] = {}
    return out


# version -> the function that turns a dict of that version into one of the next
UPGRADES: dict[int, Callable[[Mapping[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def upgrade(state: Any) -> dict[str, Any]:
    """``state`` as a current-version dict: each upgrade in :data:`UPGRADES` applied in turn.

    Raises :class:`~polyak.errors.StateMismatchError` for what is no polyak.EMA state dict and
    :class:`~polyak.errors.VersionError` for a version this polyak does not know (a newer one:
    upgrade polyak); both are ValueErrors. The input is not modified.
    """
    fmt = state.get("format") if isinstance(state, Mapping) else None
    if fmt != FORMAT:
        got = f"format={fmt!r}" if isinstance(state, Mapping) else f"a {type(state).__name__}"
        raise StateMismatchError(
            f"not a polyak.EMA state dict ({got}; expected format={FORMAT!r}): pass the output of "
            f"EMA.state_dict(), e.g. ckpt['ema'] of a checkpoint saved as "
            f"{{'model': model.state_dict(), 'ema': ema.state_dict()}}. Nothing was changed."
        )
    version = state.get("version")
    known = isinstance(version, int) and not isinstance(version, bool)  # True == 1, 2.0 == 2
    if known and version > VERSION:
        raise VersionError(
            f"EMA state version {version} is newer than this polyak understands (versions 1 to "
            f"{VERSION}): it was written by a later polyak; upgrade polyak to load it. Nothing "
            f"was changed."
        )
    if not known or (version != VERSION and version not in UPGRADES):
        raise VersionError(
            f"EMA state version {version!r} is not one polyak ever wrote (known: 1 to {VERSION}, "
            f"an int): the state dict is damaged or not from EMA.state_dict(). Nothing was changed."
        )
    out = dict(state)
    while out["version"] != VERSION:
        out = UPGRADES[out["version"]](out)
    return out


# ------------------------------------------------------------------ rules as data


def rule_slots(rule: Any) -> tuple[str, ...]:
    """The names of the averages ``rule`` keeps of every tensor (``("ema",)`` if it declares
    none)."""
    return tuple(getattr(rule, "slots", DEFAULT_SLOTS))


def _settings_fields(rule: Any) -> list[str]:
    """The rule's constructor fields (a dataclass's ``init`` fields; none for other classes)."""
    if not dataclasses.is_dataclass(rule):
        return []
    return [f.name for f in dataclasses.fields(rule) if f.init]


def _is_schedules(value: Any) -> bool:
    """Whether a setting is a sequence of schedules (one per slot, e.g. ``Exponentials``)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(callable(v) for v in value)


def _encode_setting(rule: Any, field: str, value: Any) -> Any:
    if callable(value):
        return schedules.to_state(value)
    if _is_schedules(value):
        return [schedules.to_state(v) for v in value]
    if _is_plain(value):
        return list(value) if isinstance(value, tuple) else value
    raise TypeError(
        f"{type(rule).__name__}.{field}={value!r} cannot be stored in a state dict: a rule's "
        f"settings must be schedules (callables) or plain data (None, bool, int, float, str, or "
        f"lists of them). Give the rule plain settings."
    )


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _to_data(value: Any) -> Any:
    """A rule's state value as data: 0-dim tensors (a capturable EMA's device counters) become
    Python numbers, so the state loads into an EMA on any device; containers are converted."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.detach()
    if isinstance(value, Mapping):
        return {k: _to_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_data(v) for v in value]
    return value


def encode_rule(rule: Any) -> dict[str, Any]:
    """``rule`` as data: ``{"type", "settings", "state", "slots"}`` (see the module docstring).

    ``settings`` are the constructor's fields (a dataclass's ``init`` fields), schedules through
    :func:`polyak.schedules.to_state`; ``state`` is ``rule.state_dict()`` where the rule has one.
    """
    state_dict = getattr(rule, "state_dict", None)
    return {
        "type": type(rule).__name__,
        "settings": {f: _encode_setting(rule, f, getattr(rule, f)) for f in _settings_fields(rule)},
        "state": _to_data(state_dict()) if callable(state_dict) else {},
        "slots": list(rule_slots(rule)),
    }


# ------------------------------------------------------------------ writing


def write(
    store: ShadowStore,
    names: Iterable[str],
    rule: Any,
    *,
    step: int,
    num_averages: int,
    update_every: int,
    buffers: str,
    rng_counter: int | None,
) -> dict[str, Any]:
    """The current version's state dict of the shadows in ``store`` (detached, not copied),
    ``names`` giving the order of ``shadow_dtypes`` (the model's); ``rng_counter`` only where
    not ``None``."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "num_averages": int(num_averages),
        "update_every": int(update_every),
        "buffers": buffers,
        "rule": encode_rule(rule),
        "shadows": {
            slot: {n: store.shadow(n, slot).detach() for n in store.averaged}
            for slot in store.slots
        },
        "copies": {n: store.shadow(n).detach() for n in store.copied},
        "shadow_dtypes": {n: dtype_name(store.shadow(n).dtype) for n in names},
    }
    if rng_counter is not None:
        state["rng_counter"] = int(rng_counter)
    return state


# ------------------------------------------------------------------ validation


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the loading EMA holds, which a state dict must fit (and its settings a checkpoint's
    may replace).

    ``averaged`` and ``copied`` map each name to the EMA's tensor for it (slot 0's shadow for an
    averaged name): only their shapes and dtypes are read.
    """

    rule: Any
    averaged: Mapping[str, torch.Tensor]
    copied: Mapping[str, torch.Tensor]
    buffers: str
    update_every: int

    @property
    def slots(self) -> tuple[str, ...]:
        return rule_slots(self.rule)

    @classmethod
    def of(cls, store: ShadowStore, rule: Any, buffers: str, update_every: int) -> Layout:
        """What an EMA holds whose shadows are ``store``."""
        return cls(
            rule=rule,
            averaged={n: store.shadow(n) for n in store.averaged},
            copied={n: store.shadow(n) for n in store.copied},
            buffers=buffers,
            update_every=update_every,
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """A state dict checked against a :class:`Layout`: what loading it changes, ready to apply.

    ``rule`` is a new rule to use (the checkpoint's settings, where they differ), else ``None``;
    ``rule_state`` goes to the rule's ``load_state_dict`` (``None``: the rule keeps no state);
    ``update_every`` is ``None`` where it stays; ``changed`` says, in words, which of this EMA's
    settings the checkpoint's replace (for :class:`polyak.ema.LoadedSettingsWarning`).
    """

    step: int
    num_averages: int
    update_every: int | None
    rule: Any | None
    rule_state: Mapping[str, Any] | None
    shadows: dict[str, dict[str, torch.Tensor]]
    copies: dict[str, torch.Tensor]
    rng_counter: int | None
    changed: list[str]

    def copy_into(self, store: ShadowStore) -> None:
        """Copy the checked shadows (every slot of the rule) and copies into ``store``'s, in
        place (objects that ``average(name)`` callers hold stay theirs). Plain tensors load into
        sharded (DTensor) shadows and the reverse (:func:`polyak._store.assign`)."""
        with torch.no_grad():
            for slot, tensors in self.shadows.items():
                for name, tensor in tensors.items():
                    assign(store.shadow(name, slot), tensor)
            for name, tensor in self.copies.items():
                assign(store.shadow(name), tensor)


def _names(kind: str, names: list[str]) -> str:
    return f"{kind}: {names[:10]}" + (f" ... and {len(names) - 10} more" if len(names) > 10 else "")


def _check_tensors(
    where: str, given: Any, expected: Mapping[str, torch.Tensor], problems: list[str]
) -> dict[str, torch.Tensor]:
    """``given`` (name -> tensor) against ``expected``: names, shapes, dtypes."""
    if not isinstance(given, Mapping) or not all(
        isinstance(n, str) and isinstance(t, torch.Tensor) for n, t in given.items()
    ):
        problems.append(
            f"{where} is not a mapping of names to tensors (got {type(given).__name__})"
        )
        return {}
    missing = [n for n in expected if n not in given]
    unexpected = [n for n in given if n not in expected]
    if missing:
        problems.append(_names(f"{where}: missing names", missing))
    if unexpected:
        problems.append(_names(f"{where}: unexpected names", unexpected))
    for name, tensor in given.items():
        mine = expected.get(name)
        if mine is None:
            continue
        if tensor.shape != mine.shape:
            problems.append(
                f"{where} {name}: shape {tuple(tensor.shape)} in state vs {tuple(mine.shape)} here"
            )
        elif tensor.dtype != mine.dtype:
            problems.append(
                f"{where} {name}: dtype {dtype_name(tensor.dtype)} in state vs "
                f"{dtype_name(mine.dtype)} here (build the EMA with the same shadow_dtype)"
            )
    return dict(given)


def _count(state: Mapping[str, Any], key: str, least: int, problems: list[str]) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        shown = "missing" if key not in state else repr(value)
        problems.append(f"{key}: expected an int >= {least}, got {shown}")
        return least
    return value


def _check_rule(
    data: Any, layout: Layout, settings: str, problems: list[str]
) -> tuple[Any | None, Mapping[str, Any] | None, list[str]]:
    """The ``"rule"`` entry against the EMA's rule: type, slots, settings (decoded, and under
    ``settings="checkpoint"`` a rebuilt rule where they differ), and the rule's state (loaded into
    a copy of the rule, so its own checks run without touching it)."""
    rule = layout.rule
    name = type(rule).__name__
    if not isinstance(data, Mapping):
        problems.append(f"rule: expected a mapping {sorted(_RULE_KEYS)}, got {data!r}")
        return None, None, []
    if set(data) != _RULE_KEYS:
        problems.append(
            f"rule: expected the keys {sorted(_RULE_KEYS)}, got {sorted(map(str, data))}"
        )
        return None, None, []
    if data["type"] != name:
        problems.append(
            f"rule: {data['type']!r} in state vs {name!r} here (build the EMA with the rule that "
            f"was saved, e.g. rule=polyak.averagers.{data['type']}(...))"
        )
        return None, None, []
    slots = data["slots"]
    if not isinstance(slots, (list, tuple)) or list(slots) != list(layout.slots):
        problems.append(f"rule slots: {slots!r} in state vs {list(layout.slots)!r} here")
    # settings: decode each (schedules rebuilt); those that differ replace this EMA's
    stored = data["settings"]
    fields = _settings_fields(rule)
    replace: dict[str, Any] = {}
    changed: list[str] = []
    if not isinstance(stored, Mapping):
        problems.append(f"rule settings: expected a mapping of {fields}, got {stored!r}")
        stored = {}
    unknown = [f for f in stored if f not in fields]
    if unknown:
        problems.append(f"rule settings: {unknown} in state, unknown to {name} (fields {fields})")
    for field, value in stored.items():
        if field in unknown:
            continue
        current = getattr(rule, field)
        if callable(current):  # a schedule, stored as schedules.to_state data
            decoded = _decode_schedule(field, value, current, problems)
            if decoded is None:
                continue
        elif _is_schedules(current):  # one schedule per slot
            if not isinstance(value, (list, tuple)) or len(value) != len(current):
                problems.append(
                    f"rule setting {field}: expected {len(current)} schedules as data, one per "
                    f"slot, got {value!r}"
                )
                continue
            each = [
                _decode_schedule(field, v, c, problems) for v, c in zip(value, current, strict=True)
            ]
            if any(d is None for d in each):
                continue
            decoded = tuple(each)
        elif _is_plain(value):
            decoded = tuple(value) if isinstance(current, tuple) else value
        else:
            problems.append(f"rule setting {field}: {value!r} is not plain data")
            continue
        try:
            same = _encode_setting(rule, field, decoded) == _encode_setting(rule, field, current)
        except TypeError as error:
            problems.append(f"rule setting {field}: {error}")
            continue
        if not same:
            replace[field] = decoded
            what = "decay schedule" if field == "decay" else f"{name}.{field}"
            changed.append(f"{what} {decoded!r} replaces {current!r}")
    new_rule = None
    if replace and settings == "checkpoint":
        try:
            new_rule = dataclasses.replace(rule, **replace)
        except (TypeError, ValueError) as error:
            problems.append(f"rule settings {replace!r}: {name} refused them: {error}")
    # state: the rule's own checks, on a copy
    state = data["state"]
    load = getattr(rule, "load_state_dict", None)
    if not isinstance(state, Mapping):
        problems.append(f"rule state: expected a mapping, got {state!r}")
        state = None
    elif not callable(load):
        if state:
            problems.append(f"rule state: {dict(state)!r} in state, but {name} keeps no state")
        state = None
    else:
        try:
            copy.deepcopy(new_rule if new_rule is not None else rule).load_state_dict(state)
        except (TypeError, ValueError) as error:
            problems.append(f"rule state: {error}")
    return new_rule, state, changed if settings == "checkpoint" else []


def _decode_schedule(field: str, value: Any, current: Any, problems: list[str]) -> Any:
    """A schedule stored as data, rebuilt; ``current`` where it was a user callable (not stored);
    ``None`` (and a problem noted) where the data is malformed."""
    if not isinstance(value, Mapping):
        problems.append(
            f"rule setting {field}: expected a schedule as data ({{'name': ...}}), got {value!r}"
        )
        return None
    try:
        decoded = schedules.from_state(value)
    except (TypeError, ValueError) as error:
        problems.append(f"rule setting {field}: schedule {dict(value)!r}: {error}")
        return None
    return current if decoded is None else decoded  # a user callable: this EMA's stays


def parse(
    state: Any, layout: Layout, *, settings: Literal["checkpoint", "current"] = "checkpoint"
) -> Plan:
    """Upgrade ``state`` (:func:`upgrade`) and check all of it against ``layout``.

    Raises one :class:`~polyak.errors.StateMismatchError` (a ``ValueError``) that lists every
    problem (and says that nothing was changed), or returns the :class:`Plan` to apply. ``settings="checkpoint"`` takes the checkpoint's rule
    settings and ``update_every`` where they differ (listed in ``Plan.changed``);
    ``settings="current"`` keeps the EMA's and loads the averages and counters only.
    """
    if settings not in ("checkpoint", "current"):
        raise ValueError(f"settings must be 'checkpoint' or 'current', got settings={settings!r}.")
    state = upgrade(state)
    problems: list[str] = []
    unknown = sorted(str(k) for k in state if k not in _KEYS)
    if unknown:
        problems.append(f"unexpected keys {unknown} (known: {sorted(_KEYS)})")
    step = _count(state, "step", 0, problems)
    num_averages = _count(state, "num_averages", 0, problems)
    update_every = _count(state, "update_every", 1, problems)
    rng_counter = _count(state, "rng_counter", 0, problems) if "rng_counter" in state else None
    if state.get("buffers") != layout.buffers:
        problems.append(
            f"buffer policy {state.get('buffers')!r} in state vs {layout.buffers!r} here"
        )
    new_rule, rule_state, changed = _check_rule(state.get("rule"), layout, settings, problems)
    # the tensors: every slot the rule keeps, the copies, and their recorded dtypes
    given = state.get("shadows")
    shadows: dict[str, dict[str, torch.Tensor]] = {}
    if not isinstance(given, Mapping):
        problems.append(f"shadows: expected a mapping slot -> (name -> tensor), got {given!r}")
        given = {}
    missing = [s for s in layout.slots if s not in given]
    unexpected = [s for s in given if s not in layout.slots]
    if missing or unexpected:
        problems.append(
            f"shadows: slots {sorted(map(str, given))} in state vs {list(layout.slots)} here"
        )
    for slot in layout.slots:
        if slot in given:
            shadows[slot] = _check_tensors(
                f"shadows[{slot!r}]", given[slot], layout.averaged, problems
            )
    copies = _check_tensors("copies", state.get("copies"), layout.copied, problems)
    dtypes = state.get("shadow_dtypes")
    recorded = {n: t for slot in shadows.values() for n, t in slot.items()} | copies
    if not isinstance(dtypes, Mapping):
        problems.append(f"shadow_dtypes: expected a mapping name -> dtype name, got {dtypes!r}")
    else:
        wrong = [
            f"{n}: {dtypes.get(n)!r} recorded, {dtype_name(t.dtype)!r} held"
            for n, t in recorded.items()
            if dtypes.get(n) != dtype_name(t.dtype)
        ]
        extra = [n for n in dtypes if n not in recorded]
        if wrong or extra:
            problems.append(
                "shadow_dtypes disagree with the tensors: " + "; ".join(wrong[:10] + extra[:10])
            )
    if problems:
        raise StateMismatchError(
            "cannot load EMA state (nothing was changed):\n  "
            + "\n  ".join(problems)
            + "\nBuild the EMA on the same model with the same rule/decay, buffers=, include= and "
            "shadow_dtype= settings as the one that was saved."
        )
    every = None
    if settings == "checkpoint" and update_every != layout.update_every:
        every = update_every
        changed.append(f"update_every={update_every} replaces update_every={layout.update_every}")
    return Plan(
        step=step,
        num_averages=num_averages,
        update_every=every,
        rule=new_rule,
        rule_state=rule_state,
        shadows=shadows,
        copies=copies,
        rng_counter=rng_counter,
        changed=changed,
    )
