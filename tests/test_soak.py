"""Soak: many updates of a small model (with the default NaN check, a swap and a save now and then)
must not grow the process's memory.

After a warm-up, the resident set size (Linux ``/proc/self/statm``), the number of Python objects
the garbage collector tracks, and on CUDA torch's allocated bytes are read; at the end they may
exceed those readings only by a fixed bound, however many updates ran: 2·10⁴ in CI, 10⁶ in the
slow variant. A leak of one small tensor or one Python object per update would break the bound
many times over (a 4-byte tensor per update is 80 kB of data alone, and its Python wrapper and
allocation more, in CI; a tracked object per update is 2·10⁴ objects).
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch
from torch import nn

import polyak

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/statm"),
    # the forward runs every 10th update only: between two, the statistics are "stale"
    pytest.mark.filterwarnings("ignore::polyak.bn.StaleBatchNormWarning"),
]
RSS_BOUND = 8 << 20  # bytes: malloc arenas and caches may settle a little after the warm-up
OBJECT_BOUND = 200


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(updates: int, device: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).to(device)
    ema = polyak.EMA(model, decay=0.99)
    x = torch.randn(32, 8, device=device)

    params = list(model.parameters())

    def work(count: int) -> None:
        for i in range(count):
            with torch.no_grad():
                if i % 10 == 0:
                    model(x)  # moves the BatchNorm statistics, as training does
                torch._foreach_mul_(params, 0.999)
            ema.update()
            if i % 5000 == 4999:
                with ema.swapped():
                    model(x)
                ema.save_state(tmp_path / "soak")

    work(5000)  # warm-up: every path has run, caches filled
    gc.collect()
    start_rss, start_objects = rss(), len(gc.get_objects())
    start_cuda = torch.cuda.memory_allocated() if device == "cuda" else 0
    work(updates)
    gc.collect()
    assert ema.step == 5000 + updates
    assert rss() - start_rss < RSS_BOUND, (rss() - start_rss) / 2**20
    assert len(gc.get_objects()) - start_objects < OBJECT_BOUND
    if device == "cuda":
        assert torch.cuda.memory_allocated() == start_cuda


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs a CUDA device (GPU machine)"
        ),
    ),
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a thread pool only adds contention (the CI machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("device", DEVICES)
def test_soak(tmp_path, device):
    soak(20_000, device, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_soak_a_million_updates(tmp_path, device):
    soak(1_000_000, device, tmp_path)
