"""Spawned gloo runs on the CPU, one launch per world size for the whole test session.

Starting ranks costs 6-10 s (each imports torch and joins the group), so every scenario of a
world size runs in one launch: each test module that needs ranks lists its scenarios in
``SCENARIOS = {world: [function, ...]}`` and is named in :data:`MODULES`. A scenario is
``function(ctx) -> dict`` of plain data and tensors, run on every rank in order; what it returns is
saved per rank and handed to the tests (``conftest.py``'s ``ranks2`` and ``ranks4`` fixtures). An
exception in a scenario is recorded with its traceback (the test reading that scenario fails with
it) and the launch goes on with the next one.

Helpers the scenarios share: :class:`Collectives` counts every collective a block of code runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
# with SCENARIOS, run in this order (test_docs: the docs' "# runs in: torchrun" blocks)
MODULES = ("tests.test_fsdp2", "tests.test_distributed", "tests.test_docs")


def skip_reason() -> str | None:
    if not torch.distributed.is_available():
        return "torch.distributed is not available in this torch build"
    if not torch.distributed.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "torch.distributed.fsdp.fully_shard (FSDP2) is not available in this torch"
    return None


@dataclasses.dataclass
class Context:
    """What a scenario gets: its rank, the world size, a directory shared by the ranks of this
    launch, and ``inputs`` from earlier launches (e.g. a checkpoint's path)."""

    rank: int
    world: int
    tmp: Path
    inputs: dict[str, Any]


def launch(world: int, tmp: Path, inputs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run every module's scenarios for ``world`` on ``world`` spawned gloo ranks; per rank,
    scenario name -> what it returned (or ``{"error": traceback}``)."""
    import torch.multiprocessing as mp

    if skip_reason() is not None:
        pytest.skip(str(skip_reason()))
    tmp.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world, str(tmp), inputs or {}), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _worker(rank: int, world: int, tmp: str, inputs: dict[str, Any]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/init",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    if str(HERE.parent) not in sys.path:  # the repository root: tests.* importable
        sys.path.insert(0, str(HERE.parent))
    ctx = Context(rank, world, Path(tmp), inputs)
    out: dict[str, Any] = {}
    try:
        for module in MODULES:
            for scenario in importlib.import_module(module).SCENARIOS.get(world, []):
                name = _key(module, scenario)
                try:
                    out[name] = scenario(ctx)
                except Exception:  # recorded for the test that reads it; the launch goes on
                    out[name] = {"error": traceback.format_exc()}
                dist.barrier()
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _key(module: str, scenario: Callable[..., Any]) -> str:
    """A scenario's name in the results: its module's last part (pytest imports ``tests/x.py`` as
    ``x``, the ranks as ``tests.x``) and its function's name."""
    return f"{module.rpartition('.')[2]}.{scenario.__name__}"


def results(ranks: list[dict[str, Any]], module: str, scenario: Callable[..., Any]) -> list[dict]:
    """Each rank's output of ``scenario``; fails the calling test with a rank's traceback."""
    name = _key(module, scenario)
    outs = [seen[name] for seen in ranks]
    for rank, seen in enumerate(outs):
        if "error" in seen:
            pytest.fail(f"scenario {name} failed on rank {rank}:\n{seen['error']}", pytrace=False)
    return outs


# ---------------------------------------------------------------------- counting collectives

# torch.distributed's functions that communicate (the eager ones dispatch c10d ops as well;
# patched too, so that one that bypassed the dispatcher would still be counted)
_COLLECTIVE_FUNCTIONS = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "irecv",
    "isend",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
)
# operator namespaces of collectives: eager c10d ops (c10d.allreduce_, c10d.barrier, ...) and the
# functional collectives that DTensor redistributions run (_c10d_functional.all_gather_into_tensor)
_COLLECTIVE_NAMESPACES = (
    "c10d",
    "_c10d_functional",
    "c10d_functional",
    "_c10d_functional_autograd",
)


class Collectives(TorchDispatchMode):
    """Counts the collectives run inside ``with Collectives() as seen:`` in ``seen.calls``.

    A dispatch mode sees every operator below DTensor, so a DTensor redistribution (its hidden
    all-gathers), an eager collective and a barrier all show as operators of the c10d namespaces;
    ``torch.distributed``'s Python functions are patched as well. (``CommDebugMode`` counts only
    DTensor's functional collectives: it misses barriers and eager calls.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._stack = contextlib.ExitStack()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.namespace in _COLLECTIVE_NAMESPACES:
            self.calls.append(f"{func.namespace}.{func.__name__}")
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> Collectives:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        patch = self._stack.enter_context(pytest.MonkeyPatch.context())
        for module in (dist, c10d):
            for name in _COLLECTIVE_FUNCTIONS:
                original = getattr(module, name, None)
                if original is not None:
                    patch.setattr(module, name, self._counted(name, original))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._stack.close()

    def _counted(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(f"torch.distributed.{name}")
            return original(*args, **kwargs)

        return counted


@contextlib.contextmanager
def counting() -> Iterator[Collectives]:
    with Collectives() as seen:
        yield seen
