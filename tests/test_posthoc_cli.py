"""polyak demo --posthoc and polyak posthoc, end to end on tiny digits runs (seconds each).

The sweep's numbers are checked against an independent evaluation: the weights come from
``polyak.posthoc.reconstruct`` called directly, the accuracy from one forward pass over the whole
split compared with the labels by hand, the BatchNorm statistics from ``update_bn`` on the demo's
batches under the seed the demo documents.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from polyak import posthoc
from polyak.bn import update_bn
from polyak.cli import build_parser, main
from polyak.demo.data import DeviceData, load_digits
from polyak.demo.model import SeedCNN
from polyak.demo.sweep import best_row, sigma_rel_grid
from polyak.demo.train import DemoConfig, bn_batches, load_dataset

TINY = ["--steps", "30", "--width", "8", "--batch-size", "128", "--lr", "0.1", "--threads", "1",
        "--no-progress", "--no-plot"]  # fmt: skip
COMPARE = ["--compare", "tf_warmup:decay=0.99", "--compare", "constant:decay=0.9"]


def _main(*args: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    """``polyak demo --posthoc`` with two seeds, snapshots every 7 of 30 steps."""
    out = tmp_path_factory.mktemp("demo")
    code, stdout, stderr = _main(
        "demo", *TINY, "--seeds", "2", "--posthoc", "--posthoc-sigma-rels", "0.05,0.12",
        "--snapshot-every", "7", *COMPARE, "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    return out, stdout, json.loads((out / "metrics.json").read_text())


# ---------------------------------------------------------------- polyak demo --posthoc


def test_demo_writes_one_snapshot_directory_per_seed(run) -> None:
    out, stdout, metrics = run
    assert sorted(p.name for p in (out / "posthoc").iterdir()) == ["seed-0", "seed-1"]
    for seed in (0, 1):
        entry = metrics["runs"][seed]
        assert entry["posthoc"] == {
            "dir": f"posthoc/seed-{seed}",
            "sigma_rels": [0.05, 0.12],
            "snapshot_every": 7,
        }
        snaps = posthoc.read_index(out / entry["posthoc"]["dir"])
        # every 7 steps and the final state at close(), each step with both sigma_rel (by gamma)
        assert [(s.step, round(s.sigma_rel, 6)) for s in snaps] == [
            (step, sigma) for step in (7, 14, 21, 28, 30) for sigma in (0.12, 0.05)
        ]
        assert {s.samples for s in snaps if s.step == 30} == {30 * 128}
        state = load_file(snaps[-1].path)
        assert set(state) == set(
            SeedCNN(8, in_channels=1).state_dict()
        )  # a full state dict of the model
    assert metrics["config"]["val_fraction"] == 0.2 and metrics["config"]["snapshot_every"] == 7
    assert "digits (1078 train / 269 validation / 450 test)" in stdout
    assert f"polyak posthoc --snapshots {out / 'posthoc' / 'seed-0'} --eval" in stdout


def test_demo_reports_the_fixed_schedules(run) -> None:
    _, stdout, metrics = run
    for entry in metrics["runs"]:
        compare = entry["final"]["compare"]
        assert list(compare) == ["tf_warmup:decay=0.99", "constant:decay=0.9"]
        for scores in compare.values():
            assert set(scores) == {"val_acc", "val_loss", "test_acc"}
    summary = metrics["summary"]["final"]["compare"]["constant:decay=0.9"]["test_acc"]
    values = [
        entry["final"]["compare"]["constant:decay=0.9"]["test_acc"] for entry in metrics["runs"]
    ]
    assert summary["mean"] == pytest.approx(np.mean(values))
    assert summary["std"] == pytest.approx(np.std(values, ddof=1))
    assert "EMA constant:decay=0.9: val " in stdout


def _trajectory(metrics: dict) -> list[tuple]:
    return [
        (r["seed"], row["step"], row["loss"], row["raw_acc"], row["ema_acc"])
        for r in metrics["runs"]
        for row in r["epochs"]
    ]


def test_tracking_changes_no_bit_of_training(run, tmp_path: Path) -> None:
    """The same run without --posthoc and --compare (but with the same validation split)."""
    _, _, metrics = run
    code, _, stderr = _main(
        "demo", *TINY, "--seeds", "2", "--val-fraction", "0.2", "--out", str(tmp_path)
    )
    assert code == 0, stderr
    plain = json.loads((tmp_path / "metrics.json").read_text())
    assert _trajectory(plain) == _trajectory(metrics)
    assert not (tmp_path / "posthoc").exists()


def test_default_demo_data_is_unchanged() -> None:
    config = DemoConfig().resolved()
    assert config.val_fraction == 0.0 and not config.posthoc and config.compare == ()
    data, digits = load_dataset(config), load_digits()
    assert data.x_val is None
    np.testing.assert_array_equal(data.x_train, digits.x_train)
    np.testing.assert_array_equal(data.y_test, digits.y_test)
    assert DemoConfig(posthoc=True).resolved().val_fraction == 0.2
    assert DemoConfig(posthoc=True, val_fraction=0.0).resolved().val_fraction == 0.0


def test_demo_refuses_an_earlier_runs_snapshots(run, tmp_path: Path) -> None:
    out, _, _ = run
    shutil.copytree(out, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out" / "posthoc" / "seed-0").iterdir())
    code, stdout, stderr = _main("demo", *TINY, "--posthoc", "--out", str(tmp_path / "out"))
    assert code == 2 and stdout == ""  # before training
    assert "already holds post-hoc snapshots (or other files) from an earlier run" in stderr
    assert "Remove it, or choose another --out." in stderr
    assert sorted(p.name for p in (tmp_path / "out" / "posthoc" / "seed-0").iterdir()) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--posthoc-sigma-rels", "0.1"], "--posthoc-sigma-rels applies with --posthoc"),
        (["--snapshot-every", "5"], "--snapshot-every applies with --posthoc"),
        (["--posthoc", "--posthoc-sigma-rels", "0.3"], "sigma_rel must be in (0, 0.2887)"),
        (["--posthoc", "--posthoc-sigma-rels", "0.1,0.1"], "sigma_rel values must be distinct"),
        (["--posthoc", "--posthoc-sigma-rels", "a"], "expected sigma_rel values separated by"),
        (["--posthoc", "--snapshot-every", "0"], "expected a positive integer, got '0'"),
        (["--compare", "nope:x=1"], "--compare: unknown schedule 'nope'"),
        (["--val-fraction", "1.5"], "val_fraction must be in [0, 1), got val_fraction=1.5"),
    ],
)
def test_demo_posthoc_option_errors(tmp_path: Path, args: list[str], message: str) -> None:
    code, stdout, stderr = _main("demo", *TINY, *args, "--out", str(tmp_path / "o"))
    assert code == 2 and stdout == ""
    assert message in stderr
    assert "Traceback" not in stderr


# ---------------------------------------------------------------- polyak posthoc --eval


ROW = re.compile(r"^\s*(\d\.\d{4})\s+(\d+\.\d{3})\s+(\d+\.\d\d)%\s+(\d\.\d{4})\s+(\d+\.\d\d)%(.*)$")


def _table(stdout: str) -> list[tuple[float, str, str, str, bool]]:
    rows = []
    for line in stdout.splitlines():
        if m := ROW.match(line):
            rows.append((float(m[1]), m[3], m[4], m[5], "best" in m[6]))
    return rows


@contextlib.contextmanager
def one_thread():
    """As the runs under test (--threads 1): the same reductions, so the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _accuracy(model: torch.nn.Module, data: DeviceData, split: str) -> float:
    """The whole split in one forward pass, compared with the labels by hand."""
    x, y = (data.x_val, data.y_val) if split == "val" else (data.x_test, data.y_test)
    model.eval()
    with torch.no_grad(), one_thread():
        predicted = model(data.normalize(x)).argmax(dim=1)
    return float((predicted == y).double().mean())


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory: pytest.TempPathFactory):
    out, _, _ = run
    result = tmp_path_factory.mktemp("sweep")
    code, stdout, stderr = _main(
        "posthoc", "--snapshots", str(out / "posthoc" / "seed-1"), "--sigma-rel",
        "0.03:0.21:7", "--eval", "--threads", "1", "--out", str(result),
    )  # fmt: skip
    assert code == 0, stderr
    return out, result, stdout


def test_the_table_is_what_reconstruct_gives(evaluated) -> None:
    out, _, stdout = evaluated
    table = _table(stdout)
    sigmas = [0.03, 0.06, 0.09, 0.12, 0.15, 0.18, 0.21]
    assert [row[0] for row in table] == sigmas
    states = posthoc.reconstruct(out / "posthoc" / "seed-1", sigmas)
    config = DemoConfig(width=8, batch_size=128, val_fraction=0.2).resolved()
    data = DeviceData(load_dataset(config), "cpu")
    for (sigma, val, _, test, _), state in zip(table, states, strict=True):
        model = SeedCNN(8, in_channels=1)
        model.load_state_dict(state, strict=True)
        with torch.random.fork_rng(), one_thread():
            torch.manual_seed(1)  # the run's seed: what the demo documents for update_bn
            update_bn(bn_batches(data, config, 1), model)
        assert f"{100 * _accuracy(model, data, 'val'):.2f}" == val, sigma
        assert f"{100 * _accuracy(model, data, 'test'):.2f}" == test, sigma


def test_best_is_chosen_on_validation_and_saved(evaluated) -> None:
    _, result, stdout = evaluated
    table = _table(stdout)
    saved = json.loads((result / "sweep.json").read_text())
    rows = saved["rows"]
    assert [f"{100 * r['val_acc']:.2f}" for r in rows] == [row[1] for row in table]
    assert [f"{100 * r['test_acc']:.2f}" for r in rows] == [row[3] for row in table]
    # highest validation accuracy, then lowest validation loss (an independent argmax)
    top = max(r["val_acc"] for r in rows)
    expected = min((r["val_loss"], i) for i, r in enumerate(rows) if r["val_acc"] == top)[1]
    assert [row[4] for row in table] == [i == expected for i in range(len(rows))]
    assert saved["best"] == rows[expected]
    assert saved["run"]["seed"] == 1 and saved["at"] == 30 and saved["snapshots"] == 10
    assert list(saved["compare"]) == ["tf_warmup:decay=0.99", "constant:decay=0.9"]
    # the best file loads into the plain demo model and gives the accuracy printed
    model = SeedCNN(8, in_channels=1)
    model.load_state_dict(load_file(result / "best.safetensors"), strict=True)
    config = DemoConfig(width=8, batch_size=128, val_fraction=0.2).resolved()
    data = DeviceData(load_dataset(config), "cpu")
    best = table[expected]
    assert f"{100 * _accuracy(model, data, 'test'):.2f}" == best[3]
    assert f"{100 * _accuracy(model, data, 'val'):.2f}" == best[1]
    assert f"best by validation: sigma_rel {best[0]:.4f}, val {best[1]}%, test {best[3]}%" in stdout
    assert (result / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(result.glob(".*.tmp"))


def test_best_row_breaks_ties_by_validation_loss_and_never_reads_test() -> None:
    rows = [
        {"val_acc": 0.90, "val_loss": 0.05, "test_acc": 0.99},
        {"val_acc": 0.95, "val_loss": 0.30, "test_acc": 0.90},
        {"val_acc": 0.95, "val_loss": 0.20, "test_acc": 0.91},
        {"val_acc": 0.95, "val_loss": 0.20, "test_acc": 0.98},
        {"val_acc": 0.94, "val_loss": 0.01, "test_acc": 0.97},
    ]
    assert best_row(rows) == 2  # accuracy first, then loss, then the first of equals
    assert best_row([{k: v for k, v in r.items() if k != "test_acc"} for r in rows]) == 2
    assert best_row(rows[:2]) == 1 and best_row(rows[:1]) == 0
    with pytest.raises(ValueError, match="at least one evaluated row"):
        best_row([])


def test_one_reconstruct_call_for_the_whole_sweep(
    run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _, _ = run
    calls = []
    reconstruct = posthoc.reconstruct

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return reconstruct(*args, **kwargs)

    monkeypatch.setattr(posthoc, "reconstruct", spy)
    code, _, stderr = _main(
        "posthoc", "--snapshots", str(out / "posthoc" / "seed-0"), "--sigma-rel", "0.05,0.1,0.2",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, stderr
    assert len(calls) == 1 and list(calls[0][0][1]) == [0.05, 0.1, 0.2]


def test_without_eval_every_reconstruction_is_written(run, tmp_path: Path) -> None:
    out, _, _ = run
    snaps = out / "posthoc" / "seed-0"
    code, stdout, stderr = _main(
        "posthoc", "--snapshots", str(snaps), "--sigma-rel", "0.04,0.2", "--at", "21",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, stderr
    assert "rebuilt at step 21 from 6 snapshot files" in stdout
    for sigma in (0.04, 0.2):
        saved = load_file(tmp_path / f"sigma_rel-{sigma:.4f}.safetensors")
        direct = posthoc.reconstruct(snaps, sigma, at=21)
        assert saved.keys() == direct.keys()
        assert all(torch.equal(saved[k], direct[k]) for k in saved)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["best"] is None and [r["sigma_rel"] for r in saved["rows"]] == [0.04, 0.2]
    assert not (tmp_path / "sweep.png").exists()


def test_an_earlier_step_is_not_compared_with_the_final_fixed_emas(run, tmp_path: Path) -> None:
    out, _, _ = run
    code, stdout, stderr = _main(
        "posthoc", "--snapshots", str(out / "posthoc" / "seed-0"), "--sigma-rel", "0.1,0.2",
        "--at", "14", "--eval", "--no-plot", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, stderr
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["at"] == 14 and saved["compare"] == {}
    assert "fixed EMA" not in stdout and not (tmp_path / "sweep.png").exists()


def test_bn_copy_keeps_the_live_statistics_of_the_last_snapshot(tmp_path: Path) -> None:
    code, _, stderr = _main(
        "demo", *TINY, "--seeds", "1", "--bn", "copy", "--posthoc", "--snapshot-every", "10",
        "--compare", "tf_warmup:decay=0.99", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert code == 0, stderr
    # With bn=copy no evaluation draws random numbers: the compared slot with the demo's own
    # schedule is, bit for bit, the demo's EMA, evaluated the other way (a copy, not swapped).
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["runs"][0]["final"]
    assert final["compare"]["tf_warmup:decay=0.99"]["test_acc"] == final["ema_acc"] > 0.3
    snaps = tmp_path / "run" / "posthoc"
    code, _, stderr = _main(
        "posthoc", "--snapshots", str(snaps), "--sigma-rel", "0.1,0.2", "--eval", "--no-plot",
        "--out", str(tmp_path / "sweep"),
    )  # fmt: skip
    assert code == 0, stderr
    best = load_file(tmp_path / "sweep" / "best.safetensors")
    last = load_file(posthoc.read_index(snaps)[-1].path)
    for name in ("stage1.0.bn.running_mean", "bn_logits.running_var"):
        assert torch.equal(best[name], last[name]), name
    reconstructed = posthoc.reconstruct(snaps, 0.2)  # untracked: a blend of the snapshots
    assert not torch.equal(reconstructed["bn_logits.running_var"], last["bn_logits.running_var"])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0.02:0.28", "expected START:STOP:NUM (e.g. 0.02:0.28:14"),
        ("a:b:3", "expected START:STOP:NUM"),
        ("0.02:0.28:2.5", "expected START:STOP:NUM"),
        ("0.02:0.28:1", "a sigma_rel sweep needs num >= 2 values, got num=1"),
        ("0.2:0.1:3", "goes from start to a larger stop, got start=0.2, stop=0.1"),
        ("0:0.2:5", "sigma_rel must be in (0, 0.2887)"),
        (
            "0.1:0.3:5",
            "sigma_rel must be in (0, 0.2887) for post-hoc EMA (gamma > 0, EDM2 eq. 4), got sigma_rel=0.3",
        ),
        ("0.05,0.29", "got sigma_rel=0.29"),
        ("0.05,x", "expected sigma_rel values separated by commas"),
    ],
)
def test_bad_sigma_rel_spec(run, spec: str, message: str) -> None:
    out, _, _ = run
    code, stdout, stderr = _main(
        "posthoc", "--snapshots", str(out / "posthoc" / "seed-0"), "--sigma-rel", spec
    )
    assert code == 2 and stdout == ""
    assert stderr.startswith("usage: polyak posthoc ")
    assert "polyak posthoc: error: argument --sigma-rel: " in stderr and message in stderr


def test_sigma_rel_grid() -> None:
    assert sigma_rel_grid(0.02, 0.28, 14) == [round(0.02 * k, 10) for k in range(1, 15)]
    grid = sigma_rel_grid(0.01, 0.2, 4)
    np.testing.assert_allclose(grid, np.linspace(0.01, 0.2, 4), rtol=0, atol=1e-10)  # rounded
    assert grid[0] == 0.01 and grid[-1] == 0.2


def _error(*args: str) -> str:
    code, stdout, stderr = _main("posthoc", *args)
    assert code == 2 and stdout == "" and "Traceback" not in stderr
    return stderr


def test_missing_and_empty_directories(tmp_path: Path) -> None:
    err = _error("--snapshots", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert err.startswith(
        f"polyak posthoc: error: snapshot directory {tmp_path / 'nope'} does not exist"
    )
    (tmp_path / "empty").mkdir()
    err = _error("--snapshots", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert f"no index.json in {tmp_path / 'empty'}: not a post-hoc snapshot directory" in err
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "index.json").write_text(
        json.dumps({"format": "polyak.posthoc", "version": 1, "snapshots": []})
    )
    err = _error("--snapshots", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert "lists no snapshots; training has not written any yet" in err
    assert not (tmp_path / "o").exists()


def test_a_directory_of_several_seeds(run) -> None:
    out, _, _ = run
    err = _error("--snapshots", str(out / "posthoc"))
    assert "holds the snapshots of 2 seeds (seed-0, seed-1); pass one of them, e.g. " in err
    assert f"--snapshots {out / 'posthoc' / 'seed-0'}" in err


def test_at_without_snapshots(run, tmp_path: Path) -> None:
    out, _, _ = run
    err = _error(
        "--snapshots", str(out / "posthoc" / "seed-0"), "--at", "8", "--out", str(tmp_path)
    )
    assert "got at=8; the 5 snapshot steps are [7, 14, 21, 28, 30]" in err


def test_eval_needs_the_demo_run(run, tmp_path: Path) -> None:
    out, _, _ = run
    shutil.copytree(out / "posthoc" / "seed-0", tmp_path / "a" / "b" / "elsewhere")
    err = _error(
        "--snapshots",
        str(tmp_path / "a" / "b" / "elsewhere"),
        "--eval",
        "--out",
        str(tmp_path / "o"),
    )
    assert (
        "--eval evaluates snapshots that `polyak demo --posthoc` wrote, but no metrics.json" in err
    )
    assert "leave --eval out to only rebuild the weights" in err


def test_eval_needs_a_validation_split(tmp_path: Path) -> None:
    code, _, stderr = _main(
        "demo",
        *TINY,
        "--steps",
        "4",
        "--seeds",
        "1",
        "--posthoc",
        "--val-fraction",
        "0",
        "--out",
        str(tmp_path),
    )
    assert code == 0, stderr
    err = _error("--snapshots", str(tmp_path / "posthoc"), "--eval", "--out", str(tmp_path / "o"))
    assert "held out no validation split (val_fraction 0.0)" in err
    assert "Re-run the demo with --posthoc (which holds out 0.2 of the training images)" in err


def test_posthoc_help(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    code, stdout, _ = _main("posthoc", "--help")
    assert code == 0
    out = " ".join(stdout.split())
    for option in ("--snapshots DIR", "--sigma-rel START:STOP:NUM | S[,S...]", "--at STEP",
                   "--eval", "--out DIR", "(default: 0.02:0.28:14)"):  # fmt: skip
        assert option in out
    args = build_parser().parse_args(["posthoc", "--snapshots", "x"])
    assert args.sigma_rel == sigma_rel_grid(0.02, 0.28, 14)
