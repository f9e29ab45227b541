"""polyak._switch: the train/test switch (seed 001) on plain tensors and modules, without an EMA.

idle -> swapped -> idle and idle -> stored -> idle, each way back bit for bit; what each state
refuses and the words it uses; the optimizer pre-hook that refuses a step into swapped-in values;
``bind`` (model.train()/eval()); FSDP2 resharding order (recorded through a stand-in for
``_placement.reshard``: the real thing under FSDP2 is in tests/test_fsdp2.py); deep copies.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from polyak import _placement, _switch
from polyak._switch import Switch


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32).clone()


def tensors() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """name -> live parameter (with -0.0, NaN and inf among its values), name -> value."""
    torch.manual_seed(0)
    live = {"a": nn.Parameter(torch.randn(3, 2)), "b": nn.Parameter(torch.randn(4))}
    with torch.no_grad():
        live["a"].view(-1)[:3] = torch.tensor([-0.0, float("nan"), float("inf")])
    values = {name: torch.randn_like(t) for name, t in live.items()}
    return live, values


def test_swap_in_re_points_and_swap_out_gives_back_the_own_bits():
    live, values = tensors()
    own = {n: (t.data_ptr(), bits(t)) for n, t in live.items()}
    switch = Switch(None)
    switch.swap_in(None, lambda: live, lambda: values)
    assert switch.state == "swapped" and switch.held is live
    for name, tensor in live.items():
        assert tensor.data_ptr() == values[name].data_ptr()  # views the value: nothing copied
    switch.swap_out()
    assert switch.state is None and switch.held is None and not switch.backup
    for name, tensor in live.items():
        assert tensor.data_ptr() == own[name][0] and torch.equal(bits(tensor), own[name][1])


def test_values_go_in_by_name_not_by_position():
    live, values = tensors()
    switch = Switch(None)
    switch.swap_in(None, lambda: live, lambda: dict(reversed(list(values.items()))))
    assert all(torch.equal(live[n], values[n]) for n in live)
    switch.swap_out()


def test_seed001_store_twice_keeps_the_first_backup():
    live, values = tensors()
    own = {n: bits(t) for n, t in live.items()}
    switch = Switch(None)
    switch.store(None, lambda: live)
    switch.write(None, lambda: pytest.fail("stored: write uses the stored tensors"), lambda: values)
    assert all(torch.equal(live[n], values[n]) for n in live)
    switch.store(None, lambda: pytest.fail("a second store() is a no-op"))
    switch.restore()  # the trained weights, not the averages the second store would have kept
    assert switch.state is None and switch.held is None
    assert all(torch.equal(bits(live[n]), own[n]) for n in live)


def test_write_without_store_finds_the_tensors_and_changes_them_in_place():
    live, values = tensors()
    pointers = {n: t.data_ptr() for n, t in live.items()}
    switch = Switch(None)
    switch.write(None, lambda: live, lambda: values)
    assert switch.state is None and not switch.backup
    assert all(live[n].data_ptr() == pointers[n] and torch.equal(live[n], values[n]) for n in live)


def test_write_into_another_model_while_stored_finds_its_tensors():
    live, values = tensors()
    other = nn.Linear(2, 3)
    found = {"a": other.weight, "b": torch.zeros(4)}
    switch = Switch(None)
    switch.store(None, lambda: live)
    before = {n: bits(t) for n, t in live.items()}
    switch.write(other, lambda: found, lambda: values)
    assert torch.equal(other.weight, values["a"])
    assert all(torch.equal(bits(live[n]), before[n]) for n in live)  # the stored ones untouched
    switch.restore()


@pytest.mark.parametrize(
    ("enter", "words", "leave_by"),
    [
        ("swap", "swapped()/use_averages()", "use_trained()"),
        ("store", "store()/copy_to()", "restore()"),
    ],
)
def test_check_idle_names_the_state_and_the_way_out(enter, words, leave_by):
    live, values = tensors()
    switch = Switch(None)
    switch.check_idle("do it")  # idle: nothing to refuse
    if enter == "swap":
        switch.swap_in(None, lambda: live, lambda: values)
    else:
        switch.store(None, lambda: live)
    with pytest.raises(RuntimeError) as info:
        switch.check_idle("do it")
    text = str(info.value)
    assert text.startswith("cannot do it:") and words in text and f"call {leave_by}" in text
    switch.leave()
    assert switch.state is None
    switch.check_idle("do it")


@pytest.mark.parametrize(
    ("enter", "where"),
    [
        ("swap", "inside ema.swapped() / use_averages()"),
        ("store", "between ema.store() and ema.restore()"),
    ],
)
def test_check_update_says_where_the_model_is(enter, where):
    live, values = tensors()
    switch = Switch(None)
    switch.check_update()
    if enter == "swap":
        switch.swap_in(None, lambda: live, lambda: values)
    else:
        switch.store(None, lambda: live)
    with pytest.raises(RuntimeError, match=re.escape(f"ema.update() called {where}:")):
        switch.check_update()
    switch.leave()
    switch.check_update()


def test_refusals_of_the_wrong_state():
    live, values = tensors()
    switch = Switch(None)
    with pytest.raises(RuntimeError, match=r"restore\(\) without a backup"):
        switch.restore()
    switch.leave()  # idle: a no-op
    switch.swap_in(None, lambda: live, lambda: values)
    with pytest.raises(RuntimeError, match=r"copy_to\(\) inside swapped"):
        switch.write(None, lambda: live, lambda: values)
    with pytest.raises(RuntimeError, match=r"cannot store\(\)"):
        switch.store(None, lambda: live)
    with pytest.raises(RuntimeError, match=r"restore\(\) without a backup"):
        switch.restore()
    assert all(torch.equal(live[n], values[n]) for n in live)  # still swapped
    switch.leave()


def test_an_optimizer_step_into_swapped_values_is_refused_and_allowed_after():
    live, values = tensors()
    stranger = nn.Parameter(torch.ones(2))
    switch = Switch(None)
    switch.swap_in(None, lambda: live, lambda: values)
    held_values = {n: v.clone() for n, v in values.items()}
    for t in [*live.values(), stranger]:
        t.grad = torch.ones_like(t)
    torch.optim.SGD([stranger], lr=1.0).step()  # another model's step is not refused
    optimizer = torch.optim.SGD(list(live.values()), lr=1.0)
    with pytest.raises(RuntimeError, match="would write into the averages themselves"):
        optimizer.step()
    assert all(torch.equal(values[n], held_values[n]) for n in values)
    switch.swap_out()
    optimizer.step()  # the hook is gone
    assert all(torch.equal(values[n], held_values[n]) for n in values)
    switch.store(None, lambda: live)
    optimizer.step()  # stored: the tensors hold their own storage, stepping is the user's call
    switch.restore()


def test_reshard_comes_before_the_lookup_and_after_the_way_back(monkeypatch):
    live, values = tensors()
    model = nn.Linear(2, 2)
    calls: list[tuple[str, object]] = []
    real_take_back = _placement.take_back
    monkeypatch.setattr(_placement, "reshard", lambda m: calls.append(("reshard", m)))
    monkeypatch.setattr(
        _placement, "take_back", lambda b: (calls.append(("take_back", None)), real_take_back(b))
    )

    def find() -> dict[str, torch.Tensor]:
        calls.append(("find", None))
        return live

    switch = Switch(model)
    switch.swap_in(None, find, lambda: values)  # None: the tracked model
    switch.swap_out()
    assert calls == [("reshard", model), ("find", None), ("take_back", None), ("reshard", model)]
    calls.clear()
    other = nn.Linear(2, 2)
    switch.store(other, find)
    switch.write(None, find, lambda: values)  # the stored model, resharded, not looked up again
    switch.restore()
    assert calls == [
        ("reshard", other),
        ("find", None),
        ("reshard", other),
        ("take_back", None),
        ("reshard", other),
    ]


def test_a_wrapped_model_is_unwrapped():
    model = nn.Linear(2, 2)
    seen = []
    switch = Switch(model)
    switch.store(nn.DataParallel(model), lambda: dict(model.named_parameters()))
    assert switch.placed is model
    switch.restore()
    switch.bind(nn.DataParallel(model), lambda: seen.append("averages"), lambda: seen.append("x"))
    assert isinstance(model.__dict__["train"], _switch.ModeSwitch)


def test_bind_calls_back_on_eval_and_train_and_unbinds():
    model = nn.Linear(2, 2)
    seen: list[str] = []
    switch = Switch(model)
    handle = switch.bind(None, lambda: seen.append("averages"), lambda: seen.append("trained"))
    assert seen == []  # the model trains: nothing to do at once
    assert switch.bind(model, pytest.fail, pytest.fail) is handle  # binding twice: the same
    assert model.eval() is model and not model.training
    assert model.train() is model and model.training
    assert seen == ["averages", "trained"]
    clone = copy.deepcopy(model)
    assert not isinstance(clone.__dict__.get("train"), _switch.ModeSwitch)  # the module's own
    clone.eval()
    assert seen == ["averages", "trained"] and not clone.training
    handle.remove()
    model.eval()
    assert seen == ["averages", "trained"] and "train" not in model.__dict__


def test_bind_to_a_model_in_eval_mode_applies_at_once_and_refuses_another_model():
    model = nn.Linear(2, 2).eval()
    seen: list[str] = []
    switch = Switch(model)
    with pytest.raises(ValueError, match="bind_to_mode needs the module this EMA tracks"):
        switch.bind(nn.Linear(2, 2), pytest.fail, pytest.fail)
    with pytest.raises(ValueError, match="bind_to_mode needs the module this EMA tracks"):
        Switch(None).bind(None, pytest.fail, pytest.fail)
    switch.bind(None, lambda: seen.append("averages"), lambda: seen.append("trained"))
    assert seen == ["averages"]


def test_a_deep_copy_of_a_swapped_switch_holds_the_copied_tensors_and_refuses_steps():
    live, values = tensors()
    model = nn.Linear(2, 2)
    switch = Switch(model)
    switch.bind(None, lambda: None, lambda: None)
    switch.swap_in(None, lambda: live, lambda: values)
    memo: dict[int, object] = {}
    clone = copy.deepcopy(switch, memo)
    assert clone.state == "swapped" and clone.mode is None
    assert clone.model is memo[id(model)]
    assert clone.held is not None and clone.held["a"] is memo[id(live["a"])]
    switch.swap_out()  # the original's hook is gone; the clone's is its own
    copied = clone.held["a"]
    copied.grad = torch.ones_like(copied)
    with pytest.raises(RuntimeError, match="would write into the averages themselves"):
        torch.optim.SGD([copied], lr=1.0).step()
    clone.swap_out()
    assert torch.equal(bits(copied), bits(live["a"]))  # the copy's own values came back
