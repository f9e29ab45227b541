"""Averages of models spread over processes: DDP, FSDP2, tensor and expert parallel, HSDP.

Nothing of this needs a call of its own in the training loop: ``polyak.EMA(model)`` on

- a DDP model unwraps it and averages the local replica; every rank holds the same weights after
  each optimizer step, so every rank holds the same average, and no update communicates;
- an FSDP2 (``fully_shard``), tensor-parallel, expert-parallel or HSDP model keeps each shadow as
  a DTensor with exactly its parameter's placements (``Shard(0)``; ``(Replicate(), Shard(0))``
  for HSDP; ``_StridedShard`` under TP + FSDP) and updates each rank's local shards with the
  EMA's multi-tensor kernel (``foreach``, or Triton on CUDA). An elementwise average needs no
  communication, so ``update()`` runs no collective, and each rank's shadows take its parameters'
  local shards' bytes: the full shadow divided by the number of shards. Shadows are fp32 where the sharded parameters are (FSDP2's ``MixedPrecisionPolicy``
  computes in bf16 from fp32 shards), and bf16/fp16 parameters get fp32 shadows as ever.
  ``offload="cpu"`` keeps the local shards in host memory (pinned on GPU machines).

``swapped()``, ``use_averages()``, ``copy_to()`` and ``functional_call()`` copy the averaged
shards into the parameters' local shards (FSDP2 gathers them for the forward as usual) and copy
the trained shards back bit for bit (:mod:`polyak._placement`).

This module holds what concerns whole process groups:

- checkpoints through ``torch.distributed.checkpoint`` (DCP): :meth:`polyak.EMA.state_dict`
  holds the DTensor shadows themselves, so DCP saves each rank's shards and loads them resharded
  onto any other number of ranks, or into the plain tensors of an unsharded model's EMA (the keys
  are the same). DCP's default planner unpickles the non-tensor entries of a checkpoint (steps,
  settings, an optimizer's hyper-parameters): :func:`load_planner` reads them with
  ``weights_only=True`` instead;
- :func:`export_full`: the averaged full model as one safetensors file, gathered and written one
  tensor at a time.

Every rank must call :func:`export_full` (it gathers); rank 0 writes. ``torch.distributed`` is
imported only inside the functions that need it.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from polyak._placement import reshard
from polyak._state import FORMAT
from polyak._store import is_dtensor, local
from polyak.io import ALIASES_KEY, atomic_path

if TYPE_CHECKING:
    from polyak.ema import EMA

__all__ = ["export_full", "load_planner"]

# torch dtype -> safetensors' dtype name (the format's own table)
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
}


def load_planner(**kwargs: Any) -> Any:
    """A DCP load planner that never unpickles: ``DefaultLoadPlanner(**kwargs)`` whose non-tensor
    entries are read with ``torch.load(..., weights_only=True)``.

    Pass it to ``torch.distributed.checkpoint.load(state, checkpoint_id=path,
    planner=polyak.distributed.load_planner())``. DCP's own planner reads those entries (an EMA's
    step and settings, an optimizer's hyper-parameters) with ``weights_only=False``, which runs
    whatever a checkpoint file holds.
    """
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._nested_dict import set_element

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            data = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                fqn = self.mappings[read_item.dest_index.fqn]
                set_element(self.original_state_dict, fqn, data)
            else:
                self.state_dict[read_item.dest_index.fqn] = data

    return WeightsOnlyLoadPlanner(**kwargs)


def export_full(
    ema: EMA,
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    *,
    slot: str | None = None,
) -> None:
    """Write the averaged full model as one safetensors file, as :meth:`polyak.EMA.save` does for
    an unsharded one: loadable with ``strict=True`` into a plain, unsharded model.

    Call it on every rank: each sharded average is gathered (``full_tensor()``), one tensor at a
    time, and rank 0 streams it into the file and drops it before the next one, so no rank ever
    holds more than one full tensor beside its shards (``safetensors.torch.save_file`` needs the
    whole model as one dict: the header, which names every tensor's byte range, is computed first
    from the shapes and written directly). Keys, dtypes and tied weights as
    :meth:`polyak.EMA.save`: the model's full key set (untracked tensors from the live model), in
    the model's dtypes (``dtype=`` overrides floating ones), tied weights written once under their
    alphabetically first name, the others recorded for :func:`polyak.io.load_averaged`. Written
    atomically (temp file, fsync, rename); every rank returns once the file is in place.
    ``slot``: as in :meth:`polyak.EMA.swapped`.
    """
    ema._check_slot(slot)
    if ema.model is not None:
        reshard(ema.model)  # a root left unsharded holds gathered copies, not its parameters
    ema._ensure_current()
    values = ema._values(slot)
    if ema.model is None:
        entries: Mapping[str, torch.Tensor] = ema._live
    else:
        entries = ema.model.state_dict(keep_vars=True)
    by_id = {id(ema._live[n]): v for n, v in values.items()}
    # names sharing one tensor (tied weights): the alphabetically first is written
    shared: dict[int, list[str]] = {}
    for key, tensor in entries.items():
        shared.setdefault(id(tensor), []).append(key)
    plan: list[tuple[str, torch.Tensor, torch.dtype]] = []
    aliases: dict[str, str] = {}
    for keys in shared.values():
        keep = sorted(keys)[0]
        live = entries[keep]
        target = dtype if dtype is not None and live.is_floating_point() else live.dtype
        if target not in _SAFETENSORS_DTYPES:  # on every rank, before any gather
            raise TypeError(
                f"cannot write {keep!r} as safetensors: dtype {target} has no safetensors name "
                f"(supported: {sorted(str(d) for d in _SAFETENSORS_DTYPES)}); pass dtype= to "
                f"cast floating tensors, or leave such tensors out of the model's state dict."
            )
        plan.append((keep, by_id.get(id(live), live), target))
        aliases.update({key: keep for key in keys if key != keep})
    metadata = {"format": "pt", "polyak.step": str(ema.step), "polyak.format": FORMAT}
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)

    if _rank() == 0:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            _write(f, plan, metadata, _gathered(plan))
    else:  # take part in each gather, in the same order, and keep nothing
        for _ in _gathered(plan, keep=False):
            pass
    _barrier()


def _gathered(
    plan: list[tuple[str, torch.Tensor, torch.dtype]], keep: bool = True
) -> Iterator[torch.Tensor | None]:
    """Each planned tensor in full, cast, on the host, one at a time (DTensors gathered on the
    device their mesh runs on: offloaded shards are moved there first); with ``keep=False`` the
    gathers alone, yielding ``None``."""
    for _, tensor, target in plan:
        with torch.no_grad():
            if is_dtensor(tensor):
                from torch.distributed.tensor import DTensor

                mesh = tensor.device_mesh
                shard = local(tensor).to(mesh.device_type).to(target)
                tensor = DTensor.from_local(
                    shard, mesh, tensor.placements, shape=tensor.shape, stride=tensor.stride()
                ).full_tensor()
            yield tensor.to("cpu", target).contiguous() if keep else None
            del tensor


def _write(
    f: BinaryIO,
    plan: list[tuple[str, torch.Tensor, torch.dtype]],
    metadata: dict[str, str],
    tensors: Iterator[torch.Tensor | None],
) -> None:
    """The safetensors layout: an 8-byte little-endian header length, the JSON header (each
    tensor's dtype, shape and ``[begin, end)`` byte range in the data that follows, padded with
    spaces to 8 bytes), then each tensor's bytes in the header's order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    begin = 0
    for key, tensor, target in plan:
        end = begin + tensor.numel() * target.itemsize
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[target],
            "shape": list(tensor.shape),
            "data_offsets": [begin, end],
        }
        begin = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for tensor in tensors:  # in the plan's order, cast to its dtypes by _gathered
        f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[union-attr]
        del tensor  # gone before the next gather: one full tensor at a time


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
