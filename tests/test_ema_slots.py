"""One EMA, several averages of the same weights (slots): the (slot, name) store behind polyak.EMA.

Each slot of ``averagers.Exponentials`` must be, bit for bit, the EMA that a separate
``polyak.EMA`` with that decay keeps (the reference: one average per object, as every peer does
it), while the weights are read once per update for all slots.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import polyak
from polyak import _state, averagers, schedules
from polyak.averagers import HOST, Exponential, Exponentials, Rule, Uniform
from polyak.ema import LoadedSettingsWarning


def net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)


def train(model: nn.Module, emas: list[polyak.EMA], steps: int, seed: int = 1) -> None:
    """SGD on a random regression, every EMA updated after each step (BatchNorm in train mode)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen).to(dtype)
        loss = model(x).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for ema in emas:
            ema.update()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)
    )


DECAYS = {
    "constant": (0.9, 0.5),
    "schedules": (schedules.tf_warmup(0.99), schedules.power(sigma_rel=0.10)),
}


@pytest.mark.parametrize("kernel", ["reference", "foreach"])
@pytest.mark.parametrize("decays", list(DECAYS), ids=list(DECAYS))
@pytest.mark.parametrize("update_every", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_slot_is_the_ema_of_its_decay_bit_for_bit(kernel, decays, update_every, dtype):
    model = net(dtype=dtype)
    decay = DECAYS[decays]
    both = polyak.EMA(
        model, rule=Exponentials(decay, names=("a", "b")), update_every=update_every, kernel=kernel
    )
    alone = [polyak.EMA(model, d, update_every=update_every, kernel=kernel) for d in decay]
    train(model, [both, *alone], steps=10)
    assert both.slots == ("a", "b") and both.step == 10 and both.num_averages == 10 // update_every
    for name in both.names():
        for slot, single in zip(("a", "b"), alone, strict=True):
            assert same_bits(both.average(name, slot=slot), single.average(name)), (name, slot)
    # the slots differ where they should (a test of equality that cannot pass by accident)
    assert not torch.equal(both.average("0.weight", slot="a"), both.average("0.weight", slot="b"))
    # the integer buffer is copied once, shared by both slots
    counted = both.average("1.num_batches_tracked", slot="b")
    assert counted is both.average("1.num_batches_tracked", slot="a")
    assert int(counted) == (10 // update_every) * update_every  # copied at averaging updates


def test_capturable_slots_equal_the_host_slots():
    """The device weights (DeviceOps) of every slot give the host path's shadows."""
    model = net()
    rule = Exponentials((schedules.tf_warmup(0.9), 0.5))
    host = polyak.EMA(model, rule=rule, update_every=2, kernel="foreach")
    device = polyak.EMA(
        model, rule=Exponentials((schedules.tf_warmup(0.9), 0.5)), update_every=2,
        kernel="foreach", capturable=True,
    )  # fmt: skip
    train(model, [host, device], steps=7)
    assert device.step == 7 and device.num_averages == 3
    for name in host._averaged:  # (copied tensors are copied at every capturable call)
        for slot in host.slots:
            torch.testing.assert_close(
                device.average(name, slot=slot), host.average(name, slot=slot), rtol=0, atol=1e-7
            )


def test_offloaded_slots_equal_inline_slots():
    model = net()
    inline = polyak.EMA(model, rule=Exponentials((0.9, 0.5)), kernel="foreach")
    offloaded = polyak.EMA(model, rule=Exponentials((0.9, 0.5)), kernel="foreach", offload="cpu")
    train(model, [inline, offloaded], steps=5)
    for name in inline.names():
        for slot in inline.slots:
            assert same_bits(offloaded.average(name, slot=slot), inline.average(name, slot=slot))


def test_fused_reads_each_weight_once_for_two_slots():
    """Through polyak.EMA: the planned 2-slot update is one compiled kernel that loads the weight
    once and stores both slots (the generated code is read; see tests/test_fused.py)."""
    from test_fused import generated_reads

    model = nn.Linear(64, 64, bias=False).half()  # fp16 weight, fp32 shadows: found by dtype
    ema = polyak.EMA(model, rule=Exponentials((0.9, 0.5)), kernel="fused")
    update = ema._engine.avg
    with torch.no_grad():  # as ema.update() runs it
        loads, stores = generated_reads(update, [0.1, 0.5])
        one = polyak.EMA(model, 0.9, kernel="fused")._engine.avg
        one_loads, one_stores = generated_reads(one, [0.1])
    assert loads == one_loads == [1]  # one kernel, one load of the weight in it
    assert stores == [2 * one_stores[0]]  # that kernel writes both slots


def test_the_foreach_slots_read_each_weight_back_to_back():
    """With foreach, every read of one weight (piece) in an update is in one op or in consecutive
    ops: one lerp of its stacked rows (small CPU tensors: the store lays a weight's shadows out as
    rows of one tensor) or one lerp per slot of the same chunk, so the second reads it from cache."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 1 << 19))  # tiny ones, and a cut one
    ema = polyak.EMA(model, rule=Exponentials((0.9, 0.5)), kernel="foreach")
    calls: list[set[tuple[int, int]]] = []
    rows_lerps = []

    class Lerps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "lerp" in str(func):
                calls.append(
                    {(t.untyped_storage().data_ptr(), t.storage_offset()) for t in args[1]}
                )
                rows_lerps.append(all(t.dim() >= 1 and t.shape[0] == 2 for t in args[0]))
            return func(*args, **(kwargs or {}))

    with Lerps():
        ema.update()
    seen: dict[tuple[int, int], list[int]] = {}
    for index, pieces in enumerate(calls):
        for piece in pieces:
            seen.setdefault(piece, []).append(index)
    assert seen and any(rows_lerps) and not all(rows_lerps)
    for piece, indices in seen.items():
        assert indices == list(range(indices[0], indices[0] + len(indices))), piece
        assert len(indices) in (1, 2)


# ------------------------------------------------------------------ reading a slot


def test_average_swapped_copy_to_and_exports_read_the_slot_asked_for():
    model = net()
    ema = polyak.EMA(model, rule=Exponentials((0.9, 0.5), names=("slow", "fast")))
    train(model, [ema], steps=6)
    model.eval()
    trained = copy.deepcopy(model.state_dict())
    for slot in (None, "slow", "fast"):
        want = {n: ema.average(n, slot=slot or "slow") for n in ema.names()}
        assert ema.average("0.weight", slot=slot) is want["0.weight"]  # the shadow itself
        with ema.swapped(slot=slot):
            for name, tensor in model.state_dict().items():
                if name in want:
                    assert torch.equal(tensor, want[name]), (slot, name)
        for name, tensor in model.state_dict().items():  # back, bit for bit
            assert same_bits(tensor, trained[name])
        exported = ema.export_state_dict(slot=slot)
        clone = ema.averaged_module(slot=slot)
        for name in want:
            assert torch.equal(exported[name], want[name]) and torch.equal(
                clone.state_dict()[name], want[name]
            )
    ema.use_averages(slot="fast")
    assert torch.equal(model[0].weight, ema.average("0.weight", slot="fast"))
    ema.use_trained()
    ema.store()
    ema.copy_to(slot="fast")
    assert torch.equal(model[3].bias, ema.average("3.bias", slot="fast"))
    ema.restore()
    assert same_bits(model[3].bias, trained["3.bias"])


def test_save_writes_the_slot_asked_for(tmp_path):
    model = net()
    ema = polyak.EMA(model, rule=Exponentials((0.9, 0.5), names=("slow", "fast")))
    train(model, [ema], steps=3)
    ema.save(tmp_path / "fast.safetensors", slot="fast")
    saved = load_file(tmp_path / "fast.safetensors")
    assert torch.equal(saved["0.weight"], ema.average("0.weight", slot="fast"))
    assert not torch.equal(saved["0.weight"], ema.average("0.weight", slot="slow"))


def test_an_unknown_slot_is_refused_by_name():
    ema = polyak.EMA(net(), rule=Exponentials((0.9, 0.5), names=("slow", "fast")))
    for call in (
        lambda: ema.average("0.weight", slot="medium"),
        lambda: ema.swapped(slot="medium").__enter__(),
        lambda: ema.copy_to(slot="medium"),
        lambda: ema.export_state_dict(slot="medium"),
        lambda: ema.averaged_module(slot="medium"),
        lambda: ema.use_averages(slot="medium"),
    ):
        with pytest.raises(
            ValueError, match=r"slot='medium' is not an average .*\['slow', 'fast'\]"
        ):
            call()
    assert ema.average("no.such", slot="fast") is None
    with pytest.raises(ValueError, match=r"slot='ema0'"):
        polyak.EMA(net(), 0.9).average("0.weight", slot="ema0")


@dataclasses.dataclass(frozen=True)
class Mean(Rule):
    """Two slots, read as their mean: a stand-in for rules that read a formula (LAWA, BEMA)."""

    slots: ClassVar[tuple[str, ...]] = ("fast", "slow")

    def weights(self, first: Any, last: Any, ops: Any = HOST) -> tuple[Any, Any]:
        return (0.5, 0.25)

    def read(self, averages, current):
        return (averages[0] + averages[1]) / 2


def test_the_rules_read_is_what_enters_the_model():
    model = net()
    ema = polyak.EMA(model, rule=Mean())
    train(model, [ema], steps=4)
    model.eval()
    trained = copy.deepcopy(model.state_dict())
    mean = {
        n: (ema.average(n, slot="fast") + ema.average(n, slot="slow")) / 2
        for n in ema.names()
        if n != "1.num_batches_tracked"
    }
    assert torch.equal(ema.average("0.weight"), mean["0.weight"])
    with ema.swapped():
        for name, want in mean.items():
            assert torch.equal(model.state_dict()[name], want), name
    for name, tensor in model.state_dict().items():
        assert same_bits(tensor, trained[name])
    assert torch.equal(ema.export_state_dict()["3.weight"], mean["3.weight"])


# ------------------------------------------------------------------ state, moves, copies


def test_the_state_dict_holds_every_slot_and_resumes_exactly():
    model = net()
    rule = Exponentials((schedules.tf_warmup(0.9), 0.5), names=("warm", "fast"))
    ema = polyak.EMA(model, rule=rule)
    train(model, [ema], steps=4)
    state = ema.state_dict()
    assert list(state["shadows"]) == ["warm", "fast"]
    assert state["rule"] == {
        "type": "Exponentials",
        "settings": {
            "decays": [{"name": "tf_warmup", "decay": 0.9}, {"name": "constant", "decay": 0.5}],
            "names": ["warm", "fast"],
        },
        "state": {},
        "slots": ["warm", "fast"],
    }
    fresh = polyak.EMA(
        model, rule=Exponentials((schedules.tf_warmup(0.9), 0.5), names=("warm", "fast"))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoadedSettingsWarning)
        fresh.load_state_dict(state)
    train(model, [ema, fresh], steps=3, seed=5)
    for name in ema.names():
        for slot in ema.slots:
            assert same_bits(fresh.average(name, slot=slot), ema.average(name, slot=slot))


def test_a_checkpoints_decays_replace_ours_with_a_warning():
    model = net()
    saved = polyak.EMA(model, rule=Exponentials((0.9, 0.5)))
    ours = polyak.EMA(model, rule=Exponentials((0.9, 0.7)))
    with pytest.warns(LoadedSettingsWarning, match=r"Exponentials.decays .*0\.5.* replaces"):
        ours.load_state_dict(saved.state_dict())
    assert ours.rule == Exponentials((0.9, 0.5))
    kept = polyak.EMA(model, rule=Exponentials((0.9, 0.7)))
    kept.load_state_dict(saved.state_dict(), settings="current")
    assert kept.rule == Exponentials((0.9, 0.7))


def test_a_state_of_other_slots_is_refused_before_anything_changes():
    model = net()
    two = polyak.EMA(model, rule=Exponentials((0.9, 0.5)))
    three = polyak.EMA(model, rule=Exponentials((0.9, 0.5, 0.1)))
    before = {n: three.average(n, slot="ema0").clone() for n in three.names()}
    with pytest.raises(ValueError, match=r"rule slots: \['ema0', 'ema1'\] in state vs") as info:
        three.load_state_dict(two.state_dict())
    assert "nothing was changed" in str(info.value)
    assert all(torch.equal(three.average(n, slot="ema0"), t) for n, t in before.items())
    with pytest.raises(ValueError, match=r"rule: 'Exponentials' in state vs 'Exponential' here"):
        polyak.EMA(model).load_state_dict(two.state_dict())


def test_to_and_a_changed_dtype_move_and_recast_every_slot():
    model = net()
    ema = polyak.EMA(model, rule=Exponentials((0.9, 0.5)))
    held = {s: ema.average("0.weight", slot=s) for s in ema.slots}
    model.double()
    ema.update()  # follows the new dtype: both slots re-cast, objects kept
    for slot, shadow in held.items():
        assert ema.average("0.weight", slot=slot) is shadow and shadow.dtype == torch.float64
    model.to("meta")
    ema.to("meta")
    assert {ema.average(n, slot=s).device.type for n in ema.names() for s in ema.slots} == {"meta"}


def test_a_deep_copy_keeps_every_slot_apart():
    model = net()
    ema = polyak.EMA(model, rule=Exponentials((0.9, 0.5)))
    model.ema = ema
    train(model, [ema], steps=2)
    clone_model = copy.deepcopy(model)
    clone = clone_model.ema
    for name in ema.names():
        for slot in ema.slots:
            a, b = ema.average(name, slot=slot), clone.average(name, slot=slot)
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    train(clone_model, [clone], steps=1)
    assert not torch.equal(
        clone.average("0.weight", slot="ema1"), ema.average("0.weight", slot="ema1")
    )


def test_repr_lists_the_slots():
    ema = polyak.EMA(net(), rule=Exponentials((0.9, 0.5), names=("slow", "fast")))
    assert "slots=['slow', 'fast']" in repr(ema)
    assert "slots=" not in repr(polyak.EMA(net()))


# ------------------------------------------------------------------ the rule


def test_exponentials_weights_are_each_exponentials():
    decays = (schedules.tf_warmup(0.99), 0.5, schedules.power(gamma=3.0))
    rule = Exponentials(decays)
    for first, last in [(1, 1), (4, 6), (10, 13)]:
        want = tuple(Exponential(d).weights(first, last)[0] for d in decays)
        assert rule.weights(first, last) == want
    assert rule.slots == ("ema0", "ema1", "ema2") and isinstance(rule, Rule)
    assert _state.encode_rule(rule)["slots"] == ["ema0", "ema1", "ema2"]


def test_exponentials_device_weights_equal_the_host_weights():
    rule = Exponentials((schedules.tf_warmup(0.99), 0.5))
    covered = torch.arange(2, -1, -1)
    last = torch.tensor(9)
    device = rule.weights(last - 2, last, averagers.DeviceOps(covered))
    host = rule.weights(7, 9)
    assert [float(w) for w in device] == list(host)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"decays": 0.9}, TypeError, r"decays must be a sequence of decays .*got 0.9"),
        ({"decays": ()}, ValueError, r"at least one decay"),
        ({"decays": (0.9, 1.5)}, ValueError, r"decay must be in \[0, 1\], got decay=1.5"),
        ({"decays": (0.9, 0.5), "names": ("a",)}, ValueError, r"names must be 2 distinct"),
        ({"decays": (0.9, 0.5), "names": ("a", "a")}, ValueError, r"names must be 2 distinct"),
    ],
)
def test_exponentials_refuses_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        Exponentials(**kwargs)


def test_a_one_slot_rule_reads_its_only_slot():
    ema = polyak.EMA(net(), rule=Uniform())
    assert ema.slots == ("uniform",)
    assert ema.average("0.weight") is ema.average("0.weight", slot="uniform")
