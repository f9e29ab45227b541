"""Atomic writes and weights-only loading."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from polyak import errors, io


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


# ---------------------------------------------------------------- state files (io.save / io.load)


def _tree() -> dict:
    shared = torch.arange(6.0).reshape(2, 3)
    rows = torch.arange(8.0).reshape(2, 4)  # two views of one storage, as an EMA's slot rows
    return {
        "format": "anything",
        "none": None,
        "flags": [True, False],
        "ints": [0, -1, 2**62, 2**100],
        "floats": [0.5, -0.0, float("inf"), float("-inf"), 1e-310],
        "nan": float("nan"),
        "text": "ünïcode $tensor",
        "tuple": (1, (2.5, "x"), []),
        "by int": {0: "a", 7: {"deep": [1]}},
        "mixed keys": {"a": 1, 2: "b", (3, 4): None},
        "$dollar": {"$tensor": "not a reference"},
        "tensors": {
            "f32": torch.randn(3, 2),
            "bf16": torch.randn(4).to(torch.bfloat16),
            "f16": torch.tensor([65504.0, -0.0], dtype=torch.float16),
            "i64": torch.tensor([2**62, -5]),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.25, dtype=torch.float64),
            "empty": torch.empty(0, 5),
            "strided": torch.arange(12.0).reshape(3, 4).t(),
            "row0": rows[0],
            "row1": rows[1],
        },
        "tied": [shared, shared],
    }


def _same(a, b) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(
            a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
        )
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b and (not isinstance(a, float) or str(a) == str(b))


def test_save_load_round_trips_plain_data_and_tensors(tmp_path):
    tree = _tree()
    io.save(tree, tmp_path / "s")
    loaded = io.load(tmp_path / "s")
    _same(tree, loaded)
    assert loaded["tied"][0] is loaded["tied"][1]  # one object under two names stays one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_state_file_is_safetensors_with_its_metadata(tmp_path):
    from safetensors import safe_open

    import polyak

    ema = polyak.EMA(torch.nn.Linear(2, 2))
    ema.save_state(tmp_path / "s")
    with safe_open(str(tmp_path / "s"), framework="pt") as f:  # the library reads it too
        meta = f.metadata()
        assert sorted(f.keys()) == ["shadows/ema/bias", "shadows/ema/weight"]
    assert meta["polyak.format"] == "polyak.state" and meta["polyak.version"] == "2"
    assert meta["polyak.checksum"].startswith("sha256:")
    assert json.loads(meta["polyak.state"])["step"] == 0


def test_save_refuses_what_it_cannot_store(tmp_path):
    for bad, match in (
        ({"x": object()}, r"x: a object cannot be stored"),
        ({"x": {torch.ones(1): 1}}, "tensor as a mapping key"),
        ({"x": torch.ones(2, device="meta")}, "meta device"),
        ({"x": torch.ones(2).to_sparse()}, "layout"),
    ):
        with pytest.raises(TypeError, match=match):
            io.save(bad, tmp_path / "s")
    with pytest.raises(errors.VersionError, match="version=1"):
        io.save({"version": 1}, tmp_path / "s")
    with pytest.raises(TypeError, match="a Mapping"):
        io.save([1], tmp_path / "s")
    assert not list(tmp_path.iterdir())


def _rewrite(path, edit) -> None:
    """Rewrite a state file's header with ``edit(header)``, keeping its checksum valid."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    edit(header)
    tensors, _ = io._read_safetensors_bytes(data)
    header["__metadata__"][io.CHECKSUM_KEY] = io._checksum(header["__metadata__"], tensors)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)


def test_damage_is_caught_by_the_checksum(tmp_path):
    import polyak

    ema = polyak.EMA(torch.nn.Linear(2, 2))
    ema.save_state(tmp_path / "s")
    data = bytearray((tmp_path / "s").read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    (tmp_path / "flipped").write_bytes(bytes(data))
    with pytest.raises(errors.ChecksumError, match=r"flipped does not match its checksum"):
        io.load(tmp_path / "flipped")
    # the metadata is covered too: step 0 -> 5 with the old checksum
    (tmp_path / "meta").write_bytes(
        (tmp_path / "s").read_bytes().replace(b'"step\\":0', b'"step\\":5')
    )
    with pytest.raises(errors.ChecksumError):
        io.load(tmp_path / "meta")
    assert isinstance(errors.ChecksumError("x"), ValueError)


def test_a_future_version_is_refused_by_name(tmp_path):
    import polyak

    ema = polyak.EMA(torch.nn.Linear(2, 2))
    ema.save_state(tmp_path / "s")
    _rewrite(tmp_path / "s", lambda h: h["__metadata__"].update({"polyak.version": "3"}))
    with pytest.raises(errors.VersionError, match=r"version 3, newer than this polyak.*upgrade"):
        ema.load_state(tmp_path / "s")
    state = ema.state_dict()
    state["version"] = 3
    with pytest.raises(errors.VersionError, match="version 3 is newer"):
        ema.load_state_dict(state)  # in memory alike


def test_load_reads_a_legacy_torch_save_state(tmp_path):
    import polyak

    model = torch.nn.Linear(2, 2)
    ema = polyak.EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    io.save_state({"ema": ema.state_dict()}, tmp_path / "old.pt")
    torch.save(ema.state_dict(), tmp_path / "bare.pt")
    other = polyak.EMA(torch.nn.Linear(2, 2), decay=0.5)
    other.load_state(tmp_path / "bare.pt")
    assert torch.equal(other.average("weight"), ema.average("weight")) and other.step == 1
    assert torch.equal(
        io.load(tmp_path / "old.pt")["ema"]["shadows"]["ema"]["weight"], ema.average("weight")
    )


def test_save_state_then_load_state_resumes_exactly(tmp_path):
    import polyak
    from polyak import averagers

    def train(ema, model, steps, start):
        for t in range(start, start + steps):
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(t)))
            ema.update()

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = polyak.EMA(model, rule=averagers.Exponentials((0.5, 0.9)), shadow_dtype=torch.float64)
    train(ema, model, 5, 0)
    ema.save_state(tmp_path / "ckpt")
    resumed = polyak.EMA(model, rule=averagers.Exponentials((0.5, 0.9)), shadow_dtype=torch.float64)
    resumed.load_state(tmp_path / "ckpt")
    train(ema, model, 5, 5)
    train(resumed, model, 5, 5)
    for slot in ema.slots:
        for name in ema.names():
            assert torch.equal(ema.average(name, slot=slot), resumed.average(name, slot=slot))
    assert resumed.step == ema.step == 10


# ---------------------------------------------------------------- the write itself


@pytest.mark.parametrize("how", ["save", "save_state", "export", "atomic_path"])
def test_file_and_directory_are_fsynced_around_the_rename(tmp_path, monkeypatch, how):
    """The file's data is fsync'd before the rename makes it the target, and the directory after
    (so the rename itself survives a power cut)."""
    import os
    import stat as stat_module

    import polyak

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(
            ("fsync dir" if stat_module.S_ISDIR(info.st_mode) else "fsync file", info.st_ino)
        )
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "out"
    ema = polyak.EMA(torch.nn.Linear(2, 2))
    if how == "save":
        io.save({"a": torch.ones(2)}, target)
    elif how == "save_state":
        ema.save_state(target)
    elif how == "export":
        ema.save(target)
    else:
        with io.atomic_path(target) as tmp:
            torch.save({"a": 1}, tmp)
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync file", "replace", "fsync dir"], events
    assert events[0][1] == events[1][1] == os.stat(target).st_ino  # the file that became the target
    assert events[2][1] == os.stat(tmp_path).st_ino


def test_the_temporary_file_has_one_fixed_name(tmp_path, monkeypatch):
    import os

    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    io.save({"a": torch.ones(2)}, tmp_path / "ckpt")
    io.save({"a": torch.ones(3)}, tmp_path / "ckpt")
    assert seen == [["ckpt.tmp"], ["ckpt", "ckpt.tmp"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert io.temporary_path(tmp_path / "ckpt") == tmp_path / "ckpt.tmp"


def test_a_stale_temporary_file_is_reused_and_removed(tmp_path):
    """What a killed save leaves (half a file, any mode) is taken over by the next save."""
    import os

    stale = tmp_path / "ckpt.tmp"
    stale.write_bytes(b"half of a file" * 1000)
    os.chmod(stale, 0o600)
    io.save({"a": torch.ones(2)}, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(io.load(tmp_path / "ckpt")["a"], torch.ones(2))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "ckpt").st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import os

    io.save({"a": torch.ones(2)}, tmp_path / "ckpt")

    def broken(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", broken)
    with pytest.raises(OSError, match="No space"):
        io.save({"a": torch.zeros(2)}, tmp_path / "ckpt")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(io.load(tmp_path / "ckpt")["a"], torch.ones(2))


def test_concurrent_writers_of_one_path_take_turns(tmp_path):
    """Eight threads (each its own open file, so flock orders them as it orders processes) save
    to one path at once: every file in between and at the end is one of theirs, whole."""
    import threading

    values = [torch.full((50_000,), float(i)) for i in range(8)]
    errors_seen = []

    def writer(i):
        try:
            for _ in range(5):
                io.save({"v": values[i], "i": i}, tmp_path / "ckpt")
        except Exception as error:  # pragma: no cover - reported below
            errors_seen.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors_seen
    final = io.load(tmp_path / "ckpt")
    assert torch.equal(final["v"], values[final["i"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_errors_subclass_what_was_raised_before():
    assert issubclass(errors.CorruptFileError, ValueError)
    assert issubclass(errors.VersionError, ValueError)
    assert issubclass(errors.StateMismatchError, ValueError)
    assert issubclass(errors.ModelChangedError, RuntimeError)
    assert issubclass(errors.NonFiniteError, FloatingPointError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.PolyakError)


def test_malformed_safetensors_are_refused_before_anything_is_made(tmp_path):
    """The header must describe the file exactly: no bytes beyond the tensors, bools 0 or 1."""
    import polyak

    ema = polyak.EMA(torch.nn.Linear(2, 2))
    ema.save_state(tmp_path / "s")
    data = (tmp_path / "s").read_bytes()
    (tmp_path / "longer").write_bytes(data + b"\0")
    with pytest.raises(errors.CorruptFileError, match=r"its tensors fill \d+ bytes of data"):
        io.load(tmp_path / "longer")
    io.save({"flags": torch.tensor([True, False])}, tmp_path / "b")
    data = bytearray((tmp_path / "b").read_bytes())
    data[-1] = 2  # a bool byte that is neither 0 nor 1
    (tmp_path / "b").write_bytes(bytes(data))
    with pytest.raises(errors.CorruptFileError, match="bool tensor 'flags' holds bytes other"):
        io.load(tmp_path / "b")


def test_a_file_system_without_flock_still_saves(tmp_path, monkeypatch):
    """Some network file systems answer flock with ENOLCK: the save goes on without the lock."""
    import errno

    fcntl = pytest.importorskip("fcntl")

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    io.save({"a": torch.ones(2)}, tmp_path / "ckpt")
    assert torch.equal(io.load(tmp_path / "ckpt")["a"], torch.ones(2))
