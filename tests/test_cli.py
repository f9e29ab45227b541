"""polyak.cli: --version, --schedule parsing and its errors, argument and data-path errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import polyak
from polyak import schedules
from polyak.cli import build_parser, main, parse_schedule, schedule_factories
from polyak.demo import train
from polyak.demo.train import DATASET_DEFAULTS

SRC = str(Path(polyak.__file__).resolve().parents[1])


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "polyak", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_version_via_python_dash_m() -> None:
    result = _run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"polyak {polyak.__version__}"


def test_version_via_main(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"polyak {polyak.__version__}"


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_schedule_factories_are_those_of_polyak_schedules() -> None:
    names = set(schedule_factories())
    assert {"constant", "tf_warmup", "power", "half_life", "inverse_gamma", "scaled"} <= names
    assert not names & {"from_state", "to_state", "gamma_to_sigma_rel", "sigma_rel_to_gamma"}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("constant:decay=0.99", schedules.constant(0.99)),
        ("tf_warmup:decay=0.999", schedules.tf_warmup(0.999)),
        ("power:sigma_rel=0.1", schedules.power(sigma_rel=0.1)),
        ("power:gamma=7", schedules.power(gamma=7)),
        ("half_life:steps=100", schedules.half_life(steps=100)),
        (" inverse_gamma : inv_gamma=1, power=0.75 ", schedules.inverse_gamma(1, 0.75)),
        ("scaled:base=0.999,kappa=4", schedules.scaled(0.999, kappa=4)),
        ("inverse_gamma", schedules.inverse_gamma()),
    ],
)
def test_parse_schedule(spec: str, expected: schedules.Schedule) -> None:
    schedule = parse_schedule(spec)
    assert schedule == expected
    assert [schedule(n) for n in (1, 10, 1000)] == [expected(n) for n in (1, 10, 1000)]


def test_parse_schedule_reads_ints_as_ints() -> None:
    assert isinstance(parse_schedule("half_life:steps=100").steps, int)
    assert isinstance(parse_schedule("half_life:steps=100.5").steps, float)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "cosine:decay=0.9",
            "unknown schedule 'cosine' in --schedule 'cosine:decay=0.9'; valid names: anytime_half_life, constant, ",
        ),
        ("power:sigma=0.1", "power has no argument 'sigma'; valid keys: gamma, sigma_rel."),
        ("power:sigma_rel", "'sigma_rel' is not key=value; write e.g. power:gamma=0.999."),
        ("constant:decay=high", "decay='high' is not a number"),
        ("constant:decay=0.9,decay=0.8", "'decay' is given twice"),
        ("power:gamma=1,sigma_rel=0.1", "power() takes exactly one of gamma and sigma_rel"),
        ("constant:decay=1.5", "--schedule 'constant:decay=1.5': "),
    ],
)
def test_parse_schedule_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_schedule(spec)
    assert message in str(info.value)


def test_unknown_schedule_error_lists_every_valid_name() -> None:
    with pytest.raises(ValueError) as info:
        parse_schedule("nope")
    for name in schedule_factories():
        assert name in str(info.value)


def _demo_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--no-progress", *args])
    assert info.value.code == 2
    return capsys.readouterr().err


def test_demo_schedule_error_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = _demo_error(capsys, "--schedule", "powr:sigma_rel=0.1")
    assert "polyak demo: error: unknown schedule 'powr'" in err
    assert "valid names:" in err and "power" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--decay", "0.9", "--schedule", "constant:decay=0.9"],
            "not allowed with argument --decay",
        ),
        (["--schedule", "power:gamma=7", "--no-warmup"], "--no-warmup applies to --decay only"),
        (["--epochs", "2", "--steps", "10"], "give --epochs or --steps, not both"),
        (["--dataset", "cifar10"], "--dataset cifar10 needs --data PATH"),
        (["--data", "x"], "--data and --parts apply to --dataset cifar10"),
        (["--epochs", "0"], "expected a positive integer, got '0'"),
        (["--bn", "batch"], "invalid choice: 'batch'"),
        (
            ["--dataset", "cifar10", "--data", "d", "--parts", "a"],
            "expected part numbers separated",
        ),
    ],
)
def test_demo_argument_errors(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert message in _demo_error(capsys, *args)


def test_demo_bad_data_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-dir"
    code = main(
        ["demo", "--dataset", "cifar10", "--data", str(missing), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"polyak demo: error: CIFAR-10 path {str(missing)!r} does not exist.")
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in err
    assert not (tmp_path / "o").exists()


def test_demo_malformed_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "cifar.npz"
    bad.write_text("hello")
    assert main(["demo", "--dataset", "cifar10", "--data", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read CIFAR-10 from {str(bad)!r}: not a readable .npz archive" in err


def test_demo_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    for option in ("--dataset", "--data", "--parts", "--device", "--epochs", "--steps", "--batch-size",
                   "--lr", "--lr-schedule", "--decay", "--schedule", "--seeds", "--width", "--bn",
                   "--no-warmup", "--out"):  # fmt: skip
        assert option in out


# ---------------------------------------------------------------- polyak demo --help and usage


def _demo_help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """``polyak demo --help`` on one line per option (a wide terminal), whitespace collapsed."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_demo_help_shows_the_defaults_the_run_uses(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _demo_help(monkeypatch, capsys)
    # The per-dataset defaults, read from DATASET_DEFAULTS, not argparse's None placeholder.
    d, c = DATASET_DEFAULTS["digits"], DATASET_DEFAULTS["cifar10"]
    for option, key in (("--epochs EPOCHS", "epochs"), ("--batch-size BATCH_SIZE", "batch_size"),
                        ("--lr LR", "lr"), ("--weight-decay WEIGHT_DECAY", "weight_decay"),
                        ("--width WIDTH", "width"), ("--seeds N", "seeds"),
                        ("--decay DECAY", "decay")):  # fmt: skip
        start = out.index(option + " ", out.index("options:"))  # past the usage line
        entry = out[start : out.index(" --", start + len(option))]
        assert f"(default: digits {d[key]:g}, cifar10 {c[key]:g})" in entry, entry
    assert "(default: None)" not in out
    assert "(default: True)" not in out and "(default: False)" not in out
    for entry in ("--lr-warmup STEPS steps of linear learning-rate warm-up (default: 0)",
                  "--momentum MOMENTUM SGD (Nesterov) momentum (default: 0.9)",
                  "--bn-batches N training batches update_bn sees for --bn recompute "
                  "(default: 64)",
                  "(default: polyak-demo)", "(default: every part found)",
                  "(default: --epochs decides)", "(default: on for cuda, off otherwise)",
                  "(default: tf_warmup with the --decay value)"):  # fmt: skip
        assert entry in out


def test_demo_help_no_flags_say_what_happens_without_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _demo_help(monkeypatch, capsys)
    assert (
        "--no-warmup use the constant --decay from the first update; without this flag the "
        "decay at update n is min(decay, (1+n)/(10+n)), TensorFlow's warm-up" in out
    )
    assert "--no-progress no progress bar on stderr (without this flag, one is shown)" in out
    assert "--no-plot do not write accuracy.png (without this flag, it is written)" in out


def test_every_demo_option_has_help() -> None:
    demo = build_parser().parse_args(["demo"]).command_parser
    undocumented = [a.option_strings for a in demo._actions if not a.help]
    assert undocumented == []
    out = " ".join(demo.format_help().split())
    assert "--dataset {digits,cifar10} scikit-learn's bundled 8x8 digits" in out
    assert "--lr-schedule {constant,cosine} the learning rate after the warm-up" in out
    assert "--label-smoothing EPS label smoothing of the cross-entropy loss" in out


def test_demo_unknown_option_prints_the_demo_usage(capsys: pytest.CaptureFixture[str]) -> None:
    err = _demo_error(capsys, "--bogus", "x")
    assert err.startswith("usage: polyak demo ")
    assert "polyak demo: error: unrecognized arguments: --bogus x" in err


def test_unknown_option_before_the_command_is_still_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--bogus"])
    assert info.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


# ---------------------------------------------------------------- an unwritable --out


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any training run fail the test: the --out check must come before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started despite an unwritable --out")

    monkeypatch.setattr(train, "_Run", refuse)


def _out_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], out: Path) -> str:
    code = main(["demo", "--no-progress", "--steps", "1", "--out", str(out)])
    assert code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.out == ""  # not even the run's header: nothing started
    return captured.err


def test_demo_out_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    out = tmp_path / "results"
    out.write_text("not a directory")
    err = _out_error(tmp_path, capsys, out)
    assert err.startswith(
        f"polyak demo: error: cannot write metrics.json and accuracy.png to --out {str(out)!r}: "
        "it is a file, not a directory. Give a directory you can write to"
    )
    assert out.read_text() == "not a directory"


def test_demo_out_under_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    parent = tmp_path / "file"
    parent.write_text("")
    err = _out_error(tmp_path, capsys, parent / "out")
    assert f"to --out {str(parent / 'out')!r}: Not a directory." in err
    assert "(it is created if missing), e.g. --out ./polyak-demo." in err


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere"
)
def test_demo_out_in_a_read_only_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        err = _out_error(tmp_path, capsys, locked / "out")
    finally:
        locked.chmod(0o700)
    assert f"to --out {str(locked / 'out')!r}: Permission denied." in err


def test_demo_out_that_cannot_be_written(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_training: None,
) -> None:
    """What a read-only directory gives a user who is not root (as root, simulated)."""

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(train.tempfile, "mkstemp", denied)
    err = _out_error(tmp_path, capsys, tmp_path / "out")
    assert f"to --out {str(tmp_path / 'out')!r}: Permission denied." in err


def test_run_demo_checks_out_before_training(tmp_path: Path, no_training: None) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="it is a file, not a directory"):
        train.run_demo(train.DemoConfig(out=str(tmp_path / "file"), progress=False))


def test_check_out_dir_creates_the_directory_and_leaves_nothing_in_it(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    assert train.check_out_dir(out) == out
    assert out.is_dir() and list(out.iterdir()) == []
