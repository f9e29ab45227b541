"""The benchmark's mechanics: paired ratios of round-robin rows, the target verdicts, the floor
probe and the raw chunked row. No timing is asserted: fake clocks stand in where time matters.

The benchmark scripts are not part of the package; they are loaded from bench/ the way a script
run there sees them.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import _common
        import update_speed

        yield _common, update_speed
    finally:
        sys.path.remove(str(BENCH))


def _drifting_rounds(n: int, ratio: float, seed: int) -> tuple[list[float], list[float]]:
    """Two rows timed in the same rounds of a machine whose speed drifts by up to 2x."""
    rng = np.random.default_rng(seed)
    machine = np.exp(rng.normal(0, 0.25, n))  # the round's slowness, shared by both rows
    b = 10.0 * machine * np.exp(rng.normal(0, 0.02, n))
    a = ratio * 10.0 * machine * np.exp(rng.normal(0, 0.02, n))
    return a.tolist(), b.tolist()


def test_paired_ratio_cancels_a_drift_shared_by_both_rows(bench):
    common, _ = bench
    a, b = _drifting_rounds(40, 1.03, seed=1)
    ratio, lo, hi = common.paired_ratio(a, b)
    assert lo <= 1.03 <= hi and abs(ratio - 1.03) < 0.01
    assert hi - lo < 0.03  # the per-round noise is 2%: the interval is that narrow
    # the same samples with the pairing destroyed: the drift no longer cancels
    shuffled = list(np.random.default_rng(2).permutation(b))
    _, lo_u, hi_u = common.paired_ratio(a, shuffled)
    assert hi_u - lo_u > 4 * (hi - lo)


def test_paired_ratio_is_reproducible_and_falls_back_to_medians(bench):
    common, _ = bench
    a, b = _drifting_rounds(30, 0.9, seed=3)
    assert common.paired_ratio(a, b) == common.paired_ratio(a, b)  # fixed bootstrap seed
    one = common.paired_ratio([5.0], b)  # a row timed once (too slow for the round-robin)
    assert one == (5.0 / statistics.median(b),) * 3


def _result(device: str, rows: list[dict]) -> dict:
    workloads = {r["workload"] for r in rows}
    return {
        "settings": {"device": device},
        "workloads": [{"name": w, "polyak_auto_kernel": "foreach"} for w in workloads],
        "rows": rows,
    }


def _bench_row(
    workload: str,
    impl: str,
    kernel: str,
    samples: list[float],
    floor: float,
    dtype: str = "fp32",
) -> dict:
    return {
        "workload": workload,
        "impl": impl,
        "kernel": kernel,
        "dtype": dtype,
        "samples_ms": samples,
        "ms_median": statistics.median(samples),
        "floor_ms": floor,
        "floor_is_bound": True,
    }


def test_target_verdicts_follow_the_interval(bench):
    _, us = bench
    raw, _ = _drifting_rounds(40, 1.0, seed=4)
    fast = [t * 1.00 for t in raw]  # clearly within 1.05x
    slow = [t * 1.20 for t in raw]  # clearly beyond
    # per-round ratios spread evenly (shuffled) around exactly the limit
    spread = np.random.default_rng(5).permutation(np.exp(np.linspace(-0.2, 0.2, 40)))
    noisy = (np.array(raw) * 1.05 * spread).tolist()
    rows = [
        _bench_row("transformer", "raw_foreach_lerp", "foreach", raw, 5.0),
        _bench_row("transformer", "polyak", "foreach", fast, 5.0),
        _bench_row("transformer", "polyak", "fused", slow, 5.0),
        _bench_row("transformer", "polyak", "triton", noisy, 5.0),
    ]
    verdicts = {t["kernel"]: t["verdict"] for t in us.evaluate_targets(_result("cpu", rows))}
    assert verdicts == {"foreach": "met", "fused": "NOT met", "triton": "within noise"}


def test_gpu_runs_check_the_gpu_targets(bench):
    _, us = bench
    samples = [5.2, 5.3, 5.25, 5.22, 5.31, 5.27]
    rows = [
        _bench_row("transformer", "polyak", "fused", samples, 5.0),
        _bench_row("bf16_native", "polyak", "fused+SR", [3.0] * 6, 3.0),
    ]
    targets = us.evaluate_targets(_result("cuda", rows))
    by_name = {t["target"]: t for t in targets}
    fp32 = by_name["1.31B fp32 <= 1.05x floor"]
    assert fp32["ratio"] == pytest.approx(statistics.median(samples) / 5.0)
    assert fp32["verdict"] == "within noise"  # 1.044..1.062 holds the limit
    assert by_name["bf16 stochastic rounding <= 1.1x 6 B/elem floor"]["verdict"] == "met"
    assert not any("raw _foreach_lerp_" in t["target"] for t in targets)  # CPU-only targets


def test_a_run_cut_short_keeps_the_workloads_it_finished(bench, tmp_path, monkeypatch):
    """The JSON is rewritten after every workload, so a killed run still returns its data."""
    _, us = bench
    done: list[str] = []

    def one_row(wl, specs, args, bandwidth):
        if done:
            raise KeyboardInterrupt  # the device call's time limit, in the second workload
        done.append(wl.name)
        return [
            {
                "workload": wl.name,
                "impl": "polyak",
                "kernel": "foreach",
                "ms_median": 1.0,
                "samples_ms": [1.0] * 4,
                "bytes_per_update": 10**6,
                "floor_ms": None,
            }
        ]

    monkeypatch.setattr(us, "bench_workload", one_row)
    monkeypatch.setattr(us, "memory_bandwidth", _fake_probe)
    out = tmp_path / "run.json"
    with pytest.raises(KeyboardInterrupt):
        us.main(["--device", "cpu", "--workloads", "many_tiny", "resnet50", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] is False
    assert [r["workload"] for r in saved["rows"]] == ["many_tiny"]
    assert saved["rows"][0]["floor_ms"] == pytest.approx(0.1)  # 1e6 B at 1e10 B/s (in-place)


# ---------------------------------------------------------------- the floor probe

# a fake probe: the in-place ops at 1e10 and 0.8e10 B/s, a copy at 2e10 (never the floor)
_PROBE_BW = {"add": 1e10, "lerp": 0.8e10, "copy": 2e10}


def _fake_probe(device, nbytes, reps=10, op="add"):
    return {"op": op, "bytes": float(nbytes), "best_bytes_per_s": _PROBE_BW[op]}


@pytest.mark.parametrize(("op", "transfers"), [("add", 3), ("lerp", 3), ("copy", 2)])
def test_floor_probe_counts_what_the_op_reads_and_writes(bench, monkeypatch, op, transfers):
    """An in-place op reads both buffers and writes one: 3 x the buffer per call (a lerp's
    traffic); a copy is counted as 2 (its destination's read-for-ownership is not counted)."""
    common, _ = bench
    monkeypatch.setattr(common, "time_calls", lambda fn, device, inner=1: 2.0)  # ms per call
    got = common.memory_bandwidth("cpu", 4 << 20, reps=3, op=op)
    assert got["moved_per_call"] == transfers * (4 << 20)
    assert got["best_bytes_per_s"] == pytest.approx(transfers * (4 << 20) / 2e-3)
    with pytest.raises(ValueError, match="op must be one of"):
        common.memory_bandwidth("cpu", 1 << 10, op="triad")


def test_floor_probe_ops_move_data_like_a_lerp(bench):
    """The probes really run in place: ``add`` leaves dst as it was (alpha 0), ``lerp`` moves it
    towards src; a probe that wrote a fresh tensor would not be an in-place op."""
    common, _ = bench
    seen = []
    real = torch.Tensor.add_

    def spy(self, other, *a, **k):
        seen.append((self.data_ptr(), other.data_ptr(), k.get("alpha")))
        return real(self, other, *a, **k)

    torch.Tensor.add_ = spy
    try:
        common.memory_bandwidth("cpu", 1 << 12, reps=2, op="add")
    finally:
        torch.Tensor.add_ = real
    assert len({(d, s) for d, s, _ in seen}) == 1 and seen[0][0] != seen[0][1]
    assert {a for _, _, a in seen} == {0.0}


def test_floors_come_from_the_best_in_place_probe(bench, monkeypatch, tmp_path):
    _, us = bench
    monkeypatch.setattr(us, "memory_bandwidth", _fake_probe)
    probes = us.probe_bandwidth("cpu", 1 << 20)
    assert sorted(p["op"] for p in probes) == ["add", "lerp"]
    rows = [{"workload": "w", "bytes_per_update": 10**7, "ms_median": 2.0}]
    wls = [{"name": "w", "bytes_per_update": 10**7, "floor_is_bound": True}]
    us._apply_floors(rows, wls, max(p["best_bytes_per_s"] for p in probes))
    assert rows[0]["floor_ms"] == pytest.approx(1.0)  # 1e7 B at the add probe's 1e10 B/s
    assert rows[0]["x_floor"] == pytest.approx(2.0)


def test_a_floor_for_a_workload_that_fits_in_the_cache_is_not_a_floor(bench):
    _, us = bench
    cache = 32 << 20
    assert us.floor_is_bound(3 * cache, cache) and not us.floor_is_bound(cache, cache)
    assert us.floor_is_bound(10, None)  # unknown cache: taken as a floor
    row = _bench_row("bf16", "polyak", "foreach", [5.0] * 6, 5.0, dtype="bf16/fp32")
    row["floor_is_bound"] = False
    targets = us.evaluate_targets(_result("cpu", [row]))
    floor = [t for t in targets if "floor" in t["target"]]
    assert [t["verdict"] for t in floor] == ["not a floor"] and floor[0]["ratio"] is None
    assert "cache" in us.render_targets(targets, "cpu")


# ---------------------------------------------------------------- the raw chunked row


def _workload(bench, model, shadow_dtype=torch.float32, buffers=False):
    _, us = bench
    return us.Workload("w", "test", model, buffers, shadow_dtype, True)


def test_raw_chunked_row_computes_the_naive_upcast_bit_for_bit(bench, monkeypatch):
    """Chunks smaller than a tensor (slices) and holding several tensors (shared scratch)."""
    _, us = bench
    torch.manual_seed(0)
    shapes = [(37, 5), (3,), (300,), (2, 2, 2)]
    model = nn.ParameterList(
        nn.Parameter(torch.randn(s).to(torch.bfloat16), requires_grad=False) for s in shapes
    )
    wl = _workload(bench, model)
    monkeypatch.setitem(us._RAW_CHUNK, "bytes", 64 * 4)  # 64 fp32 elements per chunk
    chunked, naive = us.make_raw_chunked(wl), us.make_raw(wl)
    # 64 | 64 | 57+3 | 64 | 64 | 64 | 64 | 44+8: slices of the 185- and 300-element tensors,
    # and two chunks shared by two tensors
    assert "8 chunks" in chunked.note
    for step in range(3):
        with torch.no_grad():
            for p in model:
                p.add_(torch.randn(p.shape).to(torch.bfloat16))
        chunked.update()
        naive.update()
        for name, _ in wl.avg:
            assert torch.equal(chunked.shadow_of(name), naive.shadow_of(name)), (step, name)


def test_bf16_raw_target_uses_the_chunked_row(bench):
    _, us = bench
    raw, _ = _drifting_rounds(40, 1.0, seed=6)
    rows = [
        _bench_row("bf16", "raw_foreach_lerp", "foreach", [t * 3 for t in raw], 5.0),
        _bench_row("bf16", "raw_foreach_lerp", "chunked", raw, 5.0),
        _bench_row("bf16", "polyak", "foreach", [t * 1.2 for t in raw], 5.0),
    ]
    for r in rows:
        r["dtype"] = "bf16/fp32"
    by = {t["target"]: t for t in us.evaluate_targets(_result("cpu", rows))}
    t = by["polyak <= 1.05x raw _foreach_lerp_ (chunked fp32 upcast)"]
    assert t["ratio"] == pytest.approx(1.2, rel=0.02) and t["verdict"] == "NOT met"
