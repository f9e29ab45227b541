"""Atomic writes and weights-only loading."""

from __future__ import annotations

import pickle

import pytest
import torch

from polyak import io


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "state.pt"
    io.save_state({"a": torch.ones(2)}, target)
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_bytes(b"half-written")
        raise RuntimeError("crash while writing")
    assert torch.equal(io.load_state(target)["a"], torch.ones(2))  # the old file survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temp file left


def test_load_state_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        io.load_state(path)


def test_safetensors_dedups_shared_tensors(tmp_path):
    from safetensors.torch import load_file

    shared = torch.arange(6.0).reshape(2, 3)
    io.save_safetensors({"b": shared, "a": shared, "c": torch.zeros(1)}, tmp_path / "x.safetensors")
    loaded = load_file(tmp_path / "x.safetensors")
    assert sorted(loaded) == ["a", "c"]
    assert torch.equal(loaded["a"], shared)


def test_load_averaged_honours_strict(tmp_path):
    """A file with keys the model lacks, into a model with keys the file lacks: refused with
    strict=True (naming the keys); with strict=False the shared keys load and the rest stay."""
    from torch import nn

    import polyak

    torch.manual_seed(0)
    saved = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    polyak.EMA(saved, decay=0.5).save(tmp_path / "ema.safetensors")
    other = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4))  # "1.*" missing, "2.*" extra
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        (RuntimeError, ValueError), match=r"1\.weight[\s\S]*2\.weight|2\.weight[\s\S]*1\.weight"
    ):
        io.load_averaged(other, tmp_path / "ema.safetensors")
    assert io.load_averaged(other, tmp_path / "ema.safetensors", strict=False) is other
    assert torch.equal(other[0].weight, saved[0].weight)
    assert torch.equal(other[0].bias, saved[0].bias)
    assert torch.equal(other[2].weight, before["2.weight"])  # not in the file: left alone
