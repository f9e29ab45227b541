"""The sharded update's speed relative to the unsharded one: FSDP2 ranks each update 1/world.

Run:
    PYTHONPATH=src python bench/sharded_speed.py --world 2                   # CPU, gloo, spawned
    PYTHONPATH=src python bench/sharded_speed.py --device cuda --world 1     # one GPU, NCCL
    PYTHONPATH=src torchrun --nproc-per-node 8 bench/sharded_speed.py --device cuda   # 8 GPUs

Every rank builds the same model (``--elements`` fp32 weights in ``--tensors`` square linear
layers) twice: a plain replica, and a copy sharded with FSDP2's ``fully_shard`` per layer. Rows,
timed round-robin on every rank in an order shuffled afresh each round, the same on every rank
(median per rank, rank 0 writes the JSON):

- ``unsharded``: ``ema.update()`` of the plain replica (every weight on every rank, as DDP);
- ``sharded``: ``ema.update()`` of the FSDP2 model (each rank its local shards, no collective);
- ``sharded floor``: ``torch._foreach_lerp_`` on the same local shards, no EMA around it;
- ``to_local per update``: the same lerp, with ``p.to_local()`` taken for each tensor at every
  update, as a naive sharded EMA would (polyak plans the local views once).

The update is memory-bound, so ``sharded / unsharded`` should approach ``1 / world`` for large
models, and ``sharded / sharded floor`` stays near 1. CPU ranks share the machine's cores and
memory bandwidth: there the ratio shows what sharding saves per rank, not a speed-up per rank.
Writes ``bench/results/sharded_speed_<device>_w<world>_<date>.json`` (``--out`` overrides).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from typing import Any

import torch
from _common import (
    RESULTS_DIR,
    LoadMonitor,
    foreign_cores,
    git_commit,
    load_threshold,
    load_verdict,
    machine_info,
    markdown_table,
    paired_ratio,
    round_orders,
    sync,
    time_calls,
    utc_now,
    write_json_atomic,
)
from torch import nn

import polyak

ROWS = ("unsharded", "sharded", "sharded floor", "to_local per update")


def build(elements: int, tensors: int, device: torch.device) -> nn.Sequential:
    side = max(1, int((elements / tensors) ** 0.5))
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(side, side, bias=False) for _ in range(tensors))).to(device)


def measure(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    from torch.distributed.fsdp import fully_shard

    plain = build(args.elements, args.tensors, device)
    sharded = build(args.elements, args.tensors, device)
    for layer in sharded:
        fully_shard(layer)
    fully_shard(sharded)
    plain_ema = polyak.EMA(plain, decay=0.999)
    sharded_ema = polyak.EMA(sharded, decay=0.999)
    params = list(sharded.parameters())
    shards = [torch.zeros_like(p.to_local()) for p in params]
    with torch.no_grad():
        planned = [p.to_local() for p in params]

    def floor() -> None:
        torch._foreach_lerp_(shards, planned, 0.001)

    def naive() -> None:
        with torch.no_grad():
            torch._foreach_lerp_(shards, [p.to_local() for p in params], 0.001)

    calls = {
        "unsharded": plain_ema.update,
        "sharded": sharded_ema.update,
        "sharded floor": floor,
        "to_local per update": naive,
    }
    for fn in calls.values():  # warm up
        for _ in range(3):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    monitor = LoadMonitor().start()
    # a fresh order each round, the same on every rank (same seed), so no row always runs
    # behind the same one and the ranks run the same row at about the same time
    for order in round_orders(len(ROWS), args.reps, "sharded_speed"):
        for i in order:
            times[ROWS[i]].append(time_calls(calls[ROWS[i]], device, inner=args.inner))
    parts = monitor.stop_parts()
    return {
        "rank": rank,
        "elements": sum(p.numel() for p in plain.parameters()),
        "local_elements": sum(p.to_local().numel() for p in params),
        "times_ms": times,
        "load_parts": parts,
    }


def ranks_foreign_cores(ranks: list[dict]) -> list[float | None]:
    """Per rank, the busy cores of processes that are no rank of this run: the machine's busy
    CPU time in the rank's timed stretch less every rank's own (on one machine the ranks are
    siblings, not one process tree, so each would count the others as load)."""
    parts = [r.get("load_parts") for r in ranks]
    if any(p is None for p in parts):
        return [None] * len(ranks)
    own = sum(p[1] for p in parts)
    return [foreign_cores(p[0], own, p[2]) for p in parts]


def run(rank: int, world: int, args: argparse.Namespace, init: str | None) -> None:
    import torch.distributed as dist

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        torch.set_num_threads(args.threads)
    backend = "nccl" if cuda else "gloo"
    if init is None:  # torchrun: the environment says where the group is
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        result = measure(args, rank, world, device)
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, result)
        if rank == 0:
            report(args, world, everyone)
    finally:
        dist.destroy_process_group()


def report(args: argparse.Namespace, world: int, ranks: list[dict]) -> None:
    rows = []
    for name in ROWS:
        medians = [statistics.median(r["times_ms"][name]) for r in ranks]
        rows.append({"row": name, "ms_rank0": medians[0], "ms_max_rank": max(medians)})
    first = ranks[0]["times_ms"]
    ratio, lo, hi = paired_ratio(first["sharded"], first["unsharded"])
    floor_ratio, floor_lo, floor_hi = paired_ratio(first["sharded"], first["sharded floor"])
    naive_ratio, naive_lo, naive_hi = paired_ratio(first["to_local per update"], first["sharded"])
    foreign = ranks_foreign_cores(ranks)
    loaded, why = load_verdict(foreign, load_threshold(os.cpu_count()))
    if args.device == "cuda":
        loaded, why = None, "GPU run: host load not judged"
    elements = ranks[0]["elements"]
    print(
        f"{elements:,} fp32 elements in {args.tensors} tensors, {world} rank(s) on "
        f"{args.device}, {args.reps} rounds of {args.inner} call(s)"
    )
    if loaded:
        print(f"LOADED RUN: {why}")
    print(
        markdown_table(
            rows,
            [("row", "row"), ("ms_rank0", "ms (rank 0)"), ("ms_max_rank", "ms (slowest rank)")],
        )
    )
    print(f"\nsharded / unsharded = {ratio:.3f} [{lo:.3f}, {hi:.3f}] (1 / world = {1 / world:.3f})")
    print(f"sharded / sharded floor = {floor_ratio:.3f} [{floor_lo:.3f}, {floor_hi:.3f}]")
    print(f"to_local per update / sharded = {naive_ratio:.3f} [{naive_lo:.3f}, {naive_hi:.3f}]")
    date = utc_now()
    path = args.out or RESULTS_DIR / f"sharded_speed_{args.device}_w{world}_{date:%Y-%m-%d}.json"
    if args.no_write:
        return
    write_json_atomic(
        path,
        {
            "schema_version": 1,
            "benchmark": "sharded_speed",
            "date": date.isoformat(),
            "machine": machine_info(args.device),
            "torch": torch.__version__,
            "polyak": polyak.__version__,
            "commit": git_commit(),
            "world": world,
            "backend": "nccl" if args.device == "cuda" else "gloo",
            "dtype": "float32",
            "model": {"elements": elements, "tensors": args.tensors, "layer": "Linear, no bias"},
            "local_elements_per_rank": [r["local_elements"] for r in ranks],
            "reps": args.reps,
            "inner": args.inner,
            "threads_per_rank": None if args.device == "cuda" else args.threads,
            "load": {"loaded": loaded, "why": why, "foreign_cores_per_rank": foreign},
            "rows": rows,
            "ratios": {
                "sharded_over_unsharded": [ratio, lo, hi],
                "sharded_over_floor": [floor_ratio, floor_lo, floor_hi],
                "to_local_per_update_over_sharded": [naive_ratio, naive_lo, naive_hi],
            },
            "times_ms_per_rank": [r["times_ms"] for r in ranks],
        },
    )
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--world", type=int, default=2, help="ranks to spawn (not under torchrun)")
    parser.add_argument("--elements", type=int, default=8_000_000)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--inner", type=int, default=5, help="calls per timed sample")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    parser.add_argument("--out", type=str, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/init"
        mp.spawn(run, args=(args.world, args, init), nprocs=args.world, join=True)


if __name__ == "__main__":
    sys.exit(main())
