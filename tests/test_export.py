"""polyak._export: averages as a model's tensors would be, as a full state dict (tied weights kept
shared), as a standalone module and in a stateless forward, on plain modules without an EMA.

Expected outputs come from the same module with the values loaded by hand (an independent path:
``load_state_dict`` into a copy)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from polyak import _export


class Tied(nn.Module):
    """An embedding and a head sharing one weight, a BatchNorm (float and int buffers), a frozen
    bias."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.norm = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 5)
        self.head.weight = self.embed.weight
        self.head.bias.requires_grad_(False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(idx)))


def model_and_values() -> tuple[Tied, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Tied()
    live = {
        "embed.weight": model.embed.weight,
        "norm.weight": model.norm.weight,
        "norm.running_mean": model.norm.running_mean,
    }
    values = {n: torch.randn(t.shape, dtype=torch.float64) for n, t in live.items()}
    return model, live, values


def test_cast_takes_each_live_tensors_dtype_unless_a_float_dtype_overrides():
    live = {"w": torch.zeros(2, dtype=torch.bfloat16), "n": torch.zeros((), dtype=torch.int64)}
    values = {"w": torch.tensor([1.25, 2.5]), "n": torch.tensor(7)}
    out = _export.cast(values, live)
    assert out["w"].dtype == torch.bfloat16 and out["n"].dtype == torch.int64
    assert torch.equal(out["w"].float(), values["w"])
    out = _export.cast(values, live, torch.float16)
    assert out["w"].dtype == torch.float16 and out["n"].dtype == torch.int64  # ints keep theirs
    same = {"w": torch.zeros(2)}
    assert _export.cast(same, {"w": torch.ones(2)})["w"] is same["w"]  # nothing to do: no copy


def test_full_state_dict_has_the_models_keys_and_keeps_tied_weights_shared():
    model, live, values = model_and_values()
    averaged = _export.cast(values, live)
    out = _export.full_state_dict(model, averaged, live)
    assert list(out) == list(model.state_dict())
    assert out["embed.weight"].data_ptr() == out["head.weight"].data_ptr()  # tied: one storage
    assert torch.equal(out["head.weight"], values["embed.weight"].float())
    assert torch.equal(out["norm.running_mean"], values["norm.running_mean"].float())
    for key in ("head.bias", "norm.bias", "norm.running_var", "norm.num_batches_tracked"):
        assert out[key] is not model.state_dict(keep_vars=True)[key]  # detached
        assert torch.equal(out[key], model.state_dict()[key])  # from the live model
        assert not out[key].requires_grad


def test_full_state_dict_casts_untracked_floats_once_and_keeps_ints():
    model, live, values = model_and_values()
    model.head.weight = nn.Parameter(torch.randn(5, 3))  # untied, untracked
    model.extra = nn.Linear(3, 5, bias=False)
    model.extra.weight = model.head.weight  # tied, untracked
    out = _export.full_state_dict(
        model, _export.cast(values, live, torch.float16), live, torch.float16
    )
    assert (
        out["head.weight"].dtype == torch.float16
        and out["head.weight"].data_ptr() == out["extra.weight"].data_ptr()
    )
    assert out["norm.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(out["head.weight"], model.head.weight.detach().half())
    assert out["embed.weight"].dtype == torch.float16


def test_averaged_copy_holds_the_values_in_eval_mode_and_leaves_the_model_alone():
    model, _, values = model_and_values()
    own = copy.deepcopy(model.state_dict())
    model.__dict__["train"] = lambda mode=True: None  # a bound mode switch
    clone = _export.averaged_copy(model, values)
    assert not clone.training and "train" not in clone.__dict__
    assert clone.embed.weight is clone.head.weight  # still tied
    for name, value in values.items():
        assert torch.equal(
            clone.get_parameter(name) if "running" not in name else clone.get_buffer(name),
            value.float(),
        )
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, own[key])


def test_forward_runs_with_the_values_and_changes_no_statistics():
    model, live, values = model_and_values()
    idx = torch.tensor([0, 3, 4, 1])
    expected_model = copy.deepcopy(model)
    state = expected_model.state_dict()
    state.update({n: v.float() for n, v in values.items()})
    expected_model.load_state_dict(state)
    expected = expected_model(idx)  # train mode: batch statistics, running ones updated there
    own = copy.deepcopy(model.state_dict())
    tensors = _export.cast(values, live)
    kept = {n: t.clone() for n, t in tensors.items()}
    out = _export.forward(model, tensors, (idx,), {})
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, own[key])  # the model's statistics did not move
    for name, tensor in tensors.items():
        assert torch.equal(tensor, kept[name])  # nor the averaged ones
