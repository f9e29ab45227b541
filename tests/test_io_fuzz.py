"""Fuzzed loading: whatever the bytes, loading raises only the documented exceptions.

Files start from ones polyak wrote (a state file, an export, a legacy ``torch.save`` state) or from
hostile ones (pickles whose payload would create a file if anything unpickled them, as a bare
pickle and inside a ``torch.save`` zip), and are then damaged at random: cut short, bytes flipped
or inserted, the header's length field set huge, or the header rewritten with other dtypes,
shapes, names or offsets (with the checksum recomputed too, so that the file gets past the
checksum to the checks behind it). Every case must end in a loaded state or one of
:class:`polyak.errors.CorruptFileError` / ``VersionError`` / ``StateMismatchError``; never another
exception, a hang (each case has 10 s), memory beyond the file's size, or the payload's side
effect; and a refused load changes nothing in the EMA.

CI runs a few hundred cases; the slow variant 10,000.
"""

from __future__ import annotations

import contextlib
import io as stdio
import json
import pickle
import signal
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polyak
from polyak import errors
from polyak import io as pio

DOCUMENTED = (errors.CorruptFileError, errors.VersionError, errors.StateMismatchError)
ROOT = Path(__file__).parent


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    return model.to(torch.bfloat16)  # fp32 shadows, bf16 weights, an int64 buffer


def fresh() -> polyak.EMA:
    return polyak.EMA(net(), decay=0.9)


class Payload:
    """Unpickled, it would create ``path`` (open(path, "w")): the side effect the tests watch."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _sources(directory: Path) -> dict[str, bytes]:
    ema = fresh()
    ema.update()
    ema.save_state(directory / "state")
    ema.save(directory / "export")
    torch.save(ema.state_dict(), directory / "legacy.pt")
    marker = directory / "PWNED"
    torch.save({"ema": Payload(marker)}, directory / "evil.pt")
    out = {
        name: (directory / name).read_bytes()
        for name in ("state", "export", "legacy.pt", "evil.pt")
    }
    out["evil.pkl"] = pickle.dumps({"ema": Payload(marker)}, protocol=2)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz-sources")
    return directory, _sources(directory)


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def _rechecksum(header: dict, body: bytes) -> None:
    """Recompute polyak's checksum for a rewritten header, as a forger would."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or pio.CHECKSUM_KEY not in meta:
        return
    try:
        tensors, _ = pio._read_safetensors_bytes(_join(header, body))
    except errors.CorruptFileError:
        return
    meta[pio.CHECKSUM_KEY] = pio._checksum(meta, tensors)


@st.composite
def damaged(draw, sources: dict[str, bytes]) -> bytes:
    name = draw(st.sampled_from(sorted(sources)))
    data = bytearray(sources[name])
    how = draw(
        st.sampled_from(["as is", "cut", "flip", "insert", "length", "header", "header+sum"])
    )
    if how == "cut":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "insert":
        i = draw(st.integers(0, len(data)))
        return bytes(data[:i] + draw(st.binary(min_size=1, max_size=64)) + data[i:])
    if how == "length":
        size = draw(st.sampled_from([0, 1, 7, 2**31, 2**40, 2**63, 2**64 - 1, len(data)]))
        return size.to_bytes(8, "little") + bytes(data[8:])
    if how in ("header", "header+sum") and not name.endswith((".pt", ".pkl")):
        header, body = _split(bytes(data))
        keys = [k for k in header if k != "__metadata__"]
        key = draw(st.sampled_from(keys))
        entry = header[key]
        change = draw(st.sampled_from(["dtype", "shape", "offsets", "name", "drop", "meta"]))
        if change == "dtype":
            entry["dtype"] = draw(st.sampled_from(["F16", "BF16", "I64", "U8", "BOOL", "F64", "X"]))
        elif change == "shape":
            entry["shape"] = draw(
                st.lists(st.integers(0, 2**40) | st.just(-1) | st.just(2**64), max_size=4)
            )
        elif change == "offsets":
            entry["data_offsets"] = draw(
                st.lists(st.integers(-1, 2**63) | st.just(0), min_size=0, max_size=3)
            )
        elif change == "name":
            header[draw(st.text(max_size=12))] = header.pop(key)
        elif change == "drop":
            header.pop(key)
        else:
            meta = header.setdefault("__metadata__", {})
            field = draw(st.sampled_from(sorted(meta) or ["x"]))
            meta[field] = draw(
                st.sampled_from(["", "3", "99", "[]", "{", '{"$tensor": "nope"}', "[" * 100_000])
                | st.text(max_size=40)
            )
        if how == "header+sum":
            _rechecksum(header, body)
        return _join(header, body)
    return bytes(data)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def fire(signum, frame):
        raise _Timeout(f"a load took over {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_one(data: bytes, directory: Path) -> None:
    path = directory / "case"
    path.write_bytes(data)
    ema = fresh()
    before = {n: ema.average(n).clone() for n in ema.names()}
    with time_limit(10):
        try:
            ema.load_state(path)
        except DOCUMENTED:
            for n, t in before.items():  # a refused load changed nothing
                assert torch.equal(ema.average(n), t), n
        try:
            pio.load_averaged(net(), path)
        except (*DOCUMENTED, RuntimeError) as error:  # RuntimeError: load_state_dict's own
            assert isinstance(error, DOCUMENTED) or "state_dict" in str(error), error
        with contextlib.suppress(*DOCUMENTED):
            pio.load(path)
    assert not (directory / "PWNED").exists(), "a payload ran: something was unpickled"


def _fuzz(sources, examples: int) -> None:
    directory, files = sources

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(data=damaged(files))
    def run(data: bytes) -> None:
        check_one(data, directory)

    run()


def test_fuzzed_files_raise_only_documented_errors(sources):
    _fuzz(sources, examples=300)


@pytest.mark.slow
def test_fuzzed_files_raise_only_documented_errors_many(sources):
    _fuzz(sources, examples=10_000)


def test_the_unfuzzed_sources_load(sources, tmp_path):
    """The starting points are what they claim: the state and legacy files load, the payloads are
    refused (and never run)."""
    directory, files = sources
    for name in ("state", "legacy.pt"):
        (tmp_path / name).write_bytes(files[name])
        fresh().load_state(tmp_path / name)
    (tmp_path / "export").write_bytes(files["export"])
    pio.load_averaged(net(), tmp_path / "export")
    for name in ("evil.pt", "evil.pkl"):
        (tmp_path / name).write_bytes(files[name])
        with pytest.raises(errors.CorruptFileError, match="weights_only"):
            pio.load(tmp_path / name)
    assert not (directory / "PWNED").exists()


def test_a_forged_checksum_gets_to_the_state_checks(sources, tmp_path):
    """A header rewritten with a recomputed checksum passes the file checks; the state's own
    checks (StateMismatchError) stop it."""
    _, files = sources
    header, body = _split(files["state"])
    key = next(k for k in header if k.endswith("0.weight"))
    header[key]["shape"] = list(reversed(header[key]["shape"]))  # (4, 3) -> (3, 4): same bytes
    _rechecksum(header, body)
    (tmp_path / "forged").write_bytes(_join(header, body))
    pio.load(tmp_path / "forged")  # a well-formed file ...
    with pytest.raises(errors.StateMismatchError, match=r"0\.weight: shape \(3, 4\)"):
        fresh().load_state(tmp_path / "forged")  # ... of another model


def test_payload_in_a_zip_never_runs(tmp_path):
    """A ``torch.save`` zip whose pickle calls ``open`` is refused by every loader."""
    marker = tmp_path / "PWNED"
    buffer = stdio.BytesIO()
    torch.save({"x": Payload(marker)}, buffer)
    assert zipfile.is_zipfile(stdio.BytesIO(buffer.getvalue()))
    (tmp_path / "evil.pt").write_bytes(buffer.getvalue())
    for load in (pio.load, fresh().load_state):
        with pytest.raises(errors.CorruptFileError):
            load(tmp_path / "evil.pt")
    with pytest.raises(errors.CorruptFileError, match="torch.save checkpoint"):
        pio.load_averaged(net(), tmp_path / "evil.pt")
    assert not marker.exists()
