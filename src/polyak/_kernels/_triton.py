"""The Triton path: one kernel launch per (device, dtype) group, however many tensors it holds.

A launch covers every tensor of a group through tables built once at construction: the address of
each shadow and source, each tensor's element count and its start in the random stream, and for
each program (a block of ``BLOCK`` elements) the tensor it works on and where in it. A program
reads its block of the source and the shadow once and writes the shadow once, upcasting bf16/fp16
sources in registers, so the bytes moved are the floor (10 per element for bf16 weights with fp32
shadows, 12 for fp32, 6 for bf16 shadows with stochastic rounding), nothing is allocated per update,
nothing is compiled per tensor (one compilation per dtype combination, about a second), and the
weight ``w = 1 - decay`` is read from the device, so the update is CUDA-graph capturable.

Per element, in the shadow's compute precision (fp32, or fp64 for fp64 shadows), as ``torch.lerp``::

    s <- s + w (p - s)          if |w| < 0.5
    s <- p - (p - s)(1 - w)     otherwise

then rounded to the shadow dtype: to nearest, or stochastically into bf16 with exactly the random
stream of :mod:`._stochastic` (same seed, counter and element offsets give the same bits).

Because Triton takes addresses, not tensors, every update compares the sources' current addresses
with the planned ones (one ``data_ptr()`` per weight on the host, about 0.07 µs each, no device
work; the shadows belong to the EMA, which replans when it moves them) and rebuilds the tables when
the model's storage moved (``model.to()``, ``param.data = ...``), by an asynchronous copy from
pinned memory. Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter; how CI tests this file).

Compile options, fixed here rather than left to the Triton version (:data:`LAUNCH_OPTIONS`):
``sanitize_overflow=False``, since the random stream relies on 32-bit multiplies wrapping, which
``TRITON_DEBUG=1`` would otherwise turn into device-side asserts; and ``enable_fp_fusion=True``
(``s + w * diff`` is one FMA, as in ATen's CUDA lerp), the default that Triton 3.10 changes.

Known limits: one tensor whose address is not 16-byte aligned turns off 128-bit accesses for its
whole group; the random stream's element index is 32-bit, so in models of more than 2**32 averaged
elements, elements 2**32 apart draw the same bits (each still unbiased), as in the other kernels.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from polyak._kernels._base import (
    DeviceState,
    group_by_device_and_dtype,
    require_bf16_shadows,
    segment_offsets,
)

BLOCK = 2048  # elements per program: 16 per thread at 4 warps, four 128-bit fp32 loads
LAUNCH_OPTIONS = {"num_warps": 4, "sanitize_overflow": False, "enable_fp_fusion": True}

_TL_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}

# the constants of ._stochastic, as uint32 (Triton kernels read globals only as constexpr)
_M1 = tl.constexpr(0x7FEB352D)
_M2 = tl.constexpr(0x846CA68B)
_GOLDEN = tl.constexpr(0x9E3779B9)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _mix(h):
    """lowbias32 on uint32, as :func:`polyak._kernels._stochastic._mix` (the per-update key)."""
    h = (h ^ (h >> 16)) * _M1
    h = (h ^ (h >> 15)) * _M2
    return h ^ (h >> 16)


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """``x`` (fp32 or fp64) to ``DTYPE``, to nearest even.

    bf16 rounds in integer arithmetic, as ATen does (add ``0x7FFF`` plus the lowest kept bit, clear
    the low 16 bits; NaN stays a quiet NaN): Triton's CPU interpreter truncates a plain cast.
    """
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is the constexpr parameter)
        raw = x.to(tl.float32).to(tl.uint32, bitcast=True)
        nan = (raw & 0x7FFFFFFF) > 0x7F800000
        rounded = (raw + 0x7FFF + ((raw >> 16) & 1)) & 0xFFFF0000
        return tl.where(nan, raw | 0x00400000, rounded).to(tl.float32, bitcast=True).to(DTYPE)
    else:
        return x.to(DTYPE)


@triton.jit
def _block(
    shadow, source, offsets, mask, w, key, stream_start, SHADOW, COMPUTE, STOCHASTIC: tl.constexpr
):
    """One block of one tensor: ``s = lerp(s, p, w)``, rounded into the shadow (``mask``: the tail)."""
    s = tl.load(shadow + offsets, mask=mask).to(COMPUTE)
    if STOCHASTIC:
        p = tl.load(source + offsets, mask=mask).to(COMPUTE)
    else:  # the reference casts the source to the shadow's dtype first
        p = _round(tl.load(source + offsets, mask=mask), SHADOW).to(COMPUTE)
    diff = p - s
    value = tl.where(tl.abs(w) < 0.5, s + w * diff, p - diff * (1.0 - w))

    if STOCHASTIC:  # the stream and rounding of ._stochastic, in uint32
        h = ((stream_start + offsets).to(tl.uint32) + key) * _M1
        h = (h ^ (h >> 16)) * _M2
        bits = h >> 16
        raw = value.to(tl.uint32, bitcast=True)
        bits = tl.where((raw >> 31) != 0, bits ^ 0xFFFF, bits)  # negative: round down w.p. 1-frac
        finite = (raw & 0x7F800000) != 0x7F800000
        rounded = tl.where(finite, (raw + bits) & 0xFFFF0000, raw)
        tl.store(shadow + offsets, rounded.to(tl.float32, bitcast=True).to(SHADOW), mask=mask)
    else:
        tl.store(shadow + offsets, _round(value, SHADOW), mask=mask)


@triton.jit
def _lerp_kernel(
    shadow_ptrs,
    source_ptrs,
    numels,
    stream_starts,
    block_tensor,
    block_start,
    weight_ptr,
    seed_ptr,
    counter_ptr,
    SHADOW: tl.constexpr,
    SOURCE: tl.constexpr,
    COMPUTE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor + pid)
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK)  # blocks start at multiples of BLOCK
    numel = tl.load(numels + tensor)
    shadow = tl.load(shadow_ptrs + tensor).to(tl.pointer_type(SHADOW))
    source = tl.load(source_ptrs + tensor).to(tl.pointer_type(SOURCE))
    # every address of the group is 16-byte aligned (checked on the host): 128-bit accesses
    if ALIGNED:
        shadow = tl.multiple_of(shadow, 16)
        source = tl.multiple_of(source, 16)
    offsets = start + tl.arange(0, BLOCK).to(tl.int64)

    w = tl.load(weight_ptr).to(COMPUTE)
    key = 0  # (tl.zeros here fails in the interpreter once triton was imported without it)
    stream_start = 0
    if STOCHASTIC:
        key = _mix(
            _mix(tl.load(seed_ptr).to(tl.uint32)) + tl.load(counter_ptr).to(tl.uint32) * _GOLDEN
        )
        stream_start = tl.load(stream_starts + tensor)
    if start + BLOCK <= numel:  # a whole block: no mask, so loads and stores can be vectorised
        _block(shadow, source, offsets, None, w, key, stream_start, SHADOW, COMPUTE, STOCHASTIC)
    else:
        _block(
            shadow,
            source,
            offsets,
            offsets < numel,
            w,
            key,
            stream_start,
            SHADOW,
            COMPUTE,
            STOCHASTIC,
        )


def _addresses(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(map(torch.Tensor.data_ptr, tensors))


def _fill(table: torch.Tensor, values: list[int] | tuple[int, ...]) -> None:
    """``table[:] = values`` without blocking the host: from pinned memory when on CUDA."""
    host = torch.tensor(values, dtype=table.dtype, pin_memory=table.is_cuda)
    table.copy_(host, non_blocking=table.is_cuda)


def _table(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    table = torch.empty(len(values), dtype=dtype, device=device)
    _fill(table, values)
    return table


def _dense_alike(shadow: torch.Tensor, source: torch.Tensor) -> bool:
    """Both cover one dense block of memory in the same element order (so flat indexing works)."""
    if shadow.shape != source.shape or shadow.stride() != source.stride():
        return False
    return all(
        t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        for t in (shadow, source)
    )


class _Group:
    """The tables of one (device, dtype) group; rebuilt when a tensor's address changes."""

    def __init__(
        self, shadows: list[torch.Tensor], sources: list[torch.Tensor], starts: list[int]
    ) -> None:
        self.shadows, self.sources = shadows, sources
        self.device = shadows[0].device
        self.shadow_dtype, self.source_dtype = shadows[0].dtype, sources[0].dtype
        self.compute = tl.float64 if self.shadow_dtype == torch.float64 else tl.float32
        numels = [s.numel() for s in shadows]
        blocks = [triton.cdiv(n, BLOCK) for n in numels]
        self.n_blocks = sum(blocks)
        block_tensor = [i for i, n in enumerate(blocks) for _ in range(n)]
        block_start = [b * BLOCK for n in blocks for b in range(n)]
        self.numels = _table(numels, torch.int64, self.device)
        self.stream_starts = _table(starts, torch.int64, self.device)
        self.block_tensor = _table(block_tensor, torch.int32, self.device)
        self.block_start = _table(block_start, torch.int64, self.device)
        shadow_addresses = _addresses(shadows)
        self.shadow_ptrs = _table(list(shadow_addresses), torch.int64, self.device)
        self.source_ptrs = torch.empty(len(sources), dtype=torch.int64, device=self.device)
        self.shadow_aligned = all(a % 16 == 0 for a in shadow_addresses)
        self.planned: tuple[int, ...] = ()
        self.refresh()

    def refresh(self) -> None:
        """Point the tables at the sources' current storage, if it moved since the last update."""
        now = _addresses(self.sources)
        if now == self.planned:
            return
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "the model's weights moved to new storage (param.data = ..., model.to()) since "
                "the last update, and a CUDA graph is being captured: the Triton kernel's address "
                "tables cannot be rebuilt inside a capture. Run one ema.update() before capturing."
            )
        for shadow, source in zip(self.shadows, self.sources, strict=True):
            if (
                source.dtype != self.source_dtype
                or source.device != self.device
                or not _dense_alike(shadow, source)
            ):
                raise RuntimeError(
                    f"a tracked tensor changed since the EMA was built (now {source.dtype} "
                    f"{tuple(source.shape)} on {source.device}, strides {source.stride()}; its "
                    f"shadow is {shadow.dtype} on {shadow.device}, strides {shadow.stride()}); "
                    f"call ema.to(device) after moving the model, or build the EMA after "
                    f"changing dtypes or memory formats."
                )
        _fill(self.source_ptrs, now)
        self.aligned = self.shadow_aligned and all(address % 16 == 0 for address in now)
        self.planned = now


class TritonUpdate:
    """One Triton launch per (device, dtype) group; optionally stochastic rounding into bf16."""

    def __init__(
        self,
        shadows: list[torch.Tensor],
        sources: list[torch.Tensor],
        *,
        stochastic: bool = False,
        seed: int = 0,
    ) -> None:
        check_applicable(shadows, sources)
        if stochastic:
            require_bf16_shadows(shadows)
        self.stochastic = stochastic
        start = {id(s): o for s, o in zip(shadows, segment_offsets(shadows), strict=True)}
        self.all_shadows, self.all_sources = shadows, sources
        self.groups: list[_Group] = []
        for (_, shadow_dtype, _), (group_shadows, group_sources) in group_by_device_and_dtype(
            shadows, sources
        ).items():
            if not shadow_dtype.is_floating_point:
                continue  # copied, never averaged
            starts = [start[id(s)] for s in group_shadows]
            self.groups.append(_Group(group_shadows, group_sources, starts))
        devices = {g.device for g in self.groups}
        self.state = DeviceState(devices, seed)

    def lerp_(self, weight: float | torch.Tensor) -> None:
        self.state.fill(weight)
        if self.stochastic:
            self.state.advance()
        for group in self.groups:
            # Triton launches on the current device: make it the group's
            with torch.cuda.device(group.device) if group.device.type == "cuda" else nullcontext():
                group.refresh()
                if group.n_blocks:
                    self._launch(group, weight)

    def _launch(self, group: _Group, weight: float | torch.Tensor) -> None:
        device = group.device
        _lerp_kernel[(group.n_blocks,)](
            group.shadow_ptrs,
            group.source_ptrs,
            group.numels,
            group.stream_starts,
            group.block_tensor,
            group.block_start,
            self.state.weight(weight, device),
            self.state.seeds[device],
            self.state.counters[device],
            SHADOW=_TL_DTYPES[group.shadow_dtype],
            SOURCE=_TL_DTYPES[group.source_dtype],
            COMPUTE=group.compute,
            STOCHASTIC=self.stochastic,
            ALIGNED=group.aligned,
            BLOCK=BLOCK,
            **LAUNCH_OPTIONS,
        )

    def copy_(self) -> None:
        if self.all_shadows:
            torch._foreach_copy_(self.all_shadows, self.all_sources)


def check_applicable(shadows: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """Raise a clear error when the Triton kernel cannot run on these tensors."""
    if not interpreting():
        elsewhere = sorted({str(t.device) for t in shadows if not t.is_cuda})
        if elsewhere:
            raise ValueError(
                f"kernel='triton' runs on CUDA tensors, but shadows live on {elsewhere}; use "
                f"kernel='auto' (or run under TRITON_INTERPRET=1 to test Triton on the CPU)."
            )
    for index, (shadow, source) in enumerate(zip(shadows, sources, strict=True)):
        if shadow.is_floating_point() and shadow.dtype not in _TL_DTYPES:
            raise ValueError(
                f"kernel='triton' handles {[str(d) for d in _TL_DTYPES]} shadows, got "
                f"{shadow.dtype}; use kernel='foreach'."
            )
        if shadow.is_floating_point() and not _dense_alike(shadow, source):
            raise ValueError(
                f"kernel='triton' needs each tensor dense and laid out like its shadow, but "
                f"tensor {index} has shape {tuple(source.shape)} and strides {source.stride()} "
                f"(shadow strides {shadow.stride()}); use kernel='foreach' for such models."
            )
