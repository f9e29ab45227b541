"""Where and when an update runs: inline, on a side CUDA stream, or offloaded to the host.

An engine owns the two planned updates of an EMA (averaged tensors, copied tensors) and runs them
under one execution policy, each a class of its own (:func:`Engine` picks one by name):

- ``inline`` (:class:`Inline`): on the caller's stream, in order with everything else.
- ``side`` (:class:`SideStream`): on a side CUDA stream that first waits for the caller's stream (so it sees the weights
  the optimizer just wrote), overlapping the next forward pass. An event marks its end; before any
  ``optimizer.step()`` (a global optimizer pre-hook) and before any read of the shadows, the
  caller's stream waits on that event, so no weight is written while the update still reads it and
  no shadow is read mid-update. No host synchronisation anywhere.
- ``offload`` (:class:`Offload`): shadows in (pinned) host memory. The weights are copied device-to-host into pinned
  staging buffers on a side stream, and a worker thread waits for that copy and runs the CPU
  multi-tensor update. At most one update is in flight: the next call first waits for the previous
  one (bounded staleness), and reads of the shadows wait too.

Only an optimizer writes an ``nn.Parameter`` between two updates (:func:`optimizer_owned`; the
engine is told which sources are, since it sees DTensors' local shards, plain tensors), and
``optimizer.step()`` waits; the next forward pass writes buffers (BatchNorm's running statistics) while a side stream could
still be reading them. So under ``side`` and ``offload`` every tracked tensor that is not an
``nn.Parameter`` is first copied on the caller's stream, in order with that forward pass: into a
device snapshot that the side stream reads (``side``), or straight into its pinned staging buffer
(``offload``). Buffers are small (BatchNorm's are ~0.1% of a ResNet's weights); a plain tensor
passed as a ``(name, tensor)`` pair costs a snapshot of its size.

``run(weights, gate=None, copy_gate=None)`` hands the kernel's ``lerp_`` its weights (one per slot,
or one weight) and an optional device gate (a 0-dim bool tensor: true skips the update), and the
copies theirs, each read where the update runs: on the side stream after it waited for the
caller's, or staged to the host with the weights.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from polyak._kernels._base import Update

POLICIES = ("inline", "side", "offload")


def optimizer_owned(tensor: torch.Tensor) -> bool:
    """Whether only an optimizer writes ``tensor`` between updates: an ``nn.Parameter``, a
    sharded (DTensor) one included, whose local shard the optimizer alone writes too.

    Ask it of the tracked tensor itself, not of the local view a kernel reads: a DTensor's local
    shard is a plain tensor, never a Parameter. The EMA passes :class:`Engine` these flags.
    """
    return isinstance(tensor, torch.nn.Parameter)


Planner = Callable[[list[torch.Tensor], list[torch.Tensor]], Update]
Pairs = tuple[list[torch.Tensor], list[torch.Tensor]]
Owned = Sequence[bool] | None  # per source (averaged, then copied): written by an optimizer only
Weights = Any  # float | Tensor | Sequence[float | Tensor]: one per slot (see Update.lerp_)


def _lerp(update: Update, weights: Weights, gate: torch.Tensor | None) -> None:
    if gate is None:
        update.lerp_(weights)
    else:
        update.lerp_(weights, gate)  # type: ignore[call-arg]


def _copy(update: Update, gate: torch.Tensor | None) -> None:
    if gate is None:
        update.copy_()
    else:
        update.copy_(gate)


class Inline:
    """The update on the caller's stream, in order with everything else."""

    policy = "inline"

    def __init__(
        self, build_avg: Planner, build_copy: Planner, avg: Pairs, copy: Pairs, owned: Owned = None
    ) -> None:
        self.avg, self.copy = build_avg(*avg), build_copy(*copy)

    def run(
        self,
        weights: Weights,
        gate: torch.Tensor | None = None,
        copy_gate: torch.Tensor | None = None,
    ) -> None:
        """One averaging update with lerp weight(s) ``weights`` (= 1 - decay); ``gate`` skips the
        averaging, ``copy_gate`` the copies (0-dim bool tensors, True to skip)."""
        _lerp(self.avg, weights, gate)
        _copy(self.copy, copy_gate)

    def wait(self) -> None:
        """Before reading or writing the shadows: nothing to wait for inline."""


class _WaitsBeforeStep:
    """A global optimizer pre-hook: before any ``optimizer.step()``, the caller's stream waits
    until the last update has read the weights (a device-side wait, not a host sync)."""

    stream: Any
    _event: Any

    def _hook_optimizer_steps(self) -> None:
        ref = weakref.ref(self)

        def wait_before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            engine = ref()
            # the hook is global: a step being captured (another model's) cannot wait on an
            # event recorded outside its graph, and an eager update never runs inside one
            if engine is not None and not torch.cuda.is_current_stream_capturing():
                engine.wait_device()

        self._hook = torch.optim.optimizer.register_optimizer_step_pre_hook(wait_before_step)
        weakref.finalize(self, self._hook.remove)

    def wait_device(self) -> None:
        """Make the caller's stream wait for the last update's reads (no host sync)."""
        if self._event is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self._event)


class SideStream(_WaitsBeforeStep):
    """The update on a side CUDA stream that waits for the caller's stream; buffers snapshotted."""

    policy = "side"

    def __init__(
        self, build_avg: Planner, build_copy: Planner, avg: Pairs, copy: Pairs, owned: Owned = None
    ) -> None:
        sources = avg[1] + copy[1]
        if not (sources and all(t.is_cuda for t in sources)):
            raise ValueError(
                "stream='side' needs the tracked tensors on a CUDA device; on the CPU leave "
                "stream=None (the update runs inline)."
            )
        self.stream = torch.cuda.Stream(device=sources[0].device)
        self._event = torch.cuda.Event()
        flags = _owned(sources, owned)
        self.snap_src = [t for t, mine in zip(sources, flags, strict=True) if not mine]
        self.snap_dst = [torch.empty_like(t) for t in self.snap_src]
        read = {id(t): s for t, s in zip(self.snap_src, self.snap_dst, strict=True)}
        avg = (avg[0], [read.get(id(t), t) for t in avg[1]])
        copy = (copy[0], [read.get(id(t), t) for t in copy[1]])
        self.avg, self.copy = build_avg(*avg), build_copy(*copy)
        self._hook_optimizer_steps()

    def run(
        self,
        weights: Weights,
        gate: torch.Tensor | None = None,
        copy_gate: torch.Tensor | None = None,
    ) -> None:
        if self.snap_src:  # once the previous update has read the last snapshot
            self.wait_device()
            torch._foreach_copy_(self.snap_dst, self.snap_src)
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            _lerp(self.avg, weights, gate)
            _copy(self.copy, copy_gate)
        self._event.record(self.stream)

    def wait(self) -> None:
        """Before reading or writing the shadows: the caller's stream waits for the update."""
        self.wait_device()


class Offload(_WaitsBeforeStep):
    """Shadows on the host: sources staged into pinned buffers, the update on a worker thread."""

    policy = "offload"

    def __init__(
        self, build_avg: Planner, build_copy: Planner, avg: Pairs, copy: Pairs, owned: Owned = None
    ) -> None:
        sources = avg[1] + copy[1]
        cuda = bool(sources) and all(t.is_cuda for t in sources)
        self.stream = torch.cuda.Stream(device=sources[0].device) if cuda else None
        self._event = torch.cuda.Event() if cuda else None
        staged = [
            torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=cuda) for t in sources
        ]
        self.sources: list[torch.Tensor] = []
        self.staging: list[torch.Tensor] = []
        self.snap_src: list[torch.Tensor] = []
        self.snap_dst: list[torch.Tensor] = []
        for source, stage, mine in zip(sources, staged, _owned(sources, owned), strict=True):
            direct = mine or not cuda
            (self.sources if direct else self.snap_src).append(source)
            (self.staging if direct else self.snap_dst).append(stage)
        n = len(avg[1])
        self.avg, self.copy = build_avg(avg[0], staged[:n]), build_copy(copy[0], staged[n:])
        self._gates: dict[str, torch.Tensor] = {}  # each gate's host copy, made at its first use
        self._future: Future[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polyak-offload")
        if self._event is not None:
            self._hook_optimizer_steps()

    def _staged_gate(self, gate: torch.Tensor | None, role: str) -> torch.Tensor | None:
        """The gate as the host update will read it: a pinned copy staged with the weights."""
        if gate is None or not gate.is_cuda:
            return gate
        if role not in self._gates:
            self._gates[role] = torch.empty((), dtype=gate.dtype, device="cpu", pin_memory=True)
        return self._gates[role]

    def run(
        self,
        weights: Weights,
        gate: torch.Tensor | None = None,
        copy_gate: torch.Tensor | None = None,
    ) -> None:
        self.wait_host()  # bounded staleness: one update in flight at most
        host_gate = self._staged_gate(gate, "lerp")
        host_copy_gate = self._staged_gate(copy_gate, "copy")
        if self.stream is not None:
            if self.snap_src:  # buffers: on the caller's stream, before the next forward
                torch._foreach_copy_(self.snap_dst, self.snap_src, non_blocking=True)
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
            with torch.cuda.stream(self.stream):
                if self.sources:
                    torch._foreach_copy_(self.staging, self.sources, non_blocking=True)
                for staged, given in ((host_gate, gate), (host_copy_gate, copy_gate)):
                    if staged is not given:
                        staged.copy_(given, non_blocking=True)  # type: ignore[union-attr]
            self._event.record(self.stream)
        else:  # CPU sources: stage synchronously so the optimizer cannot race the worker
            torch._foreach_copy_(self.staging, self.sources)
        self._future = self._pool.submit(self._host_update, weights, host_gate, host_copy_gate)

    def _host_update(
        self, weights: Weights, gate: torch.Tensor | None, copy_gate: torch.Tensor | None
    ) -> None:
        if self._event is not None:
            self._event.synchronize()  # on the worker thread: the caller never blocks here
        with torch.no_grad():
            _lerp(self.avg, weights, gate)
            _copy(self.copy, copy_gate)

    def wait_host(self) -> None:
        """Block until an offloaded update has finished (and re-raise its error, if any)."""
        future, self._future = self._future, None
        if future is not None:
            future.result()

    def wait(self) -> None:
        """Before reading or writing the shadows: nothing may still be updating them."""
        self.wait_host()


Policy = Inline | SideStream | Offload
_POLICY_CLASSES: dict[str, type[Policy]] = {
    "inline": Inline,
    "side": SideStream,
    "offload": Offload,
}


def Engine(
    build_avg: Planner,
    build_copy: Planner,
    avg: Pairs,
    copy: Pairs,
    policy: str = "inline",
    owned: Owned = None,
) -> Policy:
    """Plan the averaged and copied updates under the named execution policy (a factory keeping
    the name callers used when the engine was one class).

    ``owned``: per source (the averaged ones, then the copied ones), whether only an optimizer
    writes it (:func:`optimizer_owned` of the tracked tensor); by default asked of the sources
    themselves, which is right only where they are the tracked tensors (not DTensor local shards).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown execution policy {policy!r}; expected one of {POLICIES}.")
    return _POLICY_CLASSES[policy](build_avg, build_copy, avg, copy, owned)


def _owned(sources: list[torch.Tensor], owned: Owned) -> list[bool]:
    """The flags given, checked against the sources, or :func:`optimizer_owned` of each."""
    if owned is None:
        return [optimizer_owned(t) for t in sources]
    if len(owned) != len(sources):
        raise ValueError(
            f"owned: expected one flag per source ({len(sources)}: averaged, then copied), got "
            f"{len(owned)}."
        )
    return list(owned)
