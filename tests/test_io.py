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


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_get_the_mode_a_plain_write_gives(tmp_path, umask):
    """As ``torch.save`` / ``open(path, "w")``: 0o666 less the umask for a new file (mkstemp's
    0o600 would lock out a server running as another user), the old mode for a replaced one."""
    import os

    import polyak

    old = os.umask(umask)
    try:
        ema = polyak.EMA(torch.nn.Linear(2, 2))
        ema.save(tmp_path / "a.safetensors")
        io.save_state(ema.state_dict(), tmp_path / "b.pt")
        torch.save({}, tmp_path / "reference.pt")
        expected = os.stat(tmp_path / "reference.pt").st_mode & 0o777
        assert expected == 0o666 & ~umask
        for name in ("a.safetensors", "b.pt"):
            assert os.stat(tmp_path / name).st_mode & 0o777 == expected, name
        os.chmod(tmp_path / "a.safetensors", 0o604)
        ema.save(tmp_path / "a.safetensors")  # replacing keeps the file's mode
        assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o604
    finally:
        os.umask(old)


def test_load_averaged_names_the_file_and_what_it_is(tmp_path):
    import polyak

    model = torch.nn.Linear(3, 2)
    polyak.EMA(model).save(tmp_path / "ema.safetensors")
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"ckpt\.pt: it is a torch\.save checkpoint.*load_state"):
        io.load_averaged(model, tmp_path / "ckpt.pt")
    data = (tmp_path / "ema.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:40])
    with pytest.raises(
        ValueError,
        match=r"cut\.safetensors: its header claims .* bytes but the file has 40: it is truncated",
    ):
        io.load_averaged(model, tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"tiny\.safetensors: it is 3 bytes long"):
        io.load_averaged(model, tmp_path / "tiny.safetensors")
    io.load_averaged(model, tmp_path / "ema.safetensors")  # the good file still loads


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
