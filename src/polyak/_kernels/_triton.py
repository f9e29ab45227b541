"""The Triton path: one kernel launch per (device, dtype) group, however many tensors it holds.

A launch covers every tensor of a group through tables built once at construction: the address of
each shadow (of each of the N slots) and source, each tensor's element count and each shadow's
start in the random stream, and for each program (a block of ``BLOCK`` elements) the tensor it works
on and where in it. A program reads its block of the source once and, for each slot, reads and
writes that slot's shadow once, upcasting bf16/fp16 sources in registers, so the bytes moved are the
floor (``p + 2N s`` per element: 10 for bf16 weights with one fp32 slot, 12 for fp32, 20 for two
fp32 slots, 6 for bf16 shadows with stochastic rounding), nothing is allocated per update, nothing is
compiled per tensor (one compilation per dtype combination and N, about a second), and the N
weights ``w_k = 1 - decay_k`` are read from the device, so the update is CUDA-graph capturable.

The gate (a 0-dim bool tensor on the device, or a persistent False one) is the first thing each
program loads; where it is set the program returns before any store, so every shadow keeps its
bits, whatever the source holds.

Per element, in the shadow's compute precision (fp32, or fp64 for fp64 shadows), as ``torch.lerp``::

    s_k <- s_k + w_k (p - s_k)          if |w_k| < 0.5
    s_k <- p - (p - s_k)(1 - w_k)       otherwise

then rounded to the shadow dtype: to nearest, or stochastically into bf16 with exactly the random
stream of :mod:`._stochastic` (same seed, counter and element offsets give the same bits; slot k at
the offsets of ``stream_offsets(shadows, k)``).

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
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from polyak._kernels._base import SlotKernel, group_slots
from polyak._kernels._foreach import gated_copy_
from polyak._kernels._stochastic import stream_offsets

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
    shadow, p, offsets, mask, w, key, stream_start, SHADOW, COMPUTE, STOCHASTIC: tl.constexpr
):
    """One block of one slot's shadow: ``s = lerp(s, p, w)`` (``p`` loaded, in ``COMPUTE``),
    rounded into the shadow (``mask``: the tail)."""
    s = tl.load(shadow + offsets, mask=mask).to(COMPUTE)
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
def _slots(
    shadow_ptrs,
    source,
    stream_starts,
    weight_ptr,
    tensor,
    offsets,
    mask,
    key,
    SHADOW,
    COMPUTE,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    SLOTS: tl.constexpr,
):
    """One block of one tensor in every slot: the source block is loaded once, for all N slots."""
    if STOCHASTIC:
        p = tl.load(source + offsets, mask=mask).to(COMPUTE)
    else:  # the reference casts the source to the shadow's dtype first
        p = _round(tl.load(source + offsets, mask=mask), SHADOW).to(COMPUTE)
    for k in tl.static_range(SLOTS):  # tables are [tensor][slot]
        shadow = tl.load(shadow_ptrs + tensor * SLOTS + k).to(tl.pointer_type(SHADOW))
        if ALIGNED:
            shadow = tl.multiple_of(shadow, 16)
        w = tl.load(weight_ptr + k).to(COMPUTE)
        stream_start = 0
        if STOCHASTIC:
            stream_start = tl.load(stream_starts + tensor * SLOTS + k)
        _block(shadow, p, offsets, mask, w, key, stream_start, SHADOW, COMPUTE, STOCHASTIC)


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
    gate_ptr,
    SHADOW: tl.constexpr,
    SOURCE: tl.constexpr,
    COMPUTE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    SLOTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if tl.load(gate_ptr):  # a skipped update: no store at all
        return
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor + pid)
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK)  # blocks start at multiples of BLOCK
    numel = tl.load(numels + tensor)
    source = tl.load(source_ptrs + tensor).to(tl.pointer_type(SOURCE))
    # every address of the group is 16-byte aligned (checked on the host): 128-bit accesses
    if ALIGNED:
        source = tl.multiple_of(source, 16)
    offsets = start + tl.arange(0, BLOCK).to(tl.int64)

    key = 0  # (tl.zeros here fails in the interpreter once triton was imported without it)
    if STOCHASTIC:
        key = _mix(
            _mix(tl.load(seed_ptr).to(tl.uint32)) + tl.load(counter_ptr).to(tl.uint32) * _GOLDEN
        )
    if start + BLOCK <= numel:  # a whole block: no mask, so loads and stores can be vectorised
        _slots(
            shadow_ptrs,
            source,
            stream_starts,
            weight_ptr,
            tensor,
            offsets,
            None,
            key,
            SHADOW,
            COMPUTE,
            STOCHASTIC,
            ALIGNED,
            SLOTS,
        )
    else:
        _slots(
            shadow_ptrs,
            source,
            stream_starts,
            weight_ptr,
            tensor,
            offsets,
            offsets < numel,
            key,
            SHADOW,
            COMPUTE,
            STOCHASTIC,
            ALIGNED,
            SLOTS,
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
    """The tables of one (device, dtype) group; rebuilt when a source's address changes.

    ``slots[k]`` holds slot k's shadows of ``sources``; ``starts[k]`` their stream offsets.
    """

    def __init__(
        self, slots: list[list[torch.Tensor]], sources: list[torch.Tensor], starts: list[list[int]]
    ) -> None:
        self.slots, self.sources = slots, sources
        shadows = slots[0]
        self.device = shadows[0].device
        self.shadow_dtype, self.source_dtype = shadows[0].dtype, sources[0].dtype
        self.compute = tl.float64 if self.shadow_dtype == torch.float64 else tl.float32
        numels = [s.numel() for s in shadows]
        blocks = [triton.cdiv(n, BLOCK) for n in numels]
        self.n_blocks = sum(blocks)
        block_tensor = [i for i, n in enumerate(blocks) for _ in range(n)]
        block_start = [b * BLOCK for n in blocks for b in range(n)]
        # [tensor][slot] tables: one program reads its tensor's N entries side by side
        by_tensor = list(zip(*slots, strict=True))
        shadow_addresses = [a for tensors in by_tensor for a in _addresses(list(tensors))]
        self.numels = _table(numels, torch.int64, self.device)
        self.stream_starts = _table(
            [o for offsets in zip(*starts, strict=True) for o in offsets], torch.int64, self.device
        )
        self.block_tensor = _table(block_tensor, torch.int32, self.device)
        self.block_start = _table(block_start, torch.int64, self.device)
        self.shadow_ptrs = _table(shadow_addresses, torch.int64, self.device)
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
        for shadows in self.slots:
            for shadow, source in zip(shadows, self.sources, strict=True):
                if (
                    source.dtype != self.source_dtype
                    or source.device != self.device
                    or not _dense_alike(shadow, source)
                ):
                    raise RuntimeError(
                        f"a tracked tensor changed since the EMA was built (now {source.dtype} "
                        f"{tuple(source.shape)} on {source.device}, strides {source.stride()}; "
                        f"its shadow is {shadow.dtype} on {shadow.device}, strides "
                        f"{shadow.stride()}); call ema.to(device) after moving the model, or "
                        f"build the EMA after changing dtypes or memory formats."
                    )
        _fill(self.source_ptrs, now)
        self.aligned = self.shadow_aligned and all(address % 16 == 0 for address in now)
        self.planned = now


class TritonUpdate(SlotKernel):
    """One Triton launch per (device, dtype) group for all N slots; optionally stochastic rounding.

    ``slots[k][i]`` is slot ``k``'s shadow of ``sources[i]`` (a plain list of shadows is one slot).
    """

    def __init__(
        self,
        slots: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]],
        sources: list[torch.Tensor],
        *,
        stochastic: bool = False,
        seed: int = 0,
        positions: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        for shadows in self._take_slots(slots, sources, stochastic):
            check_applicable(shadows, sources)
        starts = [stream_offsets(self.slots[0], k, positions) for k in range(len(self.slots))]
        self.groups: list[_Group] = []
        for (_, shadow_dtype, _), index in group_slots(self.slots, sources):
            if not shadow_dtype.is_floating_point:
                continue  # copied, never averaged
            self.groups.append(
                _Group(
                    [[slot[i] for i in index] for slot in self.slots],
                    [sources[i] for i in index],
                    [[start[i] for i in index] for start in starts],
                )
            )
        self._keep_state({g.device for g in self.groups}, seed)

    def _run(self, weights: list[float | torch.Tensor], gate: torch.Tensor | None) -> None:
        if self.stochastic:  # once per update, gated or not
            self.state.advance()
        for group in self.groups:
            # Triton launches on the current device: make it the group's
            with torch.cuda.device(group.device) if group.device.type == "cuda" else nullcontext():
                group.refresh()
                if group.n_blocks:
                    self._launch(group, weights, gate)

    def _weights(self, weights: list[float | torch.Tensor], device: torch.device) -> torch.Tensor:
        """The N weights as N consecutive values on ``device``, for the kernel to read.

        One device weight is passed as is (the one-slot capturable update); otherwise device
        weights are copied into their slot of the persistent vector that :meth:`SlotState.fill`
        wrote the float weights into (a kernel per device weight, capturable).
        """
        if len(weights) == 1 and isinstance(weights[0], torch.Tensor):
            return weights[0]
        for view, weight in zip(self.state.slot_weights[device], weights, strict=True):
            if isinstance(weight, torch.Tensor):
                view.copy_(weight)
        return self.state.weights[device]

    def _launch(
        self, group: _Group, weights: list[float | torch.Tensor], gate: torch.Tensor | None
    ) -> None:
        device = group.device
        _lerp_kernel[(group.n_blocks,)](
            group.shadow_ptrs,
            group.source_ptrs,
            group.numels,
            group.stream_starts,
            group.block_tensor,
            group.block_start,
            self._weights(weights, device),
            self.state.seeds[device],
            self.state.counters[device],
            self.state.never[device] if gate is None else gate,
            SHADOW=_TL_DTYPES[group.shadow_dtype],
            SOURCE=_TL_DTYPES[group.source_dtype],
            COMPUTE=group.compute,
            STOCHASTIC=self.stochastic,
            ALIGNED=group.aligned,
            SLOTS=len(self.slots),
            BLOCK=BLOCK,
            **LAUNCH_OPTIONS,
        )

    def copy_(self, gate: torch.Tensor | None = None) -> None:
        """Every slot: :math:`s_k \\leftarrow p`, unless ``gate`` (see ``gated_copy_``)."""
        if gate is not None and gated_copy_(self, self.slots, self.sources, gate):
            return
        for shadows in self.slots:
            if shadows:
                torch._foreach_copy_(shadows, self.sources)


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
