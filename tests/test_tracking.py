"""The EMA keeps averaging what the model holds (polyak._tracking), or says why it cannot.

Every expected value is the closed form of one update with decay 0.5 from known shadows and known
new weights, ``s' = 0.5 * s + 0.5 * θ`` in float64; a lerp rounds it within an ulp or two.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polyak
from polyak import _tracking
from polyak._tracking import Watch


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))


def shadows(ema: polyak.EMA) -> dict[str, torch.Tensor]:
    return {n: ema.average(n).detach().clone() for n in ema.names()}


def assert_half_way(actual: torch.Tensor, shadow: torch.Tensor, theta: object) -> None:
    """``actual`` is one decay-0.5 update of ``shadow`` towards ``theta`` (float64 reference)."""
    theta = torch.as_tensor(theta).double()
    expected = 0.5 * shadow.double() + 0.5 * theta
    torch.testing.assert_close(actual.double(), expected.expand_as(actual), rtol=3e-7, atol=1e-8)


@pytest.mark.parametrize("kernel", ["reference", "foreach", "fused"])
def test_load_state_dict_assign_is_followed(kernel):
    """The issue's case: ``assign=True`` puts new Parameter objects in the model."""
    m = net()
    e = polyak.EMA(m, decay=0.5, kernel=kernel)
    before = shadows(e)
    m.load_state_dict({k: torch.ones_like(v) for k, v in m.state_dict().items()}, assign=True)
    e.update()
    for name in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        assert_half_way(e.average(name), before[name], 1.0)
    assert e.average("1.num_batches_tracked").item() == 1  # copied from the new buffer


def test_replaced_layer_is_followed_and_watched_again():
    m = net()
    e = polyak.EMA(m, decay=0.5)
    before = shadows(e)
    m[1] = nn.BatchNorm1d(8)  # weight 1, bias 0, mean 0, var 1
    with torch.no_grad():
        m[1].weight.fill_(3.0)
    e.update()
    assert_half_way(e.average("1.weight"), before["1.weight"], 3.0)
    assert_half_way(e.average("1.running_var"), before["1.running_var"], 1.0)
    # the new layer is watched from now on: a second replacement is seen too
    m[1] = nn.BatchNorm1d(8)
    e.update()
    assert_half_way(e.average("1.weight"), 0.5 * before["1.weight"].double() + 1.5, 1.0)


def test_one_replaced_parameter_is_followed():
    """Not a group's first tensor, not a buffer: the parameter-registration hook sees it."""
    m = net()
    e = polyak.EMA(m, decay=0.5)
    before = shadows(e)
    m[1].bias = nn.Parameter(torch.full((8,), 4.0))
    e.update()
    assert_half_way(e.average("1.bias"), before["1.bias"], 4.0)


def test_unrelated_registration_renews_the_watch_without_replanning():
    m = net()
    e = polyak.EMA(m, decay=0.5)
    engine = e._engine
    m.head = nn.Linear(8, 2)  # untracked (the tracked names are fixed), but registered on m
    assert e._watch.stale()
    e.update()
    assert e._engine is engine and not e._watch.stale()  # no re-plan, and the flag cleared
    assert "head.weight" not in e.names()


def test_swapped_puts_the_averages_into_the_new_tensors():
    m = net()
    e = polyak.EMA(m, decay=0.5)
    m.load_state_dict({k: torch.ones_like(v) for k, v in m.state_dict().items()}, assign=True)
    e.update()
    new = m[0].weight
    with e.swapped():
        assert torch.equal(m[0].weight, e.average("0.weight"))
    assert m[0].weight is new and torch.equal(new, torch.ones_like(new))


@pytest.mark.parametrize("kernel", ["reference", "foreach", "fused"])
def test_half_model_is_followed_with_fp32_shadows(kernel):
    m = net()
    e = polyak.EMA(m, decay=0.5, kernel=kernel)
    before = shadows(e)
    m.half()  # parameters change dtype in place; buffers become new objects
    with torch.no_grad():
        m[0].weight.fill_(0.1)  # 0.1 in fp16 is 0.0999755859375
    e.update()
    assert e.average("0.weight").dtype == torch.float32
    assert_half_way(e.average("0.weight"), before["0.weight"], 0.0999755859375)
    assert_half_way(e.average("1.running_var"), before["1.running_var"], 1.0)  # var 1, new buffer


@pytest.mark.parametrize("kernel", ["reference", "foreach"])
def test_whole_model_conversion_without_buffers_is_followed(kernel):
    """No buffer is replaced here: only the per-group dtype check can see ``model.half()``."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    e = polyak.EMA(m, decay=0.5, kernel=kernel)
    before = shadows(e)
    m.half()
    with torch.no_grad():
        m[1].weight.fill_(0.1)
    e.update()  # no error, and the fp32 shadows average the fp16 values
    assert_half_way(e.average("1.weight"), before["1.weight"], 0.0999755859375)
    assert_half_way(e.average("0.weight"), before["0.weight"], m[0].weight.float())


def test_double_model_gets_float64_shadows_by_the_dtype_policy():
    m = net()
    e = polyak.EMA(m, decay=0.5)
    held = e.average("0.weight")
    m.double()
    with torch.no_grad():
        m[0].weight.fill_(1 / 3)
    e.update()
    assert e.average("0.weight") is held and held.dtype == torch.float64  # same object, re-cast
    # the fp32 start, cast exactly, then a float64 update: the float64 formula to its last bits
    expected = 0.5 * net()[0].weight.detach().double() + 0.5 * (1 / 3)
    torch.testing.assert_close(held, expected, rtol=1e-15, atol=1e-16)


def test_partial_conversion_is_reported_then_followed():
    """``model[1].half()`` alone changes tensors the cheap check does not look at: the kernel's
    dtype check fails, the EMA names what changed, and the next update follows."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    e = polyak.EMA(m, decay=0.5)
    m[1].half()
    with pytest.raises(RuntimeError, match=r"1\.weight changed dtype from float32 to float16"):
        e.update()
    before = shadows(e)
    e.update()  # follows now
    assert_half_way(e.average("1.weight"), before["1.weight"], m[1].weight.float())


@pytest.mark.parametrize("move", ["meta", "to_empty"])
def test_moved_model_raises_naming_the_tensor_and_the_fix(move):
    m = net()
    e = polyak.EMA(m, decay=0.5)
    before = shadows(e)
    if move == "meta":
        m.to("meta")
    else:
        m.to_empty(device="meta")
    with pytest.raises(
        RuntimeError, match=r"0\.weight .*moved from cpu to meta[\s\S]*ema\.to\('meta'\)"
    ):
        e.update()
    for name, value in before.items():  # nothing was changed
        assert torch.equal(e.average(name), value)
    e.to("meta")
    e.update()  # follows after the documented fix
    assert e.average("0.weight").is_meta


def test_to_empty_on_the_same_device_is_followed():
    """``to_empty`` keeps parameters (new storage, same objects) and makes new buffers; a
    following in-place load is then averaged."""
    m = net()
    e = polyak.EMA(m, decay=0.5)
    before = shadows(e)
    m.to_empty(device="cpu")
    m.load_state_dict({k: torch.full_like(v, 2) for k, v in m.state_dict().items()})
    e.update()
    assert_half_way(e.average("1.running_mean"), before["1.running_mean"], 2.0)
    assert_half_way(e.average("0.weight"), before["0.weight"], 2.0)


def test_changed_shape_or_removed_tensor_raises_before_changing_anything():
    m = net()
    e = polyak.EMA(m, decay=0.5)
    before = shadows(e)
    m[0] = nn.Linear(4, 3)
    with pytest.raises(RuntimeError, match=r"0\.weight .*changed shape from \(8, 4\) to \(3, 4\)"):
        e.update()
    with pytest.raises(RuntimeError, match=r"Nothing was changed.*build a new EMA on it"):
        e.update()
    m[0] = nn.Linear(4, 8, bias=False)
    with pytest.raises(RuntimeError, match=r"0\.bias is no longer in the model"):
        e.update()
    for name, value in before.items():
        assert torch.equal(e.average(name), value)


def test_pairs_follow_dtype_changes_of_their_tensors():
    w = torch.zeros(3)
    e = polyak.EMA([("w", w)], decay=0.5)
    w.data = torch.full((3,), 2.0, dtype=torch.float64)
    e.update()
    assert e.average("w").dtype == torch.float64
    assert torch.equal(e.average("w"), torch.ones(3, dtype=torch.float64))  # 0 + 0.5 * 2, exact


def test_watch_costs_no_replanning_when_nothing_changed():
    m = net()
    e = polyak.EMA(m, decay=0.5)
    engine = e._engine
    for _ in range(3):
        m(torch.randn(4, 4))
        e.update()
    assert e._engine is engine  # not re-planned
    watch = Watch(m, dict(m.named_parameters()))
    assert not watch.stale()
    nn.Module()  # building unrelated modules registers nothing on this model
    other = nn.Sequential(nn.Linear(2, 2))
    other[0] = nn.Linear(2, 2)
    assert not watch.stale()
    m[1] = nn.Identity()
    assert watch.stale()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU machine)")
def test_model_moved_to_cuda_in_place_is_named_and_followed_after_ema_to():
    """``model.cuda()`` keeps the parameter objects and changes their device in place: only the
    per-group device check can see it in a model without buffers."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    e = polyak.EMA(m, decay=0.5)
    before = shadows(e)
    m.cuda()
    with pytest.raises(
        RuntimeError, match=r"0\.weight moved from cpu to cuda:0[\s\S]*ema\.to\('cuda:0'\)"
    ):
        e.update()
    e.to("cuda")
    e.update()
    assert_half_way(e.average("0.weight").cpu(), before["0.weight"], m[0].weight.cpu())


# ------------------------------------------------------------------ the functions the EMA calls


def watched(model: nn.Module) -> tuple[Watch, dict[str, torch.Tensor], dict[str, torch.Size]]:
    live = dict(model.named_parameters())
    return Watch(model, live), live, {n: t.shape for n, t in live.items()}


def test_followable_gives_the_replaced_tensors_and_nothing_else():
    m = net()
    watch, live, shapes = watched(m)
    assert _tracking.followable(watch, m, live, shapes) == {}
    new = nn.Parameter(torch.zeros(8, 4))
    m[0].weight = new
    changes = _tracking.followable(watch, m, live, shapes)
    assert list(changes) == ["0.weight"]
    assert changes["0.weight"][0] is new
    assert changes["0.weight"][1] == "was replaced by another tensor object"


def test_followable_checks_the_shape_of_the_average_not_of_the_old_tensor():
    m = net()
    watch, live, shapes = watched(m)
    m[0].weight = nn.Parameter(torch.zeros(8, 4))
    with pytest.raises(RuntimeError, match=r"0\.weight was replaced[\s\S]*build a new EMA"):
        _tracking.followable(watch, m, live, {**shapes, "0.weight": torch.Size([4, 8])})


def test_followable_accepts_the_device_being_moved_to_and_refuses_others():
    m = net()
    watch, live, shapes = watched(m)
    m.to("meta")
    fix = r"move the EMA too: ema\.to\('meta'\)\."
    with pytest.raises(RuntimeError, match=r"(?s)0\.weight .*moved from cpu to meta.*" + fix):
        _tracking.followable(watch, m, live, shapes)
    with pytest.raises(RuntimeError, match=fix):
        _tracking.followable(watch, m, live, shapes, torch.device("cpu"))
    changes = _tracking.followable(watch, m, live, shapes, torch.device("meta"))
    assert set(changes) == set(live)


def test_followable_lists_ten_problems_and_counts_the_rest_with_both_fixes():
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])  # 12 parameters
    watch, live, shapes = watched(m)
    for i in range(5):
        m[i] = nn.Linear(3, 3)  # 10 reshaped
    m[5].to("meta")  # 2 moved
    with pytest.raises(RuntimeError) as info:
        _tracking.followable(watch, m, live, shapes)
    text = str(info.value)
    assert text.count("changed shape") == 10 and "moved from cpu to meta" not in text
    assert "... and 2 more" in text
    assert text.endswith(
        "To fix: after moving the model, move the EMA too: ema.to('meta'); after changing the "
        "model's architecture, build a new EMA on it (a checkpoint of the old one loads into a "
        "model of the old architecture)."
    )


def test_failed_update_names_what_changed_and_marks_the_watch_dirty():
    m = net()
    watch, live, _ = watched(m)
    m[1].half()  # not a tracked parameter's group first: the cheap check does not see it
    assert not watch.stale()
    explained = _tracking.failed_update(RuntimeError("kernel said no"), watch, m, live)
    assert explained is not None and watch.dirty
    assert "1.weight changed dtype from float32 to float16" in str(explained)
    assert "Some shadows may already hold this update" in str(explained)


def test_failed_update_adds_the_device_fix_or_leaves_the_error_alone():
    m = net()
    watch, live, _ = watched(m)
    explained = _tracking.failed_update(RuntimeError("tensors on another device"), watch, m, live)
    assert explained is not None and str(explained).startswith("tensors on another device\n")
    assert "call ema.to(device) after moving the model" in str(explained)
    assert _tracking.failed_update(RuntimeError("out of memory"), watch, m, live) is None
    assert not watch.dirty


def test_matched_finds_the_names_in_another_model_in_the_given_order():
    m, other = net(), net()
    shapes = {"1.running_mean": torch.Size([8]), "0.weight": torch.Size([8, 4])}
    found = _tracking.matched(other, shapes)
    assert list(found) == ["1.running_mean", "0.weight"]
    assert found["0.weight"] is other[0].weight and found["1.running_mean"] is other[1].running_mean
    assert found["0.weight"] is not m[0].weight


def test_matched_reports_missing_names_and_shapes_at_once():
    shapes = {"0.weight": torch.Size([8, 3]), "2.bias": torch.Size([1]), "0.bias": torch.Size([8])}
    with pytest.raises(ValueError) as info:
        _tracking.matched(net(), shapes)
    assert str(info.value) == (
        "this EMA was built on another model: missing names ['2.bias']; shape mismatches "
        "['0.weight: model (8, 4) vs average (8, 3)']; pass the model the EMA tracks, or one "
        "with the same architecture."
    )


def test_matched_refuses_a_missing_name_alone():
    with pytest.raises(ValueError, match=r"missing names \['2\.weight'\]; pass the model"):
        _tracking.matched(net(), {"0.weight": torch.Size([8, 4]), "2.weight": torch.Size([1])})


# ---------------------------------- what only the per-update identity check sees (no hook fires)


def test_deleted_parameter_is_seen_at_the_next_update():
    """``del module.weight`` reports to no hook: the per-update identity check sees it."""
    m = net()
    e = polyak.EMA(m, decay=0.5)
    e.update()
    before = shadows(e)
    del m[1].bias
    with pytest.raises(RuntimeError, match=r"1\.bias is no longer in the model"):
        e.update()
    for name, value in before.items():
        assert torch.equal(e.average(name), value)


def test_buffer_assigned_anew_is_followed_at_the_next_update():
    m = net()
    e = polyak.EMA(m, decay=0.5)
    e.update()
    before = shadows(e)
    m[1].running_mean = torch.full((8,), 6.0)  # a new buffer object in _buffers
    e.update()
    assert_half_way(e.average("1.running_mean"), before["1.running_mean"], 6.0)


def test_parameters_made_anew_by_apply_are_followed_at_the_next_update():
    """With the overwrite flag, ``_apply`` writes new parameter objects into ``_parameters``
    directly (no hook; the old objects keep their dtype): the identity check sees them."""
    m = nn.Linear(4, 8)  # no buffers: nothing else would show it
    e = polyak.EMA(m, decay=0.5)
    e.update()
    before = shadows(e)
    old = m.weight
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        m.double()
        assert m.weight is not old and old.dtype == torch.float32
        with torch.no_grad():
            m.weight.fill_(2.0)
        e.update()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert e.average("weight").dtype == torch.float64  # followed, re-cast by the dtype policy
    assert_half_way(e.average("weight"), before["weight"], 2.0)


def test_direct_dict_write_is_followed_at_the_next_update_and_at_every_read():
    """A parameter written into ``_parameters`` directly (as FSDP2's ``fully_shard`` does) reports
    to no hook; the identity check follows it before a read and at the next update."""
    m = net()
    e = polyak.EMA(m, decay=0.5)
    e.update()
    new = nn.Parameter(torch.full((8,), 4.0))
    m[1]._parameters["bias"] = new
    before = shadows(e)
    e.copy_to()  # writes the averages into the new tensor, not the old one
    assert torch.equal(new.detach(), before["1.bias"])
    m[1]._parameters["bias"] = newer = nn.Parameter(torch.full((8,), 4.0))
    e.update()
    assert_half_way(e.average("1.bias"), before["1.bias"], 4.0)
    assert newer is m[1].bias


# ------------------------- the per-dict check: ``owner == snapshot`` only where it is exact


def test_whole_dict_check_covers_plain_many_element_dicts_and_the_rest_goes_entry_by_entry():
    """Linear's and BatchNorm's ``_parameters`` are compared whole; BatchNorm's ``_buffers``
    holds the one-element ``num_batches_tracked``, so its entries are checked one by one."""
    m = net()
    m.append(nn.Linear(8, 2, bias=False))  # {"weight": ..., "bias": None}: compared whole
    watch = Watch(m, dict(m.named_parameters()) | dict(m.named_buffers()))
    assert {id(d) for d in watch._dicts} == {id(m[i]._parameters) for i in (0, 1, 2)}
    assert all(
        snap == d and snap is not d for snap, d in zip(watch._snapshots, watch._dicts, strict=True)
    )
    assert watch._keys == ["running_mean", "running_var", "num_batches_tracked"]
    assert all(owner is m[1]._buffers for owner in watch._owners)
    assert not watch.stale()


@pytest.mark.parametrize("kind", ["parameter", "buffer"])
@pytest.mark.parametrize("shape", [(), (1,), (3,)])
def test_replacement_equal_in_value_is_seen_before_a_read(kind, shape):
    """A tensor replaced by an equal clone is another object: ``copy_to`` writes the average into
    the new one. A one-element ``new == old`` would read as equal, so such a dict is checked by
    identity; a many-element one raises in ``bool()``, which reads as changed."""
    m = nn.Module()
    if kind == "parameter":
        m.a = nn.Parameter(torch.full(shape, 2.0))
        m.b = nn.Parameter(torch.ones(4))
        owner = m._parameters
    else:
        m.register_buffer("a", torch.full(shape, 2.0))
        m.register_buffer("b", torch.ones(4))
        owner = m._buffers
    e = polyak.EMA(m, decay=0.5, buffers="average")
    with torch.no_grad():
        owner["a"].fill_(4.0)
    e.update()  # the average of a: 3
    owner["a"] = new = owner["a"].clone()  # equal in value: 4
    if kind == "parameter":
        owner["a"] = new = nn.Parameter(new)
    e.copy_to()
    assert new is m.a
    assert torch.equal(new.detach(), torch.full(shape, 3.0))


class _AlwaysEqual(torch.Tensor):
    """A tensor subclass whose ``==`` is not elementwise (as DTensor's or a user's may not be)."""

    def __eq__(self, other):  # type: ignore[override]
        return True

    __hash__ = torch.Tensor.__hash__


def test_tensor_subclass_dicts_are_checked_by_identity():
    m = nn.Module()
    m.register_buffer("a", torch.full((3,), 2.0).as_subclass(_AlwaysEqual))
    e = polyak.EMA(m, decay=0.5, buffers="average")
    m._buffers["a"] = new = torch.full((3,), 4.0).as_subclass(_AlwaysEqual)
    e.update()
    assert_half_way(e.average("a").as_subclass(torch.Tensor), torch.full((3,), 2.0), 4.0)
    assert new is m.a


def test_untracked_change_in_a_compared_dict_renews_the_watch_without_replanning():
    m = nn.Module()
    m.a = nn.Parameter(torch.full((3,), 2.0))
    m.b = nn.Parameter(torch.ones(4))
    e = polyak.EMA(m, decay=0.5, include=lambda name, tensor: name == "a")
    engine = e._engine
    m._parameters["b"] = nn.Parameter(torch.zeros(4))  # untracked, in the dict compared whole
    assert e._watch.stale()
    with torch.no_grad():
        m.a.fill_(4.0)
    e.update()
    assert e._engine is engine and not e._watch.stale()  # renewed, not re-planned
    assert_half_way(e.average("a"), torch.full((3,), 2.0), 4.0)
