"""Model drift: random sequences of changes to the model, interleaved with updates, swaps and saves,
never give a silently wrong average. Each step either does what the README ("Follows the model")
and polyak._tracking document, or raises; a refused step changes no average.

The reference is a float64 transcription of what is documented, kept beside the EMA by name:

- an update averages, for every tracked name, what the model holds under that name now (a
  replaced layer, an ``assign=True`` load, ``.half()``: followed; integer buffers copied); it
  raises :class:`polyak.errors.ModelChangedError` if a tracked name is gone, reshaped or on another
  device (``.to("meta")``), and then changes nothing;
- a partial in-place dtype change that the cheap check does not see (``model[2].half()``) makes one
  update raise, saying "Some shadows may already hold this update": each average is then the one
  before or the one after that update (checked name by name), and the next update follows;
- a tensor written over by an equal clone straight into its module's dict is followed like a
  replaced one;
- parameters added after construction are not tracked (exports take them from the model);
- ``swapped()`` puts the averages in (cast to the model's dtypes) and gives every tensor back bit
  for bit; ``save()`` writes the averages under the model's keys; both refuse a model the EMA cannot
  follow, before anything changes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import polyak
from polyak import errors

DECAY = 0.5
OPS = [
    "update",
    "update",
    "update",
    "swap",
    "save",
    "state_dict",
    "replace_layer",
    "replace_layer_reshaped",
    "assign_load",
    "half",
    "float",
    "partial_half",
    "to_meta",
    "back_from_meta",
    "add_param",
    "remove_param",
    "restore_param",
    "clone_into_dict",
    "clone_scale_into_dict",
]


class Scale(nn.Module):
    """A one-element parameter: where a replaced tensor's ``==`` with the old one can read true."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(1))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), Scale())


class Drift:
    """The model, its EMA, and the reference averages (float64, by name)."""

    def __init__(self, tmp_path) -> None:
        self.tmp = tmp_path
        self.model = net()
        self.ema = polyak.EMA(self.model, decay=DECAY)
        self.names = self.ema.names()
        self.ref = {n: t.detach().double().clone() for n, t in self._held().items()}
        self.seed = 1

    def _held(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict(keep_vars=True))

    def _rand(self, shape, dtype=torch.float32) -> torch.Tensor:
        self.seed += 1
        return torch.randn(shape, generator=torch.Generator().manual_seed(self.seed)).to(dtype)

    def followable(self) -> bool:
        held = self._held()
        return all(
            n in held and held[n].shape == self.ref[n].shape and held[n].device.type == "cpu"
            for n in self.names
        )

    def check(self, tol: float = 1e-5) -> None:
        for n in self.names:
            got = self.ema.average(n)
            assert got.device.type == "cpu"
            if got.is_floating_point():
                torch.testing.assert_close(got.double(), self.ref[n], rtol=tol, atol=tol)
            else:
                assert torch.equal(got, self.ref[n].to(got.dtype)), n

    # ------------------------------------------------------------------ the operations

    def update(self) -> None:
        with torch.no_grad():  # the weights move, as training moves them
            for t in self._held().values():
                if t.is_floating_point() and t.device.type == "cpu":
                    t.add_(self._rand(t.shape, t.dtype) * 0.1)
        expected = self._expected()
        if not self.followable():
            with pytest.raises(errors.ModelChangedError, match="Nothing was changed"):
                self.ema.update()
            return
        try:
            self.ema.update()
        except errors.ModelChangedError as error:  # the documented partial case
            assert "Some shadows may already hold this update" in str(error)
            for n in self.names:  # each average: before or after, never something else
                got = self.ema.average(n).double()
                before = torch.allclose(got, self.ref[n], rtol=1e-5, atol=1e-5)
                after = torch.allclose(got, expected[n], rtol=1e-5, atol=1e-5)
                assert before or after, n
                self.ref[n] = got.clone()
            return
        self.ref = expected

    def _expected(self) -> dict[str, torch.Tensor]:
        held = self._held()
        out = {}
        for n in self.names:
            if n not in held or held[n].shape != self.ref[n].shape or held[n].device.type != "cpu":
                out[n] = self.ref[n]
            elif held[n].is_floating_point():
                out[n] = DECAY * self.ref[n] + (1 - DECAY) * held[n].detach().double()
            else:
                out[n] = held[n].detach().double().clone()
        return out

    def swap(self) -> None:
        before = {k: (v, v.detach().clone()) for k, v in self._held().items()}
        if not self.followable():
            with pytest.raises(errors.ModelChangedError), self.ema.swapped():
                pass
        else:
            with self.ema.swapped():
                held = self._held()
                for n in self.names:
                    want = self.ref[n].to(held[n].dtype)
                    tol = 1e-2 if held[n].dtype == torch.float16 else 1e-5
                    torch.testing.assert_close(held[n].detach(), want, rtol=tol, atol=tol)
        after = self._held()
        assert after.keys() == before.keys()
        for k, (obj, value) in before.items():  # the same objects, the same bits
            assert after[k] is obj, k
            assert obj.device.type == "meta" or torch.equal(obj.detach(), value), k

    def save(self) -> None:
        path = self.tmp / "avg.safetensors"
        if not self.followable():
            with pytest.raises(errors.ModelChangedError):
                self.ema.save(path)
            return
        from safetensors.torch import load_file

        self.ema.save(path)
        saved, held = load_file(path), self._held()
        assert set(saved) == set(held)  # the model's keys, added parameters too
        for k, t in held.items():
            if k in self.ref:
                tol = 1e-2 if t.dtype == torch.float16 else 1e-5
                torch.testing.assert_close(
                    saved[k].double(), self.ref[k].to(t.dtype).double(), rtol=tol, atol=tol
                )
            else:
                assert torch.equal(saved[k], t.detach()), k

    def state_dict(self) -> None:
        state = self.ema.state_dict()
        for n in self.names:
            kind = "shadows" if n in state["shadows"]["ema"] else "copies"
            stored = state["shadows"]["ema"][n] if kind == "shadows" else state["copies"][n]
            assert torch.equal(stored, self.ema.average(n))

    def replace_layer(self) -> None:
        layer = nn.Linear(3, 4)
        with torch.no_grad():
            layer.weight.copy_(self._rand((4, 3)))
            layer.bias.copy_(self._rand(4))
        self.model[0] = layer.to(self.model[2].weight.dtype)

    def replace_layer_reshaped(self) -> None:
        self.model[2] = nn.Linear(4, 3)

    def assign_load(self) -> None:
        state = {
            k: (self._rand(v.shape, v.dtype) if v.is_floating_point() else v.detach().clone())
            for k, v in self.model.state_dict().items()
            if v.device.type == "cpu"
        }
        if len(state) == len(self.model.state_dict()):
            self.model.load_state_dict(state, assign=True)

    def half(self) -> None:
        if self.model[0].weight.device.type == "cpu":
            self.model.half()

    def float(self) -> None:
        if self.model[0].weight.device.type == "cpu":
            self.model.float()

    def partial_half(self) -> None:
        if self.model[2].weight.device.type == "cpu":
            self.model[2].half()

    def to_meta(self) -> None:
        self.model.to("meta")

    def back_from_meta(self) -> None:
        if any(t.device.type == "meta" for t in self.model.state_dict().values()):
            self.model.to_empty(device="cpu")
            with torch.no_grad():
                for t in self.model.state_dict().values():
                    t.copy_(self._rand(t.shape, t.dtype) if t.is_floating_point() else 0)

    def add_param(self) -> None:
        self.model[2].extra = nn.Parameter(self._rand(3))

    def remove_param(self) -> None:
        self.model[0].bias = None

    def clone_into_dict(self) -> None:
        """A tensor written over by an equal clone straight into its module's dict, as
        ``_apply``, FSDP2 or user code do: no hook fires, and the values alone cannot tell."""
        entries = [
            (owner, key)
            for module in self.model.modules()
            for owner in (module._parameters, module._buffers)
            for key, value in owner.items()
            if value is not None and value.device.type == "cpu"
        ]
        if not entries:  # all on the meta device
            return
        self.seed += 1
        owner, key = entries[self.seed % len(entries)]
        old = owner[key]
        new = old.detach().clone()
        owner[key] = nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new

    def clone_scale_into_dict(self) -> None:
        """The one-element parameter written over by an equal clone (``new == old`` is true)."""
        owner = self.model[3]._parameters
        if owner["s"].device.type == "cpu":
            owner["s"] = nn.Parameter(owner["s"].detach().clone())

    def restore_param(self) -> None:
        if self.model[0].bias is None:
            dtype, device = self.model[0].weight.dtype, self.model[0].weight.device
            bias = self._rand(4, dtype) if device.type == "cpu" else torch.empty(4, device=device)
            self.model[0].bias = nn.Parameter(bias)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
@given(ops=st.lists(st.sampled_from(OPS), min_size=3, max_size=30))
def test_random_model_changes_never_give_a_silently_wrong_average(tmp_path, ops):
    drift = Drift(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stale BatchNorm statistics: no forward runs here
        for op in ops:
            getattr(drift, op)()
            drift.check()
