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
