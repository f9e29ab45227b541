"""Where and when an update runs: inline, on a side CUDA stream, or offloaded to the host.

The engine owns the two planned updates of an EMA (averaged tensors, copied tensors) and the
execution policy chosen at construction:

- ``inline``: on the caller's stream, in order with everything else.
- ``side``: on a side CUDA stream that first waits for the caller's stream (so it sees the weights
  the optimizer just wrote), overlapping the next forward pass. An event marks its end; before any
  ``optimizer.step()`` (a global optimizer pre-hook) and before any read of the shadows, the
  caller's stream waits on that event, so no weight is written while the update still reads it and
  no shadow is read mid-update. No host synchronisation anywhere.
- ``offload``: shadows in (pinned) host memory. The weights are copied device-to-host into pinned
  staging buffers on a side stream, and a worker thread waits for that copy and runs the CPU
  multi-tensor update. At most one update is in flight: the next call first waits for the previous
  one (bounded staleness), and reads of the shadows wait too.

Only an optimizer writes an ``nn.Parameter`` between two updates, and ``optimizer.step()`` waits;
the next forward pass writes buffers (BatchNorm's running statistics) while a side stream could
still be reading them. So under ``side`` and ``offload`` every tracked tensor that is not an
``nn.Parameter`` is first copied on the caller's stream, in order with that forward pass: into a
device snapshot that the side stream reads (``side``), or straight into its pinned staging buffer
(``offload``). Buffers are small (BatchNorm's are ~0.1% of a ResNet's weights); a plain tensor
passed as a ``(name, tensor)`` pair costs a snapshot of its size.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from polyak._kernels._base import Update

POLICIES = ("inline", "side", "offload")


def _optimizer_owned(tensor: torch.Tensor) -> bool:
    """Whether only an optimizer writes ``tensor`` between updates (an ``nn.Parameter``)."""
    return isinstance(tensor, torch.nn.Parameter)


class Engine:
    """Runs ``avg.lerp_(w)`` and ``copy.copy_()`` under one execution policy."""

    def __init__(
        self,
        build_avg: Callable[[list[torch.Tensor], list[torch.Tensor]], Update],
        build_copy: Callable[[list[torch.Tensor], list[torch.Tensor]], Update],
        avg: tuple[list[torch.Tensor], list[torch.Tensor]],
        copy: tuple[list[torch.Tensor], list[torch.Tensor]],
        policy: str = "inline",
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown execution policy {policy!r}; expected one of {POLICIES}.")
        self.policy = policy
        self._event: Any = None
        self._future: Future[None] | None = None
        self._hook: Any = None
        self.snap_dst: list[torch.Tensor] = []
        self.snap_src: list[torch.Tensor] = []
        if policy == "inline":
            self.avg, self.copy = build_avg(*avg), build_copy(*copy)
            return
        sources = avg[1] + copy[1]
        cuda = bool(sources) and all(t.is_cuda for t in sources)
        if policy == "side":
            if not cuda:
                raise ValueError(
                    "stream='side' needs the tracked tensors on a CUDA device; on the CPU leave "
                    "stream=None (the update runs inline)."
                )
            self.stream = torch.cuda.Stream(device=sources[0].device)
            self._event = torch.cuda.Event()
            self.snap_src = [t for t in sources if not _optimizer_owned(t)]
            self.snap_dst = [torch.empty_like(t) for t in self.snap_src]
            read = {id(t): s for t, s in zip(self.snap_src, self.snap_dst, strict=True)}
            avg = (avg[0], [read.get(id(t), t) for t in avg[1]])
            copy = (copy[0], [read.get(id(t), t) for t in copy[1]])
            self.avg, self.copy = build_avg(*avg), build_copy(*copy)
        else:  # offload: shadows live on the host; sources are staged into pinned host buffers
            self.stream = torch.cuda.Stream(device=sources[0].device) if cuda else None
            self._event = torch.cuda.Event() if cuda else None
            staged = [
                torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=cuda) for t in sources
            ]
            self.sources, self.staging = [], []
            for source, stage in zip(sources, staged, strict=True):
                owned = _optimizer_owned(source) or not cuda
                (self.sources if owned else self.snap_src).append(source)
                (self.staging if owned else self.snap_dst).append(stage)
            n = len(avg[1])
            self.avg, self.copy = build_avg(avg[0], staged[:n]), build_copy(copy[0], staged[n:])
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polyak-offload")
        if self._event is not None:
            # before any optimizer.step(): the caller's stream waits until the update has read
            # the weights (a device-side wait, not a host sync)
            ref = weakref.ref(self)

            def wait_before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
                engine = ref()
                # the hook is global: a step being captured (another model's) cannot wait on an
                # event recorded outside its graph, and an eager update never runs inside one
                if engine is not None and not torch.cuda.is_current_stream_capturing():
                    engine.wait_device()

            self._hook = torch.optim.optimizer.register_optimizer_step_pre_hook(wait_before_step)
            weakref.finalize(self, self._hook.remove)

    def run(self, weight: float | torch.Tensor) -> None:
        """One averaging update with lerp weight ``weight`` (= 1 - decay)."""
        if self.policy == "inline":
            self.avg.lerp_(weight)
            self.copy.copy_()
        elif self.policy == "side":
            if self.snap_src:  # once the previous update has read the last snapshot
                self.wait_device()
                torch._foreach_copy_(self.snap_dst, self.snap_src)
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
            with torch.cuda.stream(self.stream):
                self.avg.lerp_(weight)
                self.copy.copy_()
            self._event.record(self.stream)
        else:
            self.wait_host()  # bounded staleness: one update in flight at most
            if self.stream is not None:
                if self.snap_src:  # buffers: on the caller's stream, before the next forward
                    torch._foreach_copy_(self.snap_dst, self.snap_src, non_blocking=True)
                self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
                if self.sources:
                    with torch.cuda.stream(self.stream):
                        torch._foreach_copy_(self.staging, self.sources, non_blocking=True)
                self._event.record(self.stream)
            else:  # CPU sources: stage synchronously so the optimizer cannot race the worker
                torch._foreach_copy_(self.staging, self.sources)
            self._future = self._pool.submit(self._host_update, weight)

    def _host_update(self, weight: float | torch.Tensor) -> None:
        if self._event is not None:
            self._event.synchronize()  # on the worker thread: the caller never blocks here
        with torch.no_grad():
            self.avg.lerp_(weight)
            self.copy.copy_()

    def wait_device(self) -> None:
        """Make the caller's stream wait for the last update's reads (no host sync)."""
        if self._event is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self._event)

    def wait_host(self) -> None:
        """Block until an offloaded update has finished (and re-raise its error, if any)."""
        future, self._future = self._future, None
        if future is not None:
            future.result()

    def wait(self) -> None:
        """Before reading or writing the shadows: nothing may still be updating them."""
        if self.policy == "side":
            self.wait_device()
        elif self.policy == "offload":
            self.wait_host()
