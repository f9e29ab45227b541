"""polyak._state: the state-dict schema, its versions and upgrades, validation before mutation.

References: files written by version 1 (tests/fixtures/state_v1, by polyak at acc3dec; see
tests/fixtures/make_state_v1.py) against a run that never stopped, rebuilt here from step 0 with
weights that make every lerp exact, so the bits are the same on every CPU; and what version 2
writes for the same run.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import polyak
from polyak import _state, averagers, schedules
from polyak._store import ShadowStore
from polyak.ema import LoadedSettingsWarning

FIXTURES = Path(__file__).parent / "fixtures"


def _load_scenarios() -> Any:
    spec = importlib.util.spec_from_file_location("make_state_v1", FIXTURES / "make_state_v1.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


v1 = _load_scenarios()
SCENARIOS = list(v1.SCENARIOS)


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )


def fixture(name: str) -> dict[str, Any]:
    return torch.load(FIXTURES / "state_v1" / f"{name}.pt", weights_only=True)


def snapshot(ema: polyak.EMA) -> dict[str, Any]:
    """Everything loading may change, to check that a refused load changed nothing."""
    counter = ema._rng_counter()
    return {
        "shadows": {n: ema.average(n).clone() for n in ema.names()},
        "step": ema.step,
        "num_averages": ema.num_averages,
        "update_every": ema.update_every,
        "rule": ema.rule,
        "rule data": _state.encode_rule(ema.rule),
        "rng": None if counter is None else int(counter),
    }


def assert_unchanged(ema: polyak.EMA, before: dict[str, Any]) -> None:
    after = snapshot(ema)
    assert after["rule"] is before["rule"]
    for key in ("step", "num_averages", "update_every", "rule data", "rng"):
        assert after[key] == before[key], key
    for name, tensor in before["shadows"].items():
        assert torch.equal(after["shadows"][name], tensor), name


def assert_same_data(a: Any, b: Any, path: str = "state") -> None:
    """Equal plain data; tensors equal bit for bit with the same dtype; mappings in one order
    (names keep the model's order); a user callable's repr (its address) is not compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict), path
        keys = [k for k in a if k != "repr"]
        assert sorted(keys) == sorted(k for k in b if k != "repr"), path
        if path.startswith(("state['shadows']", "state['copies']")):
            assert list(a) == list(b), path
        for key in keys:
            assert_same_data(a[key], b[key], f"{path}[{key!r}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


# ---------------------------------------------------------------- version 1, from the files


@pytest.mark.parametrize("name", SCENARIOS)
def test_v1_fixture_is_the_run_it_says(name):
    """Each file is version 1, plain data, and holds what the scenario's run holds at the step it
    was saved (rebuilt from step 0 here): the reference the resume tests stand on."""
    scenario = v1.SCENARIOS[name]
    state = fixture(name)
    assert state["format"] == "polyak.EMA" and state["version"] == 1
    assert "rule" not in state and "schedule" in state  # the version-1 layout
    target, ema = scenario.make()
    v1.run(target, ema, 0, scenario.save_at)
    assert state["step"] == ema.step == scenario.save_at
    assert state["num_averages"] == ema.num_averages
    assert list(state["shadows"]) == ema.names()
    for n, tensor in state["shadows"].items():
        assert tensor.dtype == ema.average(n).dtype and torch.equal(tensor, ema.average(n)), n


@pytest.mark.parametrize("name", SCENARIOS)
def test_v1_fixture_resumes_exactly(name):
    """A version-1 file loads into an EMA built today's way with other settings, takes the
    checkpoint's schedule, ``update_every``, counters and random stream, and continuing it equals
    the run that never stopped, bit for bit."""
    scenario = v1.SCENARIOS[name]
    target, ema = scenario.make()
    v1.run(target, ema, 0, scenario.stop)  # never stopped

    stored_decay = not callable(scenario.options["decay"]) or isinstance(
        scenario.options["decay"], schedules.Schedule
    )
    overrides = {"update_every": 1, **({"decay": 0.9} if stored_decay else {})}
    resumed_target, resumed = scenario.make(**overrides)
    v1.set_weights(resumed_target, scenario.save_at)  # the model's own checkpoint
    state = fixture(name)
    before = copy.deepcopy(state)
    if stored_decay:
        with pytest.warns(LoadedSettingsWarning, match=r"replaces Constant\(decay=0.9\)"):
            resumed.load_state_dict(state)
    else:  # a user callable is not stored: passed again, nothing replaced
        with warnings.catch_warnings():
            warnings.simplefilter("error", LoadedSettingsWarning)
            resumed.load_state_dict(state)
    assert_same_data(state, before)  # the caller's dict is left as it was
    assert resumed.step == scenario.save_at
    v1.run(resumed_target, resumed, scenario.save_at, scenario.stop)

    assert resumed.step == ema.step == scenario.stop
    assert resumed.num_averages == ema.num_averages
    assert resumed.update_every == ema.update_every
    assert _state.encode_rule(resumed.rule) == _state.encode_rule(ema.rule)
    assert resumed.names() == ema.names()
    for n in ema.names():
        assert resumed.average(n).dtype == ema.average(n).dtype, n
        assert torch.equal(resumed.average(n), ema.average(n)), n
    if scenario.options.get("rounding") == "stochastic":
        assert resumed.state_dict()["rng_counter"] == ema.state_dict()["rng_counter"]


def test_v1_stochastic_fixture_needs_its_rng_counter():
    """The stochastic fixture's resume above is only bit-exact with the stream's counter: one
    restarted at 0 rounds differently (so that test can tell a dropped counter)."""
    scenario = v1.SCENARIOS["stochastic"]
    target, ema = scenario.make()
    v1.run(target, ema, 0, scenario.stop)
    resumed_target, resumed = scenario.make()
    v1.set_weights(resumed_target, scenario.save_at)
    resumed.load_state_dict(dict(fixture("stochastic"), rng_counter=0))
    v1.run(resumed_target, resumed, scenario.save_at, scenario.stop)
    assert any(not torch.equal(resumed.average(n), ema.average(n)) for n in ema.names())


def test_v1_fixture_with_current_settings_keeps_this_emas():
    """``settings="current"`` on a version-1 file: the averages and counters load, the decay and
    ``update_every`` stay, no warning."""
    scenario = v1.SCENARIOS["module_fp32_bn"]  # saved with decay 0.5, update_every=2
    target, ema = scenario.make(decay=0.9, update_every=3)
    v1.set_weights(target, scenario.save_at)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoadedSettingsWarning)
        ema.load_state_dict(fixture("module_fp32_bn"), settings="current")
    assert ema.update_every == 3 and ema.schedule == schedules.constant(0.9)
    assert ema.step == 5 and ema.num_averages == 2
    for n, tensor in fixture("module_fp32_bn")["shadows"].items():
        assert torch.equal(ema.average(n), tensor), n


@pytest.mark.parametrize("name", SCENARIOS)
def test_upgraded_v1_equals_what_version_2_writes(name):
    """The v1 -> v2 upgrade of each file equals what ``state_dict()`` writes today for the same
    run (an independent writer), and leaves its input as it was (a pure function)."""
    scenario = v1.SCENARIOS[name]
    state = fixture(name)
    before = copy.deepcopy(state)
    upgraded = _state.upgrade(state)
    assert_same_data(state, before)
    assert upgraded["version"] == 2
    target, ema = scenario.make()
    v1.run(target, ema, 0, scenario.save_at)
    assert_same_data(upgraded, ema.state_dict())


def test_v1_to_v2_by_hand():
    """The upgrade on a small hand-written version-1 dict: copied names leave the slot."""
    w, n = torch.ones(2), torch.tensor(3)
    state = {
        "format": "polyak.EMA",
        "version": 1,
        "step": 3,
        "num_averages": 3,
        "update_every": 1,
        "buffers": "average",
        "schedule": {"name": "constant", "decay": 0.9},
        "shadows": {"w": w, "n": n},
        "shadow_dtypes": {"w": "float32", "n": "int64"},
        "kinds": {"w": "average", "n": "copy"},
        "rng_counter": 3,
    }
    assert _state.upgrade(state) == {
        "format": "polyak.EMA",
        "version": 2,
        "step": 3,
        "num_averages": 3,
        "update_every": 1,
        "buffers": "average",
        "rule": {
            "type": "Exponential",
            "settings": {"decay": {"name": "constant", "decay": 0.9}},
            "state": {},
            "slots": ["ema"],
        },
        "shadows": {"ema": {"w": w}},
        "copies": {"n": n},
        "shadow_dtypes": {"w": "float32", "n": "int64"},
        "rng_counter": 3,
    }


# ---------------------------------------------------------------- version 2


def test_state_dict_is_plain_data_and_versioned():
    ema = polyak.EMA(small_net(), decay=schedules.power(gamma=6.94))
    state = ema.state_dict()
    assert state["format"] == "polyak.EMA" and state["version"] == 2
    assert state["rule"] == {
        "type": "Exponential",
        "settings": {"decay": {"name": "power", "gamma": 6.94}},
        "state": {},
        "slots": ["ema"],
    }
    assert isinstance(state["step"], int)
    assert state["shadow_dtypes"]["0.weight"] == "float32"
    assert state["shadow_dtypes"]["1.num_batches_tracked"] == "int64"
    assert list(state["shadows"]) == ["ema"]
    assert list(state["copies"]) == ["1.num_batches_tracked"]
    assert list(state["shadows"]["ema"]) + list(state["copies"]) == ema.names()
    assert state["shadows"]["ema"]["0.weight"] is not None
    assert "rng_counter" not in state  # round to nearest: no stream


@pytest.mark.parametrize("name", SCENARIOS)
def test_v2_round_trips_through_a_weights_only_file(name, tmp_path):
    """Save (atomically), read back with ``weights_only=True``, load into a fresh EMA: the same
    state dict, and continuing equals the run that never stopped, bit for bit."""
    scenario = v1.SCENARIOS[name]
    stop = scenario.save_at + 3
    target, ema = scenario.make()
    v1.run(target, ema, 0, scenario.save_at)
    saved = copy.deepcopy(ema.state_dict())  # its tensors are the shadows, which move on
    polyak.io.save_state({"ema": saved}, tmp_path / "ckpt.pt")
    v1.run(target, ema, scenario.save_at, stop)

    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["ema"]
    assert_same_data(loaded, polyak.io.load_state(tmp_path / "ckpt.pt")["ema"])
    resumed_target, resumed = scenario.make()
    v1.set_weights(resumed_target, scenario.save_at)
    resumed.load_state_dict(loaded)
    assert_same_data(resumed.state_dict(), saved)
    v1.run(resumed_target, resumed, scenario.save_at, stop)
    assert_same_data(resumed.state_dict(), ema.state_dict())


def test_user_callable_is_not_stored_and_kept_on_load():
    fn = lambda step: 0.5  # noqa: E731
    ema = polyak.EMA(small_net(), decay=fn)
    state = ema.state_dict()
    assert state["rule"]["settings"]["decay"]["name"] == "callable"
    other = polyak.EMA(small_net(), decay=fn)
    other.load_state_dict(state)
    assert other.schedule is fn


def test_load_state_dict_warns_naming_both_settings_or_keeps_the_current_ones():
    saved = polyak.EMA(small_net(), decay=schedules.tf_warmup(0.99), update_every=3)
    saved.step = 7
    state = saved.state_dict()
    same = polyak.EMA(small_net(), decay=schedules.tf_warmup(0.99), update_every=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: silent
        same.load_state_dict(state)
    other = polyak.EMA(small_net(), decay=0.9)
    with pytest.warns(LoadedSettingsWarning) as record:
        other.load_state_dict(state)
    message = str(record[0].message)
    assert "TFWarmup(decay=0.99) replaces Constant(decay=0.9)" in message
    assert "update_every=3 replaces update_every=1" in message and "settings='current'" in message
    assert other.update_every == 3 and other.schedule == schedules.tf_warmup(0.99)
    kept = polyak.EMA(small_net(), decay=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept.load_state_dict(state, settings="current")
    assert kept.update_every == 1 and kept.schedule == schedules.constant(0.9)
    assert kept.step == 7
    with pytest.raises(ValueError, match="settings must be 'checkpoint' or 'current'"):
        kept.load_state_dict(state, settings="mine")


# ---------------------------------------------------------------- refused, and nothing changed


@pytest.mark.parametrize(
    ("version", "fragment"),
    [
        (3, "version 3 is newer than this polyak understands (versions 1 to 2)"),
        (99, "version 99 is newer than this polyak understands"),
        (0, "version 0 is not one polyak ever wrote"),
        (-1, "version -1 is not one polyak ever wrote"),
        ("2", "version '2' is not one polyak ever wrote"),
        (2.0, "version 2.0 is not one polyak ever wrote"),
        (True, "version True is not one polyak ever wrote"),
        (None, "version None is not one polyak ever wrote"),
    ],
)
@pytest.mark.parametrize("written", [1, 2])
def test_unknown_and_future_versions_are_refused(version, fragment, written):
    state = fixture("pairs") if written == 1 else polyak.EMA(small_net(1)).state_dict()
    state["version"] = version
    if written == 1:
        _, ema = v1.SCENARIOS["pairs"].make()
    else:
        ema = polyak.EMA(small_net(), decay=0.5, update_every=2)
    ema.step = 4
    before = snapshot(ema)
    with pytest.raises(ValueError, match="Nothing was changed") as info:
        ema.load_state_dict(state)
    assert fragment in str(info.value)
    assert_unchanged(ema, before)


@pytest.mark.parametrize(
    ("state", "fragment"),
    [
        ([1, 2], "not a polyak.EMA state dict (a list; expected format='polyak.EMA')"),
        ({"version": 2}, "not a polyak.EMA state dict (format=None"),
        ({"format": "timm.ModelEma", "version": 2}, "format='timm.ModelEma'"),
    ],
)
def test_what_is_no_state_dict_is_refused(state, fragment):
    ema = polyak.EMA(small_net())
    before = snapshot(ema)
    with pytest.raises(ValueError, match="Nothing was changed") as info:
        ema.load_state_dict(state)
    assert fragment in str(info.value)
    assert_unchanged(ema, before)


def _put(state: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        state = state[key]
    if value is _DELETE:
        del state[path[-1]]
    else:
        state[path[-1]] = value


_DELETE = object()
_SCHEDULE = ("rule", "settings", "decay")


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (_SCHEDULE, {"name": "no_such_schedule"}, "unknown schedule 'no_such_schedule'"),
        (_SCHEDULE, {"name": "constant", "decay": 1.5}, "schedule {'name': 'constant'"),
        (_SCHEDULE, 0.5, "rule setting decay: expected a schedule as data ({'name': ...}), got"),
        (_SCHEDULE, {"name": "constant", "decay": 0.5, "x": 1}, "schedule {'name': 'constant'"),
        (("step",), "7", "step: expected an int >= 0, got '7'"),
        (("step",), _DELETE, "step: expected an int >= 0, got missing"),
        (("num_averages",), -1, "num_averages: expected an int >= 0, got -1"),
        (("update_every",), 0, "update_every: expected an int >= 1, got 0"),
        (("update_every",), True, "update_every: expected an int >= 1, got True"),
        (("rng_counter",), 1.5, "rng_counter: expected an int >= 0, got 1.5"),
        (("buffers",), "copy", "buffer policy 'copy' in state vs 'average' here"),
        (("extra",), 1, "unexpected keys ['extra']"),
        (("rule",), "Exponential", "rule: expected a mapping"),
        (("rule", "type"), "Uniform", "rule: 'Uniform' in state vs 'Exponential' here"),
        (("rule", "slots"), ["ema", "ema2"], "rule slots: ['ema', 'ema2'] in state vs ['ema']"),
        (("rule", "settings", "sigma_rel"), 0.1, "rule settings: ['sigma_rel'] in state, unknown"),
        (("rule", "settings"), [], "rule settings: expected a mapping"),
        (("rule", "state"), {"count": 3}, "rule state"),
        (("rule", "state"), 3, "rule state: expected a mapping, got 3"),
        (("rule", "extra"), 1, "rule: expected the keys ['settings', 'slots', 'state', 'type']"),
        (("shadows",), [], "shadows: expected a mapping slot -> (name -> tensor)"),
        (("shadows", "swa"), {}, "shadows: slots ['ema', 'swa'] in state vs ['ema'] here"),
        (("shadows", "ema"), _DELETE, "shadows: slots [] in state vs ['ema'] here"),
        (("shadows", "ema", "0.weight"), [0.0], "shadows['ema'] is not a mapping of names"),
        (("shadows", "ema", "0.weight"), torch.zeros(4), "shadows['ema'] 0.weight: shape (4,)"),
        (("shadows", "ema", "4.bias"), _DELETE, "shadows['ema']: missing names: ['4.bias']"),
        (("copies", "1.num_batches_tracked"), _DELETE, "copies: missing names"),
        (("copies", "1.num_batches_tracked"), torch.tensor(1.0), "dtype float32 in state vs int64"),
        (("copies",), None, "copies is not a mapping of names to tensors (got NoneType)"),
        (("shadow_dtypes", "0.weight"), "float16", "0.weight: 'float16' recorded, 'float32' held"),
        (("shadow_dtypes",), None, "shadow_dtypes: expected a mapping"),
    ],
)
def test_load_state_dict_is_atomic(path, value, fragment):
    """Everything is validated before anything changes: after the error, the EMA is as it was."""
    saved = polyak.EMA(small_net(1), decay=0.9, shadow_dtype=torch.float32)
    saved.step = 5
    state = saved.state_dict()
    state["rng_counter"] = 5  # as a stochastic EMA writes (checked when present)
    _put(state, path, value)
    ema = polyak.EMA(small_net(), decay=0.5, update_every=2)
    ema.step = 3
    before = snapshot(ema)
    with pytest.raises(ValueError, match="nothing was changed") as info:
        ema.load_state_dict(state)
    assert fragment in str(info.value)
    assert_unchanged(ema, before)
    assert ema.schedule == schedules.constant(0.5)


def test_load_state_dict_reports_every_mismatch():
    state = polyak.EMA(small_net()).state_dict()
    shadows = state["shadows"]["ema"]
    shadows["extra.weight"] = torch.zeros(1)
    del shadows["4.bias"]
    shadows["0.weight"] = torch.zeros(2, 2)
    shadows["4.weight"] = shadows["4.weight"].double()
    state["step"] = -1
    state["rule"]["settings"]["decay"] = {"name": "constant", "decay": 2.0}
    with pytest.raises(ValueError) as info:
        polyak.EMA(small_net()).load_state_dict(state)
    message = str(info.value)
    for fragment in [
        "missing names: ['4.bias']",
        "unexpected names: ['extra.weight']",
        "0.weight: shape (2, 2)",
        "4.weight: dtype float64",
        "step: expected an int >= 0, got -1",
        "rule setting decay: schedule {'name': 'constant', 'decay': 2.0}",
    ]:
        assert fragment in message


@pytest.mark.parametrize(
    ("corrupt", "fragment"),
    [
        (lambda s: s.pop("kinds"), "copies: missing names: ['1.num_batches_tracked']"),
        (lambda s: s.update(shadows=None), "shadows: expected a mapping slot -> (name -> tensor)"),
        (lambda s: s.update(shadows=[1]), "shadows['ema'] is not a mapping of names to tensors"),
        (lambda s: s["kinds"].update({"0.weight": "copy"}), "copies: unexpected names"),
        (lambda s: s.update(step=2.5), "step: expected an int >= 0, got 2.5"),
        (lambda s: s.update(schedule={"name": "nope"}), "unknown schedule 'nope'"),
    ],
)
def test_a_corrupted_v1_file_is_refused_after_its_upgrade(corrupt, fragment):
    """The upgrade never raises on a damaged version-1 dict: what it cannot place is reported by
    the validation of version 2, with everything else, and nothing is changed."""
    state = fixture("module_fp32_bn")
    corrupt(state)
    _, ema = v1.SCENARIOS["module_fp32_bn"].make()
    before = snapshot(ema)
    with pytest.raises(ValueError, match="nothing was changed") as info:
        ema.load_state_dict(state)
    assert fragment in str(info.value)
    assert_unchanged(ema, before)


# ---------------------------------------------------------------- rules with state, N slots


@dataclasses.dataclass(eq=False)
class Counting(averagers.Rule):
    """A stand-in for a rule with a setting and state (the kind polyak.averagers grows): a
    constant weight, and what the state dict uses."""

    slots: ClassVar[tuple[str, ...]] = ("counted",)
    scale: float = 0.5
    count: Any = dataclasses.field(default=0, init=False)

    def weights(self, first: Any, last: Any, ops: Any = averagers.HOST) -> tuple[Any]:
        return (0.5,)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        count = state.get("count")
        if set(state) != {"count"} or not isinstance(count, int) or count < 0:
            raise ValueError(f"Counting.load_state_dict: expected {{'count': n >= 0}}, got {state}")
        self.count = count


def counting_ema(scale: float, seed: int = 0) -> polyak.EMA:
    return polyak.EMA(small_net(seed), rule=Counting(scale))


def test_a_rules_settings_and_state_are_stored_and_loaded():
    saved = counting_ema(0.25, seed=1)
    saved.rule.count = torch.tensor(7)  # a capturable EMA's device counter: stored as an int
    saved.step = 9
    state = saved.state_dict()
    assert state["rule"] == {
        "type": "Counting",
        "settings": {"scale": 0.25},
        "state": {"count": 7},
        "slots": ["counted"],
    }
    assert type(state["rule"]["state"]["count"]) is int
    assert list(state["shadows"]) == ["counted"]

    ema = counting_ema(0.5)
    rule = ema.rule
    with pytest.warns(LoadedSettingsWarning, match=r"Counting.scale 0.25 replaces 0.5"):
        ema.load_state_dict(state)
    assert ema.rule.scale == 0.25 and ema.rule.count == 7 and ema.step == 9
    assert rule.scale == 0.5 and rule.count == 0  # the rule given was replaced, not changed
    for n in saved.names():
        assert torch.equal(ema.average(n), saved.average(n)), n

    kept = counting_ema(0.5)
    rule = kept.rule
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoadedSettingsWarning)
        kept.load_state_dict(state, settings="current")
    assert kept.rule is rule and rule.scale == 0.5 and rule.count == 7  # state is a counter


def test_a_rules_own_checks_run_before_anything_changes():
    state = counting_ema(0.25, seed=1).state_dict()
    state["rule"]["state"] = {"count": -1}
    state["step"] = 4
    ema = counting_ema(0.25)
    ema.rule.count = 2
    before = snapshot(ema)
    with pytest.raises(ValueError, match="nothing was changed") as info:
        ema.load_state_dict(state)
    assert "rule state: Counting.load_state_dict: expected {'count': n >= 0}" in str(info.value)
    assert_unchanged(ema, before)
    assert ema.rule.count == 2
    state["rule"]["state"] = {"count": 1}
    state["rule"]["settings"] = {"scale": {"value": 0.25}}
    with pytest.raises(ValueError, match="rule setting scale: {'value': 0.25} is not plain data"):
        ema.load_state_dict(state)
    assert_unchanged(ema, before)
    # and an Exponential EMA, whose rule keeps no state, refuses a Counting checkpoint
    plain = polyak.EMA(small_net())
    with pytest.raises(ValueError, match="rule: 'Counting' in state vs 'Exponential' here"):
        plain.load_state_dict(counting_ema(0.25).state_dict())


def test_a_rule_setting_that_is_no_data_is_refused_when_saving():
    ema = polyak.EMA(small_net(), rule=Counting(scale=torch.ones(2)))
    with pytest.raises(TypeError, match=r"Counting.scale=tensor\(.*cannot be stored"):
        ema.state_dict()


@dataclasses.dataclass(frozen=True)
class TwoSlots:
    slots: ClassVar[tuple[str, ...]] = ("fast", "slow")


def two_slot_state(**shadows: dict[str, torch.Tensor]) -> dict[str, Any]:
    names = {n: t for slot in shadows.values() for n, t in slot.items()}
    return {
        "format": "polyak.EMA",
        "version": 2,
        "step": 2,
        "num_averages": 2,
        "update_every": 1,
        "buffers": "average",
        "rule": {"type": "TwoSlots", "settings": {}, "state": {}, "slots": ["fast", "slow"]},
        "shadows": shadows,
        "copies": {},
        "shadow_dtypes": {n: "float32" for n in names},
    }


def test_version_2_holds_several_slots():
    """The schema and its checks are ready for rules with N slots (keyed by (slot, name))."""
    layout = _state.Layout(
        rule=TwoSlots(), averaged={"w": torch.zeros(3)}, copied={}, buffers="average",
        update_every=1,
    )  # fmt: skip
    fast, slow = torch.ones(3), torch.full((3,), 2.0)
    plan = _state.parse(two_slot_state(fast={"w": fast}, slow={"w": slow}), layout)
    assert plan.shadows == {"fast": {"w": fast}, "slow": {"w": slow}}
    assert plan.step == 2 and plan.rule is None and plan.rule_state is None and not plan.changed
    with pytest.raises(ValueError) as info:
        _state.parse(two_slot_state(fast={"w": fast}, slow={"v": slow}), layout)
    assert "shadows['slow']: missing names: ['w']" in str(info.value)
    assert "shadows['slow']: unexpected names: ['v']" in str(info.value)
    with pytest.raises(ValueError, match=r"slots \['fast'\] in state vs \['fast', 'slow'\]"):
        _state.parse(two_slot_state(fast={"w": fast}), layout)


# ------------------------------------------------------------------ write / Layout.of / Plan.copy_into


def test_write_then_parse_then_copy_into_round_trips_a_store_without_an_ema():
    torch.manual_seed(0)
    weight, count = torch.randn(3, 2, dtype=torch.bfloat16), torch.tensor(7)
    tracked = [("w", weight, "average"), ("n", count, "copy")]
    rule = averagers.Exponentials((0.9, 0.99))
    store = ShadowStore(tracked, _state.rule_slots(rule))
    for i, slot in enumerate(store.slots):
        store.shadow("w", slot).fill_(i + 0.5)
    counters = {"step": 5, "num_averages": 2, "update_every": 2}
    state = _state.write(store, ["n", "w"], rule, **counters, buffers="average", rng_counter=None)
    assert "rng_counter" not in state and list(state["shadow_dtypes"]) == ["n", "w"]
    assert state["shadow_dtypes"] == {"n": "int64", "w": "float32"}  # bf16 -> fp32 shadows
    assert state["shadows"]["ema1"]["w"].data_ptr() == store.shadow("w", "ema1").data_ptr()
    assert (state["step"], state["num_averages"], state["update_every"]) == (5, 2, 2)
    other = ShadowStore(tracked, _state.rule_slots(rule))
    plan = _state.parse(state, _state.Layout.of(other, rule, "average", 2))
    plan.copy_into(other)
    for slot in store.slots:
        assert torch.equal(other.shadow("w", slot), store.shadow("w", slot))
    assert torch.equal(other.shadow("n"), count)
    with_counter = _state.write(store, ["w", "n"], rule, **counters, buffers="copy", rng_counter=11)
    assert with_counter["rng_counter"] == 11 and with_counter["buffers"] == "copy"
