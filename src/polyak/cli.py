"""The ``polyak`` command line: ``polyak demo``, ``polyak posthoc`` (and ``polyak --version``).

``polyak demo`` trains the seed's CNN and reports the raw and the averaged weights' test accuracy
per epoch (see :mod:`polyak.demo.train`); with ``--posthoc`` it also writes post-hoc EMA
snapshots. ``polyak posthoc`` rebuilds a sweep of EMA lengths from snapshots and, with
``--eval``, scores each on the demo's validation and test splits and keeps the best by validation
(see :mod:`polyak.demo.sweep`). Run ``polyak demo --help`` or ``polyak posthoc --help``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polyak
from polyak.schedules import factories as schedule_factories
from polyak.schedules import parse as parse_schedule

__all__ = ["build_parser", "main", "parse_schedule", "schedule_factories"]

_SWEEP = "0.02:0.28:14"  # polyak posthoc's default --sigma-rel


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parts(text: str) -> list[int]:
    try:
        parts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected part numbers separated by commas (e.g. 0 or 0,1), got {text!r}"
        ) from None
    if not parts:
        raise argparse.ArgumentTypeError(f"expected at least one part number, got {text!r}")
    return parts


def _sigma_rel_list(text: str) -> tuple[float, ...]:
    """``0.05,0.10`` -> (0.05, 0.1), each checked to lie in (0, sqrt(1/12))."""
    from polyak.posthoc import sigma_rel_to_gamma

    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected sigma_rel values separated by commas (e.g. 0.05,0.10), got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one sigma_rel, got {text!r}")
    for value in values:
        try:
            sigma_rel_to_gamma(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"sigma_rel values must be distinct, got {text!r}")
    return values


def _sigma_rel_spec(text: str) -> list[float]:
    """``START:STOP:NUM`` (``NUM`` evenly spaced values, both ends included) or ``S[,S...]``."""
    from polyak.demo.sweep import sigma_rel_grid

    if ":" not in text:
        return list(_sigma_rel_list(text))
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:STOP:NUM (e.g. 0.02:0.28:14: 14 values from 0.02 to 0.28) or "
            f"values separated by commas (e.g. 0.05,0.10), got {text!r}"
        ) from None
    try:
        return sigma_rel_grid(start, stop, num)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


def _by_dataset(key: str) -> str:
    """``digits 15, cifar10 30``: the per-dataset defaults of a ``DemoConfig`` field."""
    from polyak.demo.train import DATASET_DEFAULTS

    def show(value: object) -> str:
        return format(value, "g") if isinstance(value, (int, float)) else str(value)

    return ", ".join(f"{name} {show(defaults[key])}" for name, defaults in DATASET_DEFAULTS.items())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``polyak`` command.

    Every option of ``polyak demo`` states its default in its help, as the run will use it: the
    per-dataset defaults come from :data:`polyak.demo.train.DATASET_DEFAULTS`, the others from
    :class:`polyak.demo.train.DemoConfig`.
    """
    from polyak.demo import train as train_defaults
    from polyak.demo.train import DemoConfig

    config = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="polyak", description="Weight averaging (EMA) for PyTorch: tools and a demo."
    )
    parser.add_argument("--version", action="version", version=f"polyak {polyak.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="train the seed CNN and compare raw and EMA test accuracy",
        description=(
            "Train the seed's CNN (9 convolutions with BatchNorm, leaky ReLU 0.1, dropout 0.5) "
            "with SGD and report the raw and the EMA weights' test accuracy per epoch. "
            "Defaults: scikit-learn's digits, on the CPU, in under a minute. "
            "Writes metrics.json and accuracy.png to --out."
        ),
    )
    demo.set_defaults(command_parser=demo)  # usage errors then name "polyak demo"
    data = demo.add_argument_group("data")
    data.add_argument(
        "--dataset",
        choices=("digits", "cifar10"),
        default=config.dataset,
        help="scikit-learn's bundled 8x8 digits (no download), or CIFAR-10 read from --data "
        "(default: %(default)s)",
    )
    data.add_argument(
        "--data",
        metavar="PATH",
        help="CIFAR-10: a directory of part-<i>.npz files, a single .npz, or the official "
        "cifar-10-batches-bin directory (required with --dataset cifar10)",
    )
    data.add_argument(
        "--parts",
        type=_parts,
        metavar="I[,J...]",
        help="CIFAR-10 parts layout: use only these parts, e.g. 0: 12.5k train / 2.5k test "
        "(default: every part found)",
    )
    train = demo.add_argument_group("training")
    train.add_argument(
        "--device", default=config.device, help="cpu, cuda, cuda:1, ... (default: %(default)s)"
    )
    train.add_argument(
        "--epochs",
        type=_positive_int,
        help=f"full passes over the training set (default: {_by_dataset('epochs')})",
    )
    train.add_argument(
        "--steps",
        type=_positive_int,
        help="a fixed budget of optimizer steps instead of --epochs (default: --epochs decides)",
    )
    train.add_argument(
        "--batch-size",
        type=_positive_int,
        help=f"training batch size (default: {_by_dataset('batch_size')})",
    )
    train.add_argument("--lr", type=float, help=f"SGD learning rate (default: {_by_dataset('lr')})")
    train.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default=config.lr_schedule,
        help="the learning rate after the warm-up: constant, or a cosine decay to 0 at the last "
        "step (default: %(default)s)",
    )
    train.add_argument(
        "--lr-warmup",
        type=int,
        default=config.lr_warmup,
        metavar="STEPS",
        help="steps of linear learning-rate warm-up (default: %(default)s)",
    )
    train.add_argument(
        "--momentum",
        type=float,
        default=config.momentum,
        help="SGD (Nesterov) momentum (default: %(default)s)",
    )
    train.add_argument(
        "--weight-decay",
        type=float,
        help=f"SGD weight decay (default: {_by_dataset('weight_decay')})",
    )
    train.add_argument(
        "--label-smoothing",
        type=float,
        default=config.label_smoothing,
        metavar="EPS",
        help="label smoothing of the cross-entropy loss, in [0, 1) (default: %(default)s)",
    )
    train.add_argument(
        "--width",
        type=_positive_int,
        help=f"first-stage channels, 96 in the seed (default: {_by_dataset('width')})",
    )
    train.add_argument(
        "--seeds",
        type=_positive_int,
        metavar="N",
        help="runs with seeds SEED..SEED+N-1, reported as mean ± std "
        f"(default: {_by_dataset('seeds')})",
    )
    train.add_argument(
        "--seed", type=int, default=config.seed, help="the first seed (default: %(default)s)"
    )
    train.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on for cuda, off otherwise)",
    )
    train.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: on for cuda, off otherwise)",
    )
    train.add_argument(
        "--compile", action="store_true", help="torch.compile the model (default: off)"
    )
    train.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="torch CPU threads for the run; results are reproducible for a given seed and "
        "thread count (default: torch's setting, usually the number of cores)",
    )
    averaging = demo.add_argument_group("averaging")
    decay = averaging.add_mutually_exclusive_group()
    decay.add_argument("--decay", type=float, help=f"EMA decay (default: {_by_dataset('decay')})")
    decay.add_argument(
        "--schedule",
        metavar="NAME[:key=value,...]",
        help="a polyak.schedules factory instead of --decay, e.g. power:sigma_rel=0.1 "
        "(default: tf_warmup with the --decay value)",
    )
    averaging.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="use the constant --decay from the first update; without this flag the decay at "
        "update n is min(decay, (1+n)/(10+n)), TensorFlow's warm-up",
    )
    averaging.add_argument(
        "--bn",
        choices=("average", "copy", "recompute"),
        help="BatchNorm statistics of the averages: averaged, copied from the live model (the "
        "seed's setup), or recomputed with polyak.bn.update_bn before each evaluation "
        f"(default: {_by_dataset('bn')})",
    )
    averaging.add_argument(
        "--bn-batches",
        type=_positive_int,
        default=config.bn_batches,
        metavar="N",
        help="training batches update_bn sees for --bn recompute (default: %(default)s)",
    )
    posthoc = demo.add_argument_group("post-hoc EMA (choose the EMA length after training)")
    posthoc.add_argument(
        "--posthoc",
        action="store_true",
        help="also keep power-function EMAs (EDM2) and write their snapshots to OUT/posthoc "
        "(OUT/posthoc/seed-<n> with several seeds), for polyak posthoc; holds out a validation "
        "split (see --val-fraction) (default: off)",
    )
    posthoc.add_argument(
        "--posthoc-sigma-rels",
        type=_sigma_rel_list,
        metavar="S[,S...]",
        help="the sigma_rel of the tracked power-function EMAs, in (0, 0.2887) "
        f"(default: {','.join(f'{s:.2f}' for s in config.posthoc_sigma_rels)})",
    )
    posthoc.add_argument(
        "--snapshot-every",
        type=_positive_int,
        metavar="N",
        help=f"write a snapshot every N optimizer steps, and at the end (default: total steps "
        f"// {train_defaults._SNAPSHOTS}, about {train_defaults._SNAPSHOTS} snapshots)",
    )
    posthoc.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="hold out this fraction of the training images (by class, fixed) for validation "
        f"(default: {train_defaults._POSTHOC_VAL_FRACTION} with --posthoc, else 0)",
    )
    posthoc.add_argument(
        "--compare",
        action="append",
        metavar="NAME[:key=value,...]",
        help="also keep an EMA with this schedule (as --schedule) and report its final "
        "validation and test accuracy; repeat for several, e.g. --compare "
        "tf_warmup:decay=0.999 (default: none)",
    )
    output = demo.add_argument_group("output")
    output.add_argument(
        "--out",
        default=config.out,
        metavar="DIR",
        help="directory for metrics.json and accuracy.png, created if missing "
        "(default: %(default)s)",
    )
    output.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar on stderr (without this flag, one is shown)",
    )
    output.add_argument(
        "--no-plot",
        dest="plot",
        action="store_false",
        help="do not write accuracy.png (without this flag, it is written)",
    )
    _add_posthoc(commands)
    return parser


def _add_posthoc(commands: Any) -> None:
    sweep = commands.add_parser(
        "posthoc",
        help="rebuild EMAs of any length from post-hoc snapshots, and choose one on validation",
        description=(
            "Rebuild the power-function EMA of each sigma_rel from post-hoc EMA snapshots "
            "(EDM2; polyak.posthoc.reconstruct, one pass over the files) and write the weights. "
            "With --eval (snapshots of `polyak demo --posthoc`), score each on the demo's "
            "validation and test splits, print the table, plot accuracy against sigma_rel, and "
            "save the best by validation as safetensors."
        ),
    )
    sweep.set_defaults(command_parser=sweep)
    sweep.add_argument(
        "--snapshots",
        required=True,
        metavar="DIR",
        help="a snapshot directory (its index.json), e.g. polyak-demo/posthoc/seed-0",
    )
    sweep.add_argument(
        "--sigma-rel",
        type=_sigma_rel_spec,
        default=_SWEEP,
        metavar="START:STOP:NUM | S[,S...]",
        help="the sigma_rel to rebuild, each in (0, 0.2887): NUM evenly spaced values from "
        f"START to STOP, or a list (default: {_SWEEP})",
    )
    sweep.add_argument(
        "--at",
        type=_positive_int,
        metavar="STEP",
        help="rebuild the EMAs as they were at this snapshot step (default: the last)",
    )
    sweep.add_argument(
        "--eval",
        action="store_true",
        help="score each on the demo run's validation and test splits and keep the best by "
        "validation (default: off: write every reconstruction)",
    )
    sweep.add_argument(
        "--out",
        default="polyak-posthoc",
        metavar="DIR",
        help="where sweep.json, sweep.png and the weights go, created if missing "
        "(default: %(default)s)",
    )
    sweep.add_argument("--device", default="cpu", help="where to evaluate (default: %(default)s)")
    sweep.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="torch CPU threads (default: torch's setting, usually the number of cores)",
    )
    sweep.add_argument(
        "--no-plot",
        dest="plot",
        action="store_false",
        help="do not write sweep.png (without this flag, --eval writes it)",
    )


def _several_seeds(directory: Path) -> list[str]:
    """The subdirectories of ``directory`` that are snapshot directories (``seed-<n>``)."""
    from polyak.posthoc import INDEX

    if not directory.is_dir() or (directory / INDEX).exists():
        return []
    return sorted(p.name for p in directory.iterdir() if (p / INDEX).is_file())


def _posthoc(args: argparse.Namespace) -> int:
    import torch

    from polyak.demo.sweep import save, sweep

    directory = Path(args.snapshots)
    seeds = _several_seeds(directory)
    if seeds:
        print(
            f"polyak posthoc: error: {str(directory)!r} holds the snapshots of {len(seeds)} "
            f"seeds ({', '.join(seeds)}); pass one of them, e.g. --snapshots "
            f"{directory / seeds[0]}",
            file=sys.stderr,
        )
        return 2
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = sweep(directory, args.sigma_rel, args.at, evaluate=args.eval, device=args.device)
        written = save(result, args.out, plot=args.plot)
    except (FileNotFoundError, ValueError) as error:
        print(f"polyak posthoc: error: {error}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print(
        f"polyak posthoc: {len(result.rows)} sigma_rel rebuilt at step {result.at} from "
        f"{result.snapshots} snapshot files in {directory}"
    )
    if result.best is None:
        print(f"{'sigma_rel':>9} {'gamma':>8}  file")
        for row, path in zip(result.rows, written, strict=False):
            print(f"{row['sigma_rel']:>9.4f} {row['gamma']:>8.3f}  {path}")
    else:
        print(f"{'sigma_rel':>9} {'gamma':>8} {'val acc':>8} {'val loss':>8} {'test acc':>8}")
        for i, row in enumerate(result.rows):
            print(
                f"{row['sigma_rel']:>9.4f} {row['gamma']:>8.3f} {100 * row['val_acc']:>7.2f}% "
                f"{row['val_loss']:>8.4f} {100 * row['test_acc']:>7.2f}%"
                + ("  <- best by validation" if i == result.best else "")
            )
        for spec, scores in result.compare.items():
            print(
                f"fixed EMA {spec}: val {100 * scores['val_acc']:.2f}%, test "
                f"{100 * scores['test_acc']:.2f}%"
            )
        best = result.rows[result.best]
        print(
            f"best by validation: sigma_rel {best['sigma_rel']:.4f}, val "
            f"{100 * best['val_acc']:.2f}%, test {100 * best['test_acc']:.2f}%"
        )
    print(
        f"wrote {', '.join(str(p) for p in written if p.suffix != '.safetensors' or result.best is not None)}"
    )
    return 0


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from polyak.demo.train import (
        DemoConfig,
        check_out_dir,
        check_snapshot_dir,
        load_dataset,
        run_demo,
    )

    if args.schedule is not None:
        try:
            parse_schedule(args.schedule)
        except ValueError as error:
            parser.error(str(error))
        if not args.warmup:
            parser.error(
                "--no-warmup applies to --decay only; with --schedule, choose the warm-up in the "
                "schedule itself (e.g. tf_warmup:decay=0.99 or constant:decay=0.99)."
            )
    if args.dataset == "digits" and (args.data is not None or args.parts is not None):
        parser.error(
            "--data and --parts apply to --dataset cifar10 (digits ship with scikit-learn)"
        )
    if args.dataset == "cifar10" and args.data is None:
        parser.error(
            "--dataset cifar10 needs --data PATH: a directory of part-<i>.npz files, a single "
            ".npz, or the official cifar-10-batches-bin directory "
            "(https://www.cs.toronto.edu/~kriz/cifar.html)."
        )
    if args.epochs is not None and args.steps is not None:
        parser.error(
            f"give --epochs or --steps, not both (got --epochs {args.epochs} --steps {args.steps})"
        )
    if not args.posthoc:
        for option, value in (
            ("--posthoc-sigma-rels", args.posthoc_sigma_rels),
            ("--snapshot-every", args.snapshot_every),
        ):
            if value is not None:
                parser.error(f"{option} applies with --posthoc; add --posthoc to keep snapshots")
    for spec in args.compare or ():
        try:
            parse_schedule(spec)
        except ValueError as error:
            parser.error(f"--compare: {error}")
    fields = set(DemoConfig.__dataclass_fields__)
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    given["compare"] = tuple(args.compare or ())
    config = DemoConfig(**given)
    try:  # problems with the options, the data or --out: a message, not a traceback
        config = config.resolved()
        data = load_dataset(config)
        check_out_dir(config.out)  # before training, not when the results are written
        if config.posthoc:
            check_snapshot_dir(config.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"polyak demo: error: {error}", file=sys.stderr)
        return 2
    run_demo(config, data=data)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``polyak`` console script and ``python -m polyak``; returns the exit code."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would report them with the top-level usage, not the subcommand's
        getattr(args, "command_parser", parser).error(
            f"unrecognized arguments: {' '.join(unknown)}"
        )
    if args.command == "demo":
        return _demo(args, args.command_parser)
    if args.command == "posthoc":
        return _posthoc(args)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks choices
    return 2
