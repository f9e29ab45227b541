"""What ``polyak.EMA(..., offload="cpu")`` costs per update, measured and predicted.

Run:
    python bench/offload_cost.py --device cpu      # CPU tensors: the host-side cost alone
    python bench/offload_cost.py --device cuda     # GPU weights, pinned host shadows

An offloaded update (1) copies the weights device-to-host into pinned staging buffers on a side
stream (PCIe), then (2) a worker thread runs the CPU multi-tensor lerp on the shadows (host memory:
read weight + read shadow + write shadow = 12 bytes per fp32 element). The caller only enqueues both;
it waits only when the previous update is still running (bounded staleness). So the cost per update
that the training loop can see is ``max(0, t_copy + t_host - t_step)``, where

    t_copy = 4 N / B_pcie        (fp32 weights; 2 N for bf16)
    t_host = 12 N / B_host

For N = 1.31e9 fp32 weights, B_pcie ≈ 25 GB/s and B_host ≈ 20 GB/s that is 0.21 s + 0.79 s: keep
``update_every`` ≥ 1 s / t_step. The script measures B_pcie (GPU only), B_host, the caller's time per
``update()`` and the full latency, and prints the prediction for a few model sizes. Writes
``bench/results/offload_cost_<device>_<date>.json``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import (
    RESULTS_DIR,
    git_commit,
    machine_info,
    markdown_table,
    memory_bandwidth,
    sync,
    time_calls,
    utc_now,
    write_json_atomic,
)
from torch import nn

import polyak

SIZES = {"ResNet-50 (25.6M)": 25_557_032, "ViT-B/16 (86.6M)": 86_567_656, "1.31B": 1_310_000_000}


def model(n_elements: int, n_tensors: int, device: str) -> nn.Module:
    per = n_elements // n_tensors
    return nn.ParameterList(
        [nn.Parameter(torch.randn(per, device=device)) for _ in range(n_tensors)]
    )


def pcie_bandwidth(nbytes: int) -> float:
    src = torch.empty(nbytes // 4, device="cuda")
    dst = torch.empty(nbytes // 4, pin_memory=True)
    times = [time_calls(lambda: dst.copy_(src, non_blocking=True), "cuda") for _ in range(10)]
    return nbytes / (min(times) / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--elements", type=int, default=25_000_000)
    parser.add_argument("--tensors", type=int, default=48)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)

    net = model(args.elements, args.tensors, device)
    inline = polyak.EMA(net, decay=0.999)
    offloaded = polyak.EMA(net, decay=0.999, offload="cpu")
    for ema in (inline, offloaded):  # warm up
        ema.update()
        ema.average("0")

    def full() -> None:
        offloaded.update()
        offloaded._engine.wait_host()

    enqueue, latency, inline_ms = [], [], []
    for _ in range(args.reps):  # interleaved
        offloaded._engine.wait_host()
        enqueue.append(time_calls(offloaded.update, device))
        offloaded._engine.wait_host()
        latency.append(time_calls(full, device))
        inline_ms.append(time_calls(inline.update, device))
    sync(device)

    n = sum(p.numel() for p in net.parameters())
    host = memory_bandwidth("cpu", 256 << 20, op="add")["best_bytes_per_s"]
    pcie = pcie_bandwidth(256 << 20) if device == "cuda" else None
    rows = [
        {"measure": "update() as the caller sees it", "ms": statistics.median(enqueue)},
        {"measure": "offloaded update, full latency", "ms": statistics.median(latency)},
        {"measure": f"inline update on {device}", "ms": statistics.median(inline_ms)},
        {"measure": "host lerp at B_host (12 B/elem)", "ms": 12 * n / host * 1e3},
    ]
    predictions = []
    for name, size in SIZES.items():
        t_host = 12 * size / host
        t_copy = 4 * size / pcie if pcie else None
        predictions.append(
            {
                "model": name,
                "t_copy_ms": None if t_copy is None else t_copy * 1e3,
                "t_host_ms": t_host * 1e3,
            }
        )
    print(f"{n:,} fp32 elements in {args.tensors} tensors on {device}\n")
    print(markdown_table(rows, [("measure", "measure"), ("ms", "ms")]))
    print(f"\nB_host (in-place add probe) = {host / 1e9:.1f} GB/s", end="")
    print(f", B_pcie (pinned D2H) = {pcie / 1e9:.1f} GB/s" if pcie else " (no GPU: no PCIe probe)")
    print("\nPredicted per-update cost of an offloaded fp32 EMA (overlaps the training step):\n")
    print(
        markdown_table(
            predictions,
            [("model", "model"), ("t_copy_ms", "D2H copy ms"), ("t_host_ms", "host lerp ms")],
        )
    )

    date = utc_now()
    path = RESULTS_DIR / f"offload_cost_{device}_{date:%Y-%m-%d}.json"
    write_json_atomic(
        path,
        {
            "schema_version": 1,
            "benchmark": "offload_cost",
            "date": date.isoformat(),
            "machine": machine_info(device),
            "torch": torch.__version__,
            "polyak": polyak.__version__,
            "commit": git_commit(),
            "n_elements": n,
            "n_tensors": args.tensors,
            "host_bytes_per_s": host,
            "pcie_bytes_per_s": pcie,
            "rows": rows,
            "predictions": predictions,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
