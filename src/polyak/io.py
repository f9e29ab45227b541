"""Files users trust: atomic writes, safetensors exports, weights-only loads.

Every write goes to a temporary file in the target's directory, is flushed and fsync'd, then
renamed over the target (and the directory fsync'd), so a crash leaves either the old file or the
new one, never half of one. Nothing is ever unpickled: exports are safetensors, state dicts are
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_path", "load_averaged", "load_state", "save_safetensors", "save_state"]

ALIASES_KEY = "polyak.aliases"


def _create_temporary(target: Path) -> tuple[Path, int]:
    """An empty new file beside ``target``, and the mode a plain ``open(target, "w")`` would give
    the target: its own mode if it exists, else ``0o666`` less the umask (``tempfile.mkstemp``
    makes ``0o600`` files, which a server running as another user could not read)."""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        except FileExistsError:
            continue
        os.close(fd)
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
        return tmp, mode
    raise FileExistsError(f"could not create a temporary file beside {target}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it onto ``path``.

    The file gets the permissions a plain write would give it (the existing file's, or the umask's).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path, mode = _create_temporary(target)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)  # writers may have replaced the file (safetensors does)
        with open(tmp_path, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        with contextlib.suppress(OSError):  # not every platform lets a directory be fsync'd
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def save_state(obj: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` a state dict of plain data atomically (readable with ``weights_only=True``)."""
    with atomic_path(path) as tmp:
        torch.save(dict(obj), tmp)


def load_state(path: str | os.PathLike[str], map_location: Any = None) -> dict[str, Any]:
    """Read a state dict written by :func:`save_state`; never unpickles arbitrary objects."""
    return torch.load(path, map_location=map_location, weights_only=True)


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
    from safetensors.torch import save_file

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
        unique[keep] = tensors[keep].detach().contiguous().cpu()
        aliases.update({name: keep for name in names if name != keep})
    meta = {"format": "pt", **(metadata or {})}
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(unique, str(tmp), metadata=meta)


def load_averaged(
    model: torch.nn.Module, path: str | os.PathLike[str], strict: bool = True
) -> torch.nn.Module:
    """Load a file written by :meth:`polyak.EMA.save` into ``model`` (tied weights re-tied).

    ``strict`` as in ``model.load_state_dict``. A file that is not safetensors (a ``torch.save``
    checkpoint, a truncated download) raises a ``ValueError`` that names it and says what it is.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as error:
        raise ValueError(_not_safetensors(Path(path), error)) from error
    for alias, target in json.loads(meta.get(ALIASES_KEY, "{}")).items():
        state[alias] = state[target]
    model.load_state_dict(state, strict=strict)
    return model


def _not_safetensors(path: Path, error: Exception) -> str:
    """Why ``path`` could not be read as safetensors, in words a user can act on."""
    with open(path, "rb") as f:
        head = f.read(8)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04") or head[:2] == b"\x80\x02":
        what = (
            "it is a torch.save checkpoint (zip or pickle), not safetensors; read an EMA state "
            "dict with polyak.io.load_state(path) and ema.load_state_dict(...), or export the "
            "averages with ema.save(path)"
        )
    elif len(head) < 8:
        what = f"it is {size} bytes long, shorter than a safetensors header (8 bytes)"
    else:
        header = int.from_bytes(head, "little")
        what = (
            f"its header claims {header:,} bytes but the file has {size:,}: it is truncated or not "
            f"safetensors (a partial download or copy?)"
            if header + 8 > size
            else "its header is not valid safetensors"
        )
    return (
        f"cannot load averaged weights from {path}: {what}. Expected a safetensors file written "
        f"by ema.save(path). (safetensors said: {error})"
    )
