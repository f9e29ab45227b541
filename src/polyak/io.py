"""Files users trust: atomic writes, checksummed state files, safetensors exports, loads that never
unpickle.

**Writing.** Every file goes first to ``<path>.tmp`` beside the target (one fixed name: a save
killed at any moment leaves at most that one file, which the next save to the same path reuses and
removes), written in full, flushed and fsync'd, then renamed over the target, and the directory
fsync'd. A reader, or a process that was killed, therefore sees the old file or the new one, never
half of one. Writers of the same path in several processes (every rank of a job saving to a shared
file) take turns through a lock on ``<path>.tmp`` (``flock``; on platforms without it, saves to
one path must not run at the same time), and the last one's file wins, whole.

**State files** (:func:`save`, :func:`load`; :meth:`polyak.EMA.save_state`,
:meth:`polyak.EMA.load_state`) are safetensors files: the tensors of a state dict as safetensors
tensors, and everything else (counters, the rule as data, the tree the tensors sit in) as JSON in the
safetensors header's metadata, with

- ``polyak.format``: ``"polyak.state"``;
- ``polyak.version``: the format version, the same number as the EMA state dict's ``"version"``
  (:data:`polyak._state.VERSION`); a file of a later version is refused with
  :class:`~polyak.errors.VersionError`;
- ``polyak.checksum``: ``"sha256:<hex>"`` over every tensor's name, dtype, shape and bytes and all
  metadata but the checksum itself; a mismatch is a :class:`~polyak.errors.ChecksumError`.

The checksum finds damage (a truncated copy, flipped bits), not tampering: anyone can write a file
with a matching checksum. What a file *can* do to a process that loads it is bounded by the reader
instead: :func:`load` parses the header itself (sizes and offsets checked against the file before
anything is allocated), reads each tensor's bytes straight into a new tensor, and never unpickles;
a legacy ``torch.save`` file (``.pt``) is read with ``torch.load(weights_only=True)`` only. Whatever
the bytes, loading raises only ``OSError`` (cannot read) or a
:class:`~polyak.errors.CorruptFileError` / :class:`~polyak.errors.VersionError`
(ValueErrors). See ``SECURITY.md``.

**Exports** (:meth:`polyak.EMA.save`, :func:`save_safetensors`) are plain safetensors files of a
model's state dict, loadable with ``safetensors.torch.load_file`` or :func:`load_averaged`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io as stdio
import json
import math
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from polyak.errors import ChecksumError, CorruptFileError, VersionError

try:  # POSIX; elsewhere saves to one path must not overlap (see the module docstring)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "atomic_path",
    "load",
    "load_averaged",
    "load_state",
    "save",
    "save_safetensors",
    "save_state",
    "temporary_path",
    "write_atomic",
]

ALIASES_KEY = "polyak.aliases"
FORMAT_KEY = "polyak.format"
VERSION_KEY = "polyak.version"
STATE_KEY = "polyak.state"
CHECKSUM_KEY = "polyak.checksum"
STATE_FORMAT = "polyak.state"
TMP_SUFFIX = ".tmp"
# the largest safetensors header read (safetensors' own limit): bounds what a header can make
# the reader allocate before it has checked anything
MAX_HEADER_BYTES = 100_000_000


# ------------------------------------------------------------------ atomic writes


def temporary_path(path: str | os.PathLike[str]) -> Path:
    """``<path>.tmp``: where a save to ``path`` writes before it renames."""
    target = Path(path)
    return target.with_name(target.name + TMP_SUFFIX)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_ino, on_disk.st_dev) == (held.st_ino, held.st_dev)


def _lock(fd: int) -> None:
    """Wait for an exclusive ``flock`` on ``fd``; where the file system has none (some network
    file systems answer ENOLCK or EOPNOTSUPP), go on without it."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            raise


def _open_temporary(tmp: Path) -> int:
    """A new, empty ``tmp``, created by this call and locked by it; a stale one (left by a
    killed save) is removed first.

    A writer that is still writing holds the lock, so the lock is waited for; a writer that
    finished renamed or removed its file, so a file whose lock was granted but which no longer is
    ``tmp`` is let go and the loop starts again.
    """
    while True:
        created = True
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        except FileExistsError:
            created = False
            try:
                fd = os.open(tmp, os.O_RDWR)
            except FileNotFoundError:
                continue
        try:
            _lock(fd)
            if not _same_file(fd, tmp):
                os.close(fd)
                continue
            if not created:  # stale: nobody holds it; remove it, make ours
                os.unlink(tmp)
                os.close(fd)
                continue
        except BaseException:
            os.close(fd)
            raise
        return fd


def _target_mode(target: Path, fd: int) -> int:
    """The mode a plain ``open(target, "w")`` would give: the target's own if it exists, else that
    of the new temporary file (``0o666`` less the umask)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return stat.S_IMODE(os.fstat(fd).st_mode)


def _fsync_directory(directory: Path) -> None:
    """fsync a directory, so that a rename in it survives a power cut (where the platform lets a
    directory be opened and fsync'd)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _temporary_for(path: str | os.PathLike[str]) -> Iterator[tuple[Path, int]]:
    """``(<path>.tmp, its locked fd)``; the body writes it. On success: fsync, set the mode,
    rename onto ``path``, fsync the directory. On an error: the temporary file is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    fd = _open_temporary(tmp)
    try:
        try:
            yield tmp, fd
            os.chmod(tmp, _target_mode(target, fd))
            with open(tmp, "rb") as written:  # the file the body wrote, by name
                os.fsync(written.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    finally:
        os.close(fd)  # releases the lock
    _fsync_directory(target.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically: all of it to ``<path>.tmp``, flush, fsync, rename,
    fsync the directory (see the module docstring). The file gets the permissions a plain write
    would give it (the existing file's, or ``0o666`` less the umask)."""
    with _temporary_for(path) as (_, fd):
        view = memoryview(data).cast("B")
        while view:
            written = os.write(fd, view)
            view = view[written:]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield ``<path>.tmp`` for a writer that takes a path (``torch.save``, ``savefig``); on
    success fsync it and rename it onto ``path``, else remove it.

    The writer must write into the file by that name (open it, truncate, write), not replace it by
    another file: the lock that orders writers of one path is held on the file created here.
    """
    with _temporary_for(path) as (tmp, _):
        yield tmp


# ------------------------------------------------------------------ state files


def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON data, its tensors moved into ``tensors`` under keys made from ``where``.

    JSON objects keep str keys that do not start with ``$``; anything else is tagged:
    ``{"$tensor": key}``, ``{"$tuple": [...]}``, ``{"$float": "inf" | "-inf" | "nan"}``,
    ``{"$items": [[key, value], ...]}`` (a mapping with other keys, e.g. an optimizer's ints).
    """
    if isinstance(value, torch.Tensor):
        key, n = where, 1
        while key in tensors:
            n += 1
            key = f"{where}#{n}"
        tensors[key] = value
        return {"$tensor": key}
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {
                k: _encode(v, f"{where}/{k}" if where else k, tensors) for k, v in value.items()
            }
        items = []
        for k, v in value.items():
            if isinstance(k, torch.Tensor):
                raise TypeError(
                    f"{where or 'the state'}: a tensor as a mapping key cannot be stored in a "
                    f"polyak state file; key the mapping by names or numbers."
                )
            items.append([_encode(k, f"{where}/key", {}), _encode(v, f"{where}/{k}", tensors)])
        return {"$items": items}
    raise TypeError(
        f"{where or 'the state'}: a {type(value).__name__} cannot be stored in a polyak state file, "
        f"which holds tensors and plain data (None, bool, int, float, str, lists, tuples, dicts). "
        f"Convert it, e.g. to a str or a tensor."
    )


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors writes them: detached, dense, contiguous, on the CPU, no two
    sharing memory (views of one storage, e.g. the rows that hold an EMA's slots, are copied)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        if hasattr(tensor, "to_local") or tensor.layout != torch.strided:
            raise TypeError(
                f"{key}: a {type(tensor).__name__} with layout {tensor.layout} cannot be stored in "
                f"a polyak state file; store dense tensors (for FSDP2/DTensor state use "
                f"torch.distributed.checkpoint, or DTensor.full_tensor() on every rank)."
            )
        if tensor.device.type == "meta":
            raise TypeError(
                f"{key}: a tensor on the meta device has no values to store; move the EMA "
                f"(ema.to(device)) or the model to a real device first."
            )
        t = tensor.detach().to("cpu").contiguous()
        pointer = t.untyped_storage().data_ptr()
        if pointer in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _checksum(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` of the metadata but the checksum (sorted, as JSON) and, in name order, each
    tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    digest.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        head = json.dumps([name, str(tensor.dtype), list(tensor.shape)], separators=(",", ":"))
        digest.update(len(head).to_bytes(8, "little") + head.encode())
        data = _tensor_bytes(tensor)
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return "sha256:" + digest.hexdigest()


def save(state: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` (an :meth:`polyak.EMA.state_dict`, or a checkpoint dict of tensors and
    plain data that holds one) to ``path`` as a checksummed safetensors file, atomically.

    Tensors are written as they are (dtype, shape, bits), from any device (they load on the CPU,
    or where ``map_location`` says); tensors that are one object under two names load as one
    object again. Plain data round-trips exactly: ``None``, ``bool``, ``int``, ``float`` (``inf``
    and ``nan`` too), ``str``, lists, tuples and dicts (keys of any of these types). The file's
    format version is the EMA state dict's (``state["version"]`` where given, which must be one this
    polyak writes). Anything else raises ``TypeError`` before a byte is written.
    """
    from polyak._state import VERSION

    if not isinstance(state, Mapping):
        raise TypeError(
            f"polyak.io.save takes a state dict (a Mapping), got {type(state).__name__}; e.g. "
            f"polyak.io.save(ema.state_dict(), path)."
        )
    version = state.get("version", VERSION)
    if version != VERSION or isinstance(version, bool):
        raise VersionError(
            f"polyak.io.save writes state format version {VERSION}, but the state says "
            f"version={version!r}; save what this polyak's EMA.state_dict() returns (load an "
            f"older state into an EMA first: load_state_dict upgrades it)."
        )
    found: dict[str, torch.Tensor] = {}
    identity: dict[int, str] = {}
    tree = _encode(state, "", found)
    # one object under two names: stored once, both references point at it
    tensors: dict[str, torch.Tensor] = {}
    rename: dict[str, str] = {}
    for key, tensor in found.items():
        first = identity.setdefault(id(tensor), key)
        rename[key] = first
        if first == key:
            tensors[key] = tensor
    tree = _rename_refs(tree, rename)
    stored = _storable(tensors)
    metadata = {
        FORMAT_KEY: STATE_FORMAT,
        VERSION_KEY: str(VERSION),
        STATE_KEY: json.dumps(tree, separators=(",", ":"), allow_nan=False),
    }
    metadata[CHECKSUM_KEY] = _checksum(metadata, stored)
    from safetensors.torch import save as serialize

    write_atomic(path, serialize(stored, metadata=metadata))


def _rename_refs(tree: Any, rename: Mapping[str, str]) -> Any:
    if isinstance(tree, list):
        return [_rename_refs(v, rename) for v in tree]
    if isinstance(tree, dict):
        if set(tree) == {"$tensor"}:
            return {"$tensor": rename[tree["$tensor"]]}
        return {k: _rename_refs(v, rename) for k, v in tree.items()}
    return tree


def _decode(tree: Any, tensors: Mapping[str, torch.Tensor], used: set[str]) -> Any:
    """The inverse of :func:`_encode`; anything it would not write raises ``ValueError``."""
    if tree is None or isinstance(tree, (bool, str, int, float)):
        return tree
    if isinstance(tree, list):
        return [_decode(v, tensors, used) for v in tree]
    if not isinstance(tree, dict):
        raise ValueError(f"unexpected JSON value of type {type(tree).__name__}")
    tags = [k for k in tree if k.startswith("$")]
    if not tags:
        return {k: _decode(v, tensors, used) for k, v in tree.items()}
    if len(tree) != 1:
        raise ValueError(f"a tagged value with other keys: {sorted(tree)[:5]}")
    tag, value = tags[0], tree[tags[0]]
    if tag == "$tensor" and isinstance(value, str):
        if value not in tensors:
            raise ValueError(f"a reference to tensor {value!r}, which the file does not hold")
        used.add(value)
        return tensors[value]
    if tag == "$tuple" and isinstance(value, list):
        return tuple(_decode(v, tensors, used) for v in value)
    if tag == "$float" and value in ("inf", "-inf", "nan"):
        return float(value)
    if tag == "$items" and isinstance(value, list):
        out = {}
        for item in value:
            if not (isinstance(item, list) and len(item) == 2):
                raise ValueError("a $items entry that is not a [key, value] pair")
            key = _decode(item[0], {}, set())
            try:
                out[key] = _decode(item[1], tensors, used)
            except TypeError as error:  # an unhashable key
                raise ValueError(f"a mapping key {key!r} that cannot be a key") from error
        return out
    raise ValueError(f"an unknown tag {tag!r} with a {type(value).__name__}")


def load(path: str | os.PathLike[str], map_location: Any = None) -> dict[str, Any]:
    """Read a state written by :func:`save` (or a legacy ``torch.save`` file, with
    ``torch.load(weights_only=True)``): the same tree of plain data and tensors.

    Checks, before returning anything: that the file is whole safetensors (sizes and offsets
    against the file), that it is a polyak state file of a version this polyak knows, and its
    checksum. Raises :class:`~polyak.errors.CorruptFileError` (a ``ValueError``; its subclass
    :class:`~polyak.errors.ChecksumError` for a checksum mismatch) or
    :class:`~polyak.errors.VersionError` naming the file and what is wrong, ``OSError`` where the
    file cannot be read. Tensors load on the CPU; ``map_location`` (a device or its name) moves
    them.
    """
    if map_location is not None and not isinstance(map_location, (str, torch.device)):
        raise TypeError(
            f"map_location must be None, a device or its name (e.g. 'cpu', 'cuda:0'), got "
            f"{map_location!r}."
        )
    target = Path(path)
    with open(target, "rb") as f:
        head = f.read(9)
    if _is_torch_save(head):
        return _load_legacy(target, map_location)
    tensors, metadata = _read_safetensors(target, "a polyak state file written by polyak.io.save")
    fmt = metadata.get(FORMAT_KEY)
    if fmt != STATE_FORMAT:
        hint = (
            "it is safetensors without a polyak state, e.g. an export of averaged weights "
            "(ema.save), which polyak.io.load_averaged(model, path) reads"
            if fmt in (None, "polyak.EMA")
            else f"its {FORMAT_KEY} is {fmt!r}"
        )
        raise CorruptFileError(
            f"{target} is not a polyak state file ({hint}). Expected a file written by "
            f"polyak.io.save(state, path) or ema.save_state(path)."
        )
    _check_version(target, metadata.get(VERSION_KEY))
    expected = metadata.get(CHECKSUM_KEY)
    actual = _checksum(metadata, tensors)
    if expected != actual:
        raise ChecksumError(
            f"{target} does not match its checksum ({expected!r} written, {actual!r} computed "
            f"from its contents): the file was changed or damaged after it was written (a "
            f"partial copy, a disk error). Use another copy, or an earlier checkpoint."
        )
    try:
        used: set[str] = set()
        state = _decode(json.loads(metadata.get(STATE_KEY, "")), tensors, used)
    except (ValueError, RecursionError) as error:
        raise CorruptFileError(f"{target}: its state metadata is malformed ({error}).") from error
    unused = sorted(set(tensors) - used)
    if not isinstance(state, dict) or unused:
        raise CorruptFileError(
            f"{target}: its state metadata is malformed: "
            + (f"tensors {unused[:5]} are not part of the state." if unused else "not a dict.")
        )
    return _moved(state, map_location) if map_location is not None else state


def _check_version(path: Path, text: str | None) -> None:
    from polyak._state import VERSION

    if text is None or not text.isdigit() or len(text) > 9:
        raise CorruptFileError(
            f"{path}: its format version {text!r} is not one polyak writes (an int): the file is "
            f"damaged or was not written by polyak.io.save."
        )
    if int(text) > VERSION:
        raise VersionError(
            f"{path} has state format version {int(text)}, newer than this polyak understands "
            f"(versions 1 to {VERSION}): it was written by a later polyak; upgrade polyak to "
            f"load it."
        )
    if int(text) < 2:
        raise CorruptFileError(
            f"{path}: format version {int(text)} was never written to a state file (files "
            f"start at version 2); the file is damaged."
        )


def _moved(tree: Any, where: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(where)
    if isinstance(tree, list):
        return [_moved(v, where) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_moved(v, where) for v in tree)
    if isinstance(tree, dict):
        return {k: _moved(v, where) for k, v in tree.items()}
    return tree


def _is_torch_save(head: bytes) -> bool:
    """A ``torch.save`` file: a zip archive, or (before torch 1.6) a bare pickle (protocol 2 to 5),
    where it cannot be safetensors (whose 9th byte opens the JSON header)."""
    if head[8:9] == b"{":
        return False
    return head.startswith(b"PK\x03\x04") or (
        head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"
    )


def _load_legacy(path: Path, map_location: Any) -> dict[str, Any]:
    """A ``torch.save`` state: ``torch.load(weights_only=True)``, which unpickles only tensors and
    plain containers; anything else is refused, never run."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as error:  # any refusal of a damaged or hostile file
        raise CorruptFileError(
            f"{path} is a torch.save file that torch.load(weights_only=True) refused: {error}. "
            f"polyak loads only tensors and plain data and never unpickles other objects; if the "
            f"file is yours, load it, save the EMA again with ema.save_state(path)."
        ) from error
    if not isinstance(state, dict):
        raise CorruptFileError(
            f"{path} holds a {type(state).__name__}, not a state dict; expected the output of "
            f"ema.state_dict() (or a dict holding it) saved with torch.save."
        )
    return state


# ------------------------------------------------------------------ reading safetensors

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}


def _header_problem(header: Any, data_bytes: int) -> str | None:
    """Why a parsed safetensors header does not describe ``data_bytes`` bytes of tensors (or
    ``None``): each entry a known dtype, a shape of ints >= 0, offsets that match the shape and
    together tile the data exactly (safetensors' own rule)."""
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                return "its metadata is not a map of strings"
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            return f"its entry for {name!r} is malformed"
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            return f"tensor {name!r} has the unknown dtype {dtype!r}"
        if not (
            isinstance(shape, list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            return f"tensor {name!r} has the malformed shape {shape!r}"
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            return f"tensor {name!r} has offsets {offsets!r} outside the file's {data_bytes} bytes"
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            return (
                f"tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes} bytes, but its "
                f"offsets give {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            return f"tensor {name!r} starts at byte {start} of the data, expected {end}"
        end = stop
    if end != data_bytes:
        return f"its tensors fill {end} bytes of data, but the file holds {data_bytes}"
    return None


def _read_safetensors(path: Path, expected: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, checked whole before any tensor is made
    (:func:`_parse_safetensors`)."""
    with open(path, "rb") as f:
        return _parse_safetensors(f, os.fstat(f.fileno()).st_size, str(path), expected)


def _read_safetensors_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`_read_safetensors` of bytes in memory."""
    return _parse_safetensors(stdio.BytesIO(data), len(data), "<bytes>", "safetensors")


def _parse_safetensors(
    f: BinaryIO, size: int, where: str, expected: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read safetensors from ``f`` (``size`` bytes), checking the header whole first.

    Memory: the header (at most :data:`MAX_HEADER_BYTES`, and no more than the file holds) and the
    tensors, each read once into a new tensor of the size its offsets give, which fit in the file.
    A bool tensor must hold only the bytes 0 and 1 (others are no bool torch can compute with).
    """
    head = f.read(9)
    f.seek(8)
    problem = None
    header: Any = None
    if _is_torch_save(head):
        problem = (
            "it is a torch.save checkpoint (zip or pickle), not safetensors; read an EMA state "
            "with polyak.io.load(path) (or polyak.io.load_state(path)) and "
            "ema.load_state_dict(...), or export the averages with ema.save(path)"
        )
    elif len(head) < 8:
        problem = f"it is {size} bytes long, shorter than a safetensors header (8 bytes)"
    else:
        n = int.from_bytes(head[:8], "little")
        if n > MAX_HEADER_BYTES or n + 8 > size:
            problem = (
                f"its header claims {n:,} bytes but the file has {size:,}: it is truncated or "
                f"not safetensors (a partial download or copy?)"
                if n + 8 > size
                else f"its header claims {n:,} bytes, more than a safetensors header may have"
            )
        else:
            text = f.read(n)
            try:
                header = json.loads(text.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                problem = "its header is not valid safetensors (not JSON)"
            else:
                problem = _header_problem(header, size - 8 - n)
    if problem is not None:
        raise CorruptFileError(f"cannot load {where}: {problem}. Expected {expected}.")
    data_start = 8 + int.from_bytes(head[:8], "little")
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, stop = entry["data_offsets"]
        raw = torch.empty(stop - start, dtype=torch.uint8)
        f.seek(data_start + start)
        if stop > start and f.readinto(raw.numpy()) != stop - start:
            raise CorruptFileError(f"cannot load {where}: it changed while being read.")
        dtype = _DTYPES[entry["dtype"]]
        if dtype == torch.bool and stop > start and int(raw.max()) > 1:
            raise CorruptFileError(
                f"cannot load {where}: bool tensor {name!r} holds bytes other than 0 and 1."
            )
        tensors[name] = raw.view(dtype).reshape(entry["shape"])
    return tensors, dict(header.get("__metadata__", {}))


# ------------------------------------------------------------------ exports


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` as safetensors, atomically; tensors sharing storage are written once.

    Of each group of names that share one tensor (tied weights), the alphabetically first is written
    (the rule ``safetensors.torch.save_model`` uses, so ``safetensors.torch.load_model`` re-ties them),
    and the others are recorded in the metadata under ``"polyak.aliases"`` for :func:`load_averaged`.
    """
    from safetensors.torch import save as serialize

    groups: dict[tuple[int, int, tuple[int, ...], torch.dtype], list[str]] = {}
    for name, tensor in tensors.items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.dtype,
        )
        groups.setdefault(key, []).append(name)
    aliases: dict[str, str] = {}
    unique: dict[str, torch.Tensor] = {}
    for names in groups.values():
        keep = sorted(names)[0]
        unique[keep] = tensors[keep]
        aliases.update({name: keep for name in names if name != keep})
    meta = {"format": "pt", **(metadata or {})}
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    write_atomic(path, serialize(_storable(unique), metadata=meta))


def load_averaged(
    model: torch.nn.Module, path: str | os.PathLike[str], strict: bool = True
) -> torch.nn.Module:
    """Load a file written by :meth:`polyak.EMA.save` into ``model`` (tied weights re-tied).

    ``strict`` as in ``model.load_state_dict``. A file that is not safetensors (a ``torch.save``
    checkpoint, a truncated download) raises a :class:`~polyak.errors.CorruptFileError` (a
    ``ValueError``) that names it and says what it is; the file is checked whole (sizes, offsets)
    before anything is read into the model.
    """
    target = Path(path)
    state, meta = _read_safetensors(target, "a safetensors file written by ema.save(path)")
    try:
        aliases = json.loads(meta.get(ALIASES_KEY, "{}"))
    except ValueError as error:
        raise CorruptFileError(f"{target}: its {ALIASES_KEY} metadata is not JSON.") from error
    if not isinstance(aliases, dict) or not all(
        isinstance(a, str) and isinstance(t, str) and t in state for a, t in aliases.items()
    ):
        raise CorruptFileError(f"{target}: its {ALIASES_KEY} metadata names no stored tensors.")
    for alias, name in aliases.items():
        state[alias] = state[name]
    model.load_state_dict(state, strict=strict)
    return model


# ------------------------------------------------------------------ legacy torch.save states


def save_state(obj: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` a state dict of plain data atomically (readable with ``weights_only=True``).

    Prefer :func:`save`, whose files are checksummed and are read without ``torch.load``.
    """
    with atomic_path(path) as tmp:
        torch.save(dict(obj), tmp)


def load_state(path: str | os.PathLike[str], map_location: Any = None) -> dict[str, Any]:
    """Read a state dict written by :func:`save_state`; never unpickles arbitrary objects
    (``torch.load(weights_only=True)``, whose errors it raises as they are)."""
    return torch.load(path, map_location=map_location, weights_only=True)
