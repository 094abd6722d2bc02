"""``python -m gradreg.experiments``: train sweeps of runs (resumable, cached on disk) and summarize them.

    python -m gradreg.experiments run --methods sgd forward backward --gamma 0.1 --eps 0.05 0.5 --seeds 0 1 2
    python -m gradreg.experiments run --preset mnist1d --results chapters/results/05_mnist1d
    python -m gradreg.experiments summary --results chapters/results/05_mnist1d
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from gradreg._cli import dependency_warnings_hidden, device_arg, first_duplicate
from gradreg.experiments.config import ALGORITHMS, DATASETS, HYPERPARAMETERS, SCHEDULES, RunConfig, grid
from gradreg.experiments.presets import PRESETS, preset
from gradreg.experiments.runner import _dataset, load_results, sweep
from gradreg.experiments.storage import StoredFileError
from gradreg.experiments.summary import best, format_table, summarize

MODEL_NAMES = ("mlp", "cnn1d", "resnet18")
GRID_FLAGS = ("methods", "gamma", "eps", "rho", "flood", "seeds", "dataset", "model", "width", "depth", "epochs",
              "batch_size", "lr", "momentum", "weight_decay", "schedule", "augment", "train_size")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gradreg.experiments",
        description="Train sweeps over methods, hyperparameters and seeds with SGD (momentum 0.9, weight decay "
                    "1e-4, cosine schedule, batch 128), GR, SAM or flooding. Each run writes RESULTS/<run_id>.json; "
                    "finished runs are reused, interrupted ones resume from their last epoch's checkpoint.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("run", help="train every run of a sweep (skips finished runs)")
    train.add_argument("--preset", choices=tuple(PRESETS), help="a named sweep (Chapter 5); excludes the grid flags")
    train.add_argument("--methods", nargs="+", choices=ALGORITHMS, metavar="METHOD",
                       help=f"one or more of {', '.join(ALGORITHMS)} (default: sgd)")
    for flag, text in (("gamma", "GR strength γ (double, forward, backward, central)"),
                       ("eps", "finite-difference step ε (forward, backward, central)"),
                       ("rho", "SAM radius ρ"), ("flood", "flood level b (flooding)")):
        train.add_argument(f"--{flag}", nargs="+", type=float, default=[], help=text)
    train.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0)")
    train.add_argument("--dataset", choices=DATASETS, help="default: mnist1d")
    train.add_argument("--model", choices=MODEL_NAMES, help="default: mlp")
    for flag, kind, text in (("width", int, "MLP hidden width or cnn1d channels"),
                             ("depth", int, "MLP linear layers (2 = one hidden layer)"),
                             ("epochs", int, "default: 60"), ("batch-size", int, "default: 128"),
                             ("lr", float, "initial learning rate (default: 0.1)"),
                             ("momentum", float, "default: 0.9"), ("weight-decay", float, "default: 1e-4"),
                             ("train-size", int, "use the first N training examples")):
        train.add_argument(f"--{flag}", type=kind, help=text)
    train.add_argument("--schedule", choices=SCHEDULES, help="default: cosine")
    train.add_argument("--augment", action=argparse.BooleanOptionalAction,
                       help="crops and flips (default: on for cifar10)")
    train.add_argument("--results", default="results", help="results folder (default: ./results)")
    train.add_argument("--device", type=device_arg, help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    train.add_argument("--jobs", type=_positive, default=1,
                       help="train in this many worker processes, each claiming runs in turn (default: 1)")
    train.add_argument("--retrain-corrupt", action="store_true",
                       help="delete a result or checkpoint that is corrupt or belongs to another run, and retrain")
    train.add_argument("--download", action="store_true",
                       help="download CIFAR-10 (the standard tarball, SHA-256 checked) if missing")
    train.add_argument("--keep-checkpoints", action="store_true", help="keep each run's last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    summary = commands.add_parser("summary", help="mean ± s.e. over seeds of every setting in a results folder")
    summary.add_argument("--results", default="results", help="results folder (default: ./results)")
    summary.add_argument("--metric", default="test_acc", help="a final metric, e.g. test_acc, test_loss, sharpness")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _results(parser: argparse.ArgumentParser, text: str, *, write: bool) -> Path:
    """``--results`` checked: no regular file on the way; with ``write``, a folder that exists or can be made
    and takes a file."""
    path = Path(text)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            parser.error(f"--results {text}: {part} is a regular file, not a folder; give a folder")
    if write:
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            parser.error(f"--results {text}: cannot be written ({exc.strerror or exc}); give a folder you can write")
    return path


def _check_data(parser: argparse.ArgumentParser, configs: list[RunConfig], download: bool) -> None:
    """Each data set loads, and holds the examples ``--train-size`` asks for."""
    for name in sorted({c.dataset for c in configs}):
        try:
            size = len(_dataset(name, download).x)
        except (FileNotFoundError, ImportError, OSError) as exc:
            parser.error(f"--dataset {name}: {exc}")
        wanted = max((c.train_size or 0 for c in configs if c.dataset == name), default=0)
        if wanted > size:
            parser.error(f"--train-size {wanted}: the {name} training set has {size} examples; give at most {size}")


def _configs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[RunConfig]:
    given = [f for f in GRID_FLAGS if getattr(args, f) not in (None, [])]
    if args.preset is not None:
        if given:
            parser.error(f"--preset {args.preset} cannot be combined with --{given[0].replace('_', '-')}")
        return preset(args.preset)
    common = {f: getattr(args, f) for f in GRID_FLAGS[6:] if getattr(args, f) is not None}
    methods = args.methods or ["sgd"]
    for name in ("methods", "seeds", "gamma", "eps", "rho", "flood"):
        twice = first_duplicate(getattr(args, name) or [])
        if twice is not None:
            parser.error(f"--{name}: {twice} is listed twice; give each value once")
    for name in ("gamma", "eps", "rho", "flood"):
        takers = [m for m, names in HYPERPARAMETERS.items() if name in names]
        if getattr(args, name) and not set(methods) & set(takers):
            parser.error(f"--{name} applies to --methods {' '.join(takers)}; none of {' '.join(methods)} takes it")
    try:
        return grid(methods, gammas=args.gamma, epss=args.eps, rhos=args.rho, floods=args.flood,
                    seeds=args.seeds or [0], **common)
    except ValueError as exc:
        parser.error(str(exc))
    raise AssertionError  # parser.error exits


def main(argv: Sequence[str] | None = None) -> int:
    """The command; warnings of dependencies (e.g. torch's FutureWarnings) are not shown."""
    parser = _parser()
    with dependency_warnings_hidden():
        try:
            return _main(parser, parser.parse_args(argv))
        except StoredFileError as exc:  # a bad file, not a bad command: one line, exit status 1
            parser.exit(1, f"{parser.prog}: error: {exc}\n")
    raise AssertionError  # parser.exit exits


def _summary(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    records = load_results(_results(parser, args.results, write=False))
    if not records:
        parser.error(f"--results {args.results}: no finished runs (*.json) there")
    try:
        rows = summarize(records, args.metric)
    except ValueError as exc:
        parser.error(str(exc))
    accuracy = args.metric.endswith("acc")
    style = {} if accuracy else {"scale": 1.0, "unit": args.metric}
    print(format_table(rows, **style))
    print(f"\nbest setting per method ({'highest' if accuracy else 'lowest'} mean {args.metric}):")
    print(format_table(best(rows, higher=accuracy).values(), **style))
    return 0


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "summary":
        return _summary(parser, args)
    configs = _configs(args, parser)
    if args.dry_run:
        print("\n".join(c.run_id for c in configs))
        print(f"{len(configs)} runs")
        return 0
    folder = _results(parser, args.results, write=True)
    _check_data(parser, configs, args.download)
    records = sweep(configs, folder, show_progress=not args.no_progress, device=args.device, jobs=args.jobs,
                    download=args.download, keep_checkpoint=args.keep_checkpoints,
                    retrain_corrupt=args.retrain_corrupt)
    print(format_table(summarize(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
