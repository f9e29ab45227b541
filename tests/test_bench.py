"""The benchmark's mechanics: paired ratios of round-robin rows, the target verdicts, the floor
probe, the value check of every implementation, the calls per repetition and the order of each
round, the load marking. No timing is asserted: fake clocks stand in where time matters.

The benchmark scripts are not part of the package; they are loaded from bench/ the way a script
run there sees them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
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
    eligible: bool = True,
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
        "eligible": eligible,
        "excluded_why": "" if eligible else "values differ from the float64 reference lerp",
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
    monkeypatch.setattr(us, "sample_foreign_load", lambda: 0.0)
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


# ---------------------------------------------------------------- the value check


def _fake_impl(bench, wl, decay, shadow_dtype=None, skip=(), rounding="nearest", buffers=True):
    """An EMA written in the test: ``s += (1 - decay) (p - s)`` in the shadow dtype (bf16:
    computed in fp32, rounded to nearest or stochastically), skipping the names in ``skip``."""
    _, us = bench
    named = list(wl.avg)
    if buffers:  # also every floating buffer, whether the workload averages it or not
        have = {n for n, _ in named}
        named += [
            (n, b) for n, b in wl.model.named_buffers() if b.is_floating_point() and n not in have
        ]
    named = [(n, t) for n, t in named if n not in skip]
    dtype = shadow_dtype or wl.shadow_dtype
    shadows = {n: t.detach().to(dtype, copy=True) for n, t in named}
    gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def update():
        for n, t in named:
            s = shadows[n]
            exact = s.float() + (1 - decay) * (t.float() - s.float())
            if rounding == "stochastic":  # add random low bits, then truncate to bf16
                bits = exact.view(torch.int32)
                noise = torch.randint(0, 1 << 16, exact.shape, generator=gen, dtype=torch.int32)
                exact = ((bits + noise) & -65536).view(torch.float32)
            s.copy_(exact)

    return us.Impl("fake", f"decay={decay}", update, shadows.get)


def _verify(bench, wl, impls):
    _, us = bench
    for impl in impls:
        impl.update()
    return [us.verify_values(wl, [impl])[id(impl)] for impl in impls]


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4)).to(dtype)


def test_value_check_passes_exact_decays_and_catches_wrong_ones_fp32(bench):
    _, us = bench
    results = {}
    in_fp32 = float(torch.tensor(us.DECAY, dtype=torch.float32))  # as ema-pytorch holds it
    two_ulps = us.DECAY + 2 * 2.0**-24  # 0.999 is in [0.5, 1): an fp32 ulp is 2**-24
    for decay in (us.DECAY, in_fp32, two_ulps, 0.9989, 0.998):
        wl = _workload(bench, _mlp())
        results[decay] = _verify(bench, wl, [_fake_impl(bench, wl, decay)])[0]
    assert results[us.DECAY]["ok"] and results[us.DECAY]["max_err_over_tol"] < 0.5
    assert in_fp32 != us.DECAY and results[in_fp32]["ok"]
    # 1 - decay off by 1e-4 of itself, by 10% and by 2x
    assert not results[two_ulps]["ok"]
    assert not results[0.9989]["ok"] and results[0.9989]["max_err_over_tol"] > 10
    assert not results[0.998]["ok"]


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_value_check_in_bf16_allows_rounding_and_catches_a_decay_off_by_10pct(bench, rounding):
    _, us = bench
    ok, wrong = (
        _verify(bench, wl, [_fake_impl(bench, wl, d, rounding=rounding)])[0]
        for d, wl in (
            (us.DECAY, _workload(bench, _mlp(torch.bfloat16), torch.bfloat16)),
            (0.9989, _workload(bench, _mlp(torch.bfloat16), torch.bfloat16)),
        )
    )
    assert ok["ok"], ok
    assert not wrong["ok"], wrong


def test_value_check_names_a_missing_tensor_and_a_wrong_copy(bench):
    _, us = bench
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    wl = _workload(bench, model, buffers=True)
    skipping = _fake_impl(bench, wl, us.DECAY, skip={"0.bias"})  # never copies int buffers
    res = _verify(bench, wl, [skipping])[0]
    assert not res["ok"] and res["missing"] == ["0.bias", "1.num_batches_tracked"]
    summary = us.check_summary(res, True, "")
    assert "2 tensors not tracked" in summary
    # an integer buffer held but never copied (or truncated by decay * x): a wrong copy
    stale = _fake_impl(bench, wl, us.DECAY)
    shadows = {n: stale.shadow_of(n) for n, _ in wl.avg}
    shadows["1.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    stale = us.Impl("fake", "stale", stale.update, shadows.get)
    res = _verify(bench, wl, [stale])[0]
    assert not res["ok"] and res["copies_wrong"] == ["1.num_batches_tracked"]
    assert res["missing"] == [] and res["max_err_over_tol"] < 1
    assert "1 copies wrong" in us.check_summary(res, True, "")


def test_tracked_set_must_match_the_workload(bench):
    """A peer that also averages the BatchNorm buffers of a params-only workload tracks another
    set: marked, and no candidate for the fastest peer."""
    _, us = bench
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    wl = _workload(bench, model, buffers=False)
    same = _fake_impl(bench, wl, us.DECAY, buffers=False)
    more = _fake_impl(bench, wl, us.DECAY, buffers=True)
    seen = us.observe_tracking(wl, [same, more])
    assert us.compare_tracked_set(wl, seen[id(same)]["states"]) == (True, "")
    ok, diff = us.compare_tracked_set(wl, seen[id(more)]["states"])
    assert not ok and diff == "2 float bufs averaged (workload: not tracked)"
    # the buffers-tracking workload: the params-only impl misses them, and the int buffer
    wl_b = _workload(bench, model, buffers=True)
    seen = us.observe_tracking(wl_b, [same])
    ok, diff = us.compare_tracked_set(wl_b, seen[id(same)]["states"])
    assert not ok and "2 float bufs not tracked (workload: averaged)" in diff
    assert "1 int bufs not tracked (workload: copied)" in diff


def test_targets_count_only_checked_rows(bench):
    _, us = bench
    base, _ = _drifting_rounds(40, 1.0, seed=7)
    rows = [
        _bench_row("resnet50", "polyak", "foreach", base, 5.0),
        _bench_row("resnet50", "polyak", "reference", base, 5.0, eligible=False),
        _bench_row("resnet50", "raw_foreach_lerp", "foreach", base, 5.0, eligible=False),
        # a fast peer that failed the check is not the fastest peer
        _bench_row("resnet50", "timm_v3", "foreach", [t * 0.5 for t in base], 5.0, False),
        _bench_row("resnet50", "torch_ema", "loop", [t * 2.0 for t in base], 5.0),
    ]
    by = {t["target"]: t for t in us.evaluate_targets(_result("cpu", rows))}
    peer = by["polyak <= 0.8x fastest peer (ResNet-50)"]
    assert peer["ratio"] == pytest.approx(0.5, rel=0.02) and peer["verdict"] == "met"
    raw = by["polyak <= 1.05x raw _foreach_lerp_"]
    assert raw["verdict"] == "excluded" and "raw_foreach_lerp/foreach" in raw["why"]
    # an ineligible polyak row gets an explicit excluded line, never a silent pass
    rows[0]["eligible"] = False
    rows[0]["excluded_why"] = "values differ from the float64 reference lerp"
    verdicts = {t["verdict"] for t in us.evaluate_targets(_result("cpu", rows))}
    assert verdicts == {"excluded"}


def _peer_module(bench, name):
    _, us = bench
    if name == "timm":  # found and loaded by file, as the bench does (timm needs torchvision)
        try:
            us.load_timm_model_ema()
        except us.Unavailable as e:
            pytest.skip(str(e))
    else:
        pytest.importorskip(name)


@pytest.mark.parametrize(
    ("maker", "module"),
    [
        ("make_torch_ema", "torch_ema"),
        ("ema_pytorch_loop", "ema_pytorch"),
        ("ema_pytorch_foreach", "ema_pytorch"),
        ("make_timm_v3", "timm"),
        ("make_timm_v2", "timm"),
        ("make_swa", "torch"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peers_as_configured_run_the_same_constant_decay(bench, maker, module, dtype):
    """Each peer, configured by the bench for a constant decay, passes the value check after
    a warm-up; the peers' defaults (torch_ema's num_updates warm-up) would not."""
    _, us = bench
    _peer_module(bench, module)
    make = {
        "ema_pytorch_loop": us.make_ema_pytorch(False),
        "ema_pytorch_foreach": us.make_ema_pytorch(True),
    }.get(maker) or getattr(us, maker)
    wl = _workload(bench, _mlp(dtype), dtype)
    impl = make(wl)
    for _ in range(5):
        impl.update()
    res = us.verify_values(wl, [impl])[id(impl)]
    assert res["ok"], res


_SHIMS = (
    "make_compat_torch_ema",
    "make_compat_timm_v2",
    "make_compat_timm_v3",
    "make_compat_ema_pytorch",
)


def _bn_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4)).to(dtype)


@pytest.mark.parametrize("maker", _SHIMS)
@pytest.mark.parametrize(
    ("case", "dtype", "shadow", "buffers"),
    [
        ("fp32", torch.float32, torch.float32, False),
        ("fp32 + buffers", torch.float32, torch.float32, True),
        ("bf16 weights, fp32 shadows", torch.bfloat16, torch.float32, False),
        ("bf16 shadows", torch.bfloat16, torch.bfloat16, False),
    ],
)
def test_drop_ins_as_configured_track_the_workload_and_run_its_decay(
    bench, maker, case, dtype, shadow, buffers
):
    """Each polyak.compat row, where the bench gives it one, tracks exactly the workload's
    tensors (averaged, copied), passes the value check at DECAY, and is labelled with the
    kernel of the polyak row it is compared with."""
    _, us = bench
    model = _bn_model(dtype) if buffers else _mlp(dtype)
    wl = _workload(bench, model, shadow, buffers=buffers)
    spec = next(s for s in us.COMPAT_SPECS if s.make is getattr(us, maker))
    if not spec.applies(wl):
        assert (maker, case) in {
            ("make_compat_timm_v2", "bf16 shadows"),  # no bf16-shadow option in V2
            ("make_compat_ema_pytorch", "bf16 shadows"),  # nor in ema-pytorch
        }
        return
    impl = spec.make(wl)
    for _ in range(4):
        impl.update()
    seen = us.observe_tracking(wl, [impl])[id(impl)]
    assert us.compare_tracked_set(wl, seen["states"]) == (True, "")
    assert seen["shadow_dtype"] == shadow
    res = us.verify_values(wl, [impl])[id(impl)]
    assert res["ok"], res
    rounding = "+SR" if maker == "make_compat_timm_v3" and shadow == torch.bfloat16 else ""
    chosen = us.polyak_auto_kernel(wl)
    if rounding:  # timm V3's default for a bf16 model: bf16 shadows rounded stochastically
        chosen = "fused"
    assert impl.kernel == chosen + rounding
    assert impl.impl.startswith(us.SHIM) and not us.is_peer(impl.impl)


def test_a_timm_drop_in_has_no_row_where_timm_cannot_leave_buffers_out(bench):
    _, us = bench
    wl = _workload(bench, _bn_model(), buffers=False)
    applies = {s.impl: s.applies(wl) for s in us.COMPAT_SPECS}
    assert applies == {
        "compat_torch_ema": True,
        "compat_timm_v2": False,
        "compat_timm_v3": False,
        "compat_ema_pytorch": True,
    }


def test_drop_in_target_pairs_with_the_polyak_row_of_the_same_kernel(bench):
    _, us = bench
    base, _ = _drifting_rounds(40, 1.0, seed=8)
    rows = [
        _bench_row("many_tiny", "polyak", "foreach", base, 5.0),
        _bench_row("many_tiny", "polyak", "reference", [t * 3 for t in base], 5.0),
        _bench_row("many_tiny", "compat_timm_v2", "foreach", [t * 1.02 for t in base], 5.0),
        _bench_row("many_tiny", "compat_ema_pytorch", "foreach", [t * 1.3 for t in base], 5.0),
        # a fused+SR drop-in with no polyak fused+SR row in the run: excluded, not compared
        # with another kernel
        _bench_row("many_tiny", "compat_timm_v3", "fused+SR", base, 5.0),
        _bench_row("many_tiny", "timm_v3", "foreach", [t * 0.5 for t in base], 5.0),
    ]
    for device in ("cpu", "cuda"):
        targets = us.evaluate_targets(_result(device, rows))
        drop_ins = {t["impl"]: t for t in targets if t["target"] == us.SHIM_TARGET}
        assert drop_ins["compat_timm_v2"]["ratio"] == pytest.approx(1.02, rel=0.01)
        assert drop_ins["compat_timm_v2"]["verdict"] == "met"
        assert drop_ins["compat_ema_pytorch"]["verdict"] == "NOT met"
        assert drop_ins["compat_timm_v3"]["verdict"] == "excluded"
        assert "no eligible reference row" in drop_ins["compat_timm_v3"]["why"]
        text = us.render_targets(targets, device)
        assert "many_tiny compat_timm_v2/foreach (auto) = 1.020x" in text


def test_control_watch_and_pairs_targets_pair_the_right_rows(bench):
    """The replica against the first raw row; polyak on the model against polyak on pairs of the
    same kernel (what following the model costs); pairs against the raw op on the live tensors
    (CPU only). None of these rows counts as a polyak kernel row of the issue's targets."""
    _, us = bench
    base, _ = _drifting_rounds(40, 1.0, seed=10)
    rows = [
        _bench_row("many_tiny", "raw_foreach_lerp", "foreach", base, 5.0),
        _bench_row("many_tiny", "raw_foreach_lerp", "replica", [t * 1.01 for t in base], 5.0),
        _bench_row("many_tiny", "raw_foreach_lerp", "live", [t * 1.04 for t in base], 5.0),
        _bench_row("many_tiny", "polyak", "foreach", [t * 1.3 for t in base], 5.0),
        _bench_row("many_tiny", "polyak", "foreach+pairs", [t * 1.04 * 1.02 for t in base], 5.0),
    ]
    for device in ("cpu", "cuda"):
        targets = us.evaluate_targets(_result(device, rows))
        by = {t["target"]: t for t in targets}
        control = by[us.CONTROL_TARGET]
        assert (control["kernel"], control["ratio"]) == ("replica", pytest.approx(1.01, rel=1e-6))
        watch = by[us.WATCH_TARGET]
        assert watch["kernel"] == "foreach"
        assert watch["ratio"] == pytest.approx(1.3 / 1.0608, rel=1e-6)
        assert watch["verdict"] == "NOT met"
        if device == "cpu":
            pairs = by[us.PAIRS_TARGET]
            assert pairs["kernel"] == "foreach+pairs"
            assert pairs["ratio"] == pytest.approx(1.02, rel=1e-6)
        else:
            assert us.PAIRS_TARGET not in by
        # the issue's "polyak <= 1.05x raw" lines take the model rows only
        issue = [t for t in targets if t["target"].startswith("polyak <= 1.05x raw")]
        assert {t["kernel"] for t in issue} == ({"foreach"} if device == "cpu" else set())


def test_a_drop_in_is_no_candidate_for_the_fastest_peer(bench):
    _, us = bench
    base, _ = _drifting_rounds(40, 1.0, seed=9)
    rows = [
        _bench_row("resnet50", "polyak", "foreach", base, 5.0),
        _bench_row("resnet50", "compat_timm_v3", "foreach", [t * 0.3 for t in base], 5.0),
        _bench_row("resnet50", "timm_v3", "foreach", [t * 2.0 for t in base], 5.0),
    ]
    by = {t["target"]: t for t in us.evaluate_targets(_result("cpu", rows))}
    assert by["polyak <= 0.8x fastest peer (ResNet-50)"]["ratio"] == pytest.approx(0.5, rel=0.02)


def _bench_args(reps: int, placements: int = 1) -> argparse.Namespace:
    """bench_workload's settings for a quick CPU run of fake implementations."""
    return argparse.Namespace(
        device="cpu",
        placements=placements,
        warmup=3,
        compile_budget_s=0,
        max_update_ms=3000.0,
        min_rep_ms=20.0,
        max_inner=200,
        reps=reps,
        seed=0,
    )


def test_torch_ema_default_warmup_fails_the_value_check(bench):
    _, us = bench
    torch_ema = pytest.importorskip("torch_ema")
    wl = _workload(bench, _mlp())
    ema = torch_ema.ExponentialMovingAverage([t for _, t in wl.avg], decay=us.DECAY)
    impl = us.Impl(
        "torch_ema",
        "default",
        ema.update,
        dict(zip([n for n, _ in wl.avg], ema.shadow_params, strict=True)).get,
    )
    for _ in range(5):
        impl.update()
    res = us.verify_values(wl, [impl])[id(impl)]
    assert not res["ok"] and res["max_err_over_tol"] > 100


def test_a_wrong_peer_is_marked_and_excluded_in_a_bench_run(bench, monkeypatch):
    """The whole workload pass: the value check and the set check mark their rows."""
    _, us = bench
    monkeypatch.setattr(us, "time_calls", lambda fn, device, inner=1, wall=False: 1.0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    wl = _workload(bench, model, buffers=False)
    impls = {
        "right": _fake_impl(bench, wl, us.DECAY, buffers=False),
        "warm-up": _fake_impl(bench, wl, 0.99, buffers=False),
        "buffers too": _fake_impl(bench, wl, us.DECAY, buffers=True),
    }
    specs = [us.Spec("peer", k, lambda wl, k=k: impls[k]) for k in impls]
    args = _bench_args(reps=4)
    rows = dict(zip(impls, us.bench_workload(wl, specs, args, 1e10), strict=True))
    assert rows["right"]["eligible"] and rows["right"]["check_summary"] == "ok"
    assert not rows["warm-up"]["eligible"] and rows["warm-up"]["same_set"]
    assert "values differ" in rows["warm-up"]["excluded_why"]
    assert rows["warm-up"]["check_summary"].startswith("values off by")
    assert not rows["buffers too"]["eligible"] and rows["buffers too"]["check"]["ok"]
    assert "tracks another set" in rows["buffers too"]["excluded_why"]


# ---------------------------------------------------------------- calls and order per round


def test_calls_per_rep_follow_the_fastest_and_are_bounded(bench):
    _, us = bench
    assert us.calls_per_rep([1.0, 5.0, 50.0], 20.0, 200) == 20
    assert us.calls_per_rep([0.01], 20.0, 200) == 200
    assert us.calls_per_rep([30.0, 90.0], 20.0, 200) == 1


def test_round_orders_are_seeded_shuffles(bench):
    _, us = bench
    orders = us.round_orders(5, 40, "0:resnet50")
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert orders == us.round_orders(5, 40, "0:resnet50")  # reproducible
    assert orders != us.round_orders(5, 40, "1:resnet50")
    assert len({tuple(o) for o in orders}) > 20  # not a rotation (5 distinct orders at most)
    for impl in range(5):  # no one always runs first, or behind the same implementation
        firsts = [o[0] == impl for o in orders]
        before = {o[o.index(impl) - 1] for o in orders if o.index(impl) > 0}
        assert not all(firsts) and len(before) >= 3


def test_every_implementation_gets_the_same_calls_per_rep(bench, monkeypatch):
    """Implementations at 1, 4 and 40 ms per call all run 20 calls per repetition (20 ms for
    the fastest), in shuffled orders; positions are recorded per round."""
    _, us = bench
    wl = _workload(bench, _mlp())
    speeds = {0.999: 1.0, 0.9990000001: 4.0, 0.9990000002: 40.0}
    impls = {d: _fake_impl(bench, wl, d) for d in speeds}
    by_fn = {impls[d].update: ms for d, ms in speeds.items()}
    timed: list[tuple[object, int]] = []

    def fake_time_calls(fn, device, inner=1, wall=False):
        for _ in range(inner):
            fn()
        timed.append((fn, inner))
        return by_fn[fn]

    monkeypatch.setattr(us, "time_calls", fake_time_calls)
    specs = [us.Spec("fake", f"k{i}", lambda wl, d=d: impls[d]) for i, d in enumerate(speeds)]
    args = _bench_args(reps=8)
    rows = us.bench_workload(wl, specs, args, 1e10)
    assert [r["inner"] for r in rows] == [20, 20, 20]
    assert {inner for fn, inner in timed if inner > 1} == {20}
    assert sum(1 for _, inner in timed if inner == 20) == 8 * 3
    positions = [r["positions"] for r in rows]
    assert all(sorted(col) == [0, 1, 2] for col in zip(*positions, strict=True))
    assert len({tuple(col) for col in zip(*positions, strict=True)}) > 1
    assert all(r["check_summary"] == "ok" and r["eligible"] for r in rows)


def test_placements_build_each_implementation_again_and_rotate_the_sets(bench, monkeypatch):
    """``--placements 3``: every spec is built three times, each set warmed up; round r times
    set r mod 3 of every row, and the row's samples are all the rounds'."""
    _, us = bench
    wl = _workload(bench, _mlp())
    built: dict[str, list] = {"a": [], "b": []}

    def make(key):
        def build(wl):
            impl = _fake_impl(bench, wl, us.DECAY)
            built[key].append(impl)
            return impl

        return build

    timed: list[object] = []

    def fake_time_calls(fn, device, inner=1, wall=False):
        timed.append(fn)
        return 1.0

    monkeypatch.setattr(us, "time_calls", fake_time_calls)
    specs = [us.Spec("fake", k, make(k)) for k in built]
    rows = us.bench_workload(wl, specs, _bench_args(reps=7, placements=3), 1e10)
    assert [len(v) for v in built.values()] == [3, 3]
    assert all(r["reps"] == 7 and r["eligible"] for r in rows)
    for key, impls in built.items():
        rounds = [
            next(k for k, i in enumerate(impls) if i.update == fn)
            for fn in timed
            if any(i.update == fn for i in impls)
        ]
        assert rounds[-7:] == [0, 1, 2, 0, 1, 2, 0], key  # the timed rounds, after the warm-ups


# ---------------------------------------------------------------- load and the commit


def test_sharded_ranks_do_not_count_each_other_as_load(bench):
    """Two spawned ranks, each busy one core for 10 s, on a machine busy 2.3 cores: the ranks are
    siblings, so each one's own tree leaves the other out; all ranks' CPU time is taken off."""
    sys.path.insert(0, str(BENCH))
    try:
        import sharded_speed
    finally:
        sys.path.remove(str(BENCH))
    ranks = [{"load_parts": (23.0, 10.0, 10.0)}, {"load_parts": (22.0, 10.0, 10.0)}]
    assert sharded_speed.ranks_foreign_cores(ranks) == pytest.approx([0.3, 0.2])
    common, _ = bench
    assert common.foreign_cores(23.0, 10.0, 10.0) == pytest.approx(1.3)  # one rank's own view
    assert common.foreign_cores(5.0, 10.0, 10.0) == 0.0
    assert sharded_speed.ranks_foreign_cores([{"load_parts": None}, ranks[0]]) == [None, None]


def test_load_verdict_and_threshold(bench):
    common, _ = bench
    assert common.load_threshold(2) == 0.5 and common.load_threshold(16) == pytest.approx(1.6)
    assert common.load_verdict([0.1, 0.4], 0.5)[0] is False
    loaded, why = common.load_verdict([0.1, 0.9], 0.5)
    assert loaded is True and "0.90 cores" in why
    assert common.load_verdict([None, None], 0.5)[0] is None


def test_load_monitor_leaves_out_this_process_tree(bench, monkeypatch):
    common, _ = bench
    clock = iter([100.0, 110.0])  # 10 s of wall time
    busy = iter([1000.0, 1030.0])  # 30 busy CPU seconds on the machine
    own = iter([5.0, 15.0])  # 10 of them ours
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(common, "_proc_stat_busy_s", lambda: next(busy))
    monkeypatch.setattr(common, "_own_cpu_s", lambda: next(own))
    assert common.LoadMonitor().start().stop() == pytest.approx(2.0)


def test_own_cpu_time_counts_children(bench):
    common, _ = bench
    if common._proc_stat_busy_s() is None:
        pytest.skip("no /proc/stat")
    before = common._own_cpu_s()
    subprocess.run([sys.executable, "-c", "sum(range(3 * 10**7))"], check=True)
    assert common._own_cpu_s() - before > 0.2


class _FixedMonitor:
    """Stands in for LoadMonitor during the run: other processes kept ``cores`` busy."""

    cores = 0.0

    def start(self):
        return self

    def stop(self):
        return self.cores


def _quiet_run(bench, monkeypatch, tmp_path, foreign, *extra, during=0.0):
    _, us = bench
    monkeypatch.setattr(us, "memory_bandwidth", _fake_probe)
    monkeypatch.setattr(us, "sample_foreign_load", lambda: foreign)
    monkeypatch.setattr(_FixedMonitor, "cores", during)
    monkeypatch.setattr(us, "LoadMonitor", _FixedMonitor)
    monkeypatch.setattr(us, "bench_workload", lambda wl, specs, args, bw: [])
    out = tmp_path / "run.json"
    us.main(["--device", "cpu", "--workloads", "many_tiny", "--out", str(out), *extra])
    return json.loads(out.read_text())


def test_a_loaded_run_is_marked_or_refused(bench, monkeypatch, tmp_path, capsys):
    _, us = bench
    busy = _quiet_run(bench, monkeypatch, tmp_path, 1.5, "--max-load", "0.5")
    assert busy["load"]["loaded"] is True and busy["load"]["foreign_cores_before"] == 1.5
    assert "LOADED RUN" in capsys.readouterr().out
    assert "LOADED RUN" in us.render_targets([], "cpu", busy["load"])
    # quiet before the run, busy during it: loaded too
    later = _quiet_run(bench, monkeypatch, tmp_path, 0.0, "--max-load", "0.5", during=0.9)
    assert later["load"]["loaded"] is True and later["load"]["foreign_cores_during"] == 0.9
    quiet = _quiet_run(bench, monkeypatch, tmp_path, 0.2, "--max-load", "0.5", during=0.3)
    assert quiet["load"]["loaded"] is False
    assert "LOADED RUN" not in us.render_targets([], "cpu", quiet["load"])
    with pytest.raises(SystemExit, match="--require-quiet"):
        _quiet_run(bench, monkeypatch, tmp_path, 1.5, "--max-load", "0.5", "--require-quiet")
    assert {"commit", "tree_dirty", "dirty_files"} <= set(quiet["polyak"])


def test_git_commit_records_a_dirty_tree(bench, tmp_path):
    common, _ = bench
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    clean = common.git_commit(tmp_path)
    assert len(clean["commit"]) == 40 and clean["tree_dirty"] is False
    (tmp_path / "bench" / "results" / "new.json").write_text("{}")  # results do not count
    assert common.git_commit(tmp_path)["tree_dirty"] is False
    (tmp_path / "bench" / "tool.py").write_text("")
    dirty = common.git_commit(tmp_path)
    assert dirty["tree_dirty"] is True and dirty["dirty_files"] == ["bench/tool.py"]
    assert dirty["src_dirty"] is False
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    assert common.git_commit(tmp_path)["src_dirty_files"] == ["src/a.py"]
