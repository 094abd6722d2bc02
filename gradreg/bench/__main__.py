"""``python -m gradreg.bench``: the benchmark's command line (see :mod:`gradreg.bench`).

Every user error — an unknown method or model, a model function that is missing, fails or returns something
else than an ``nn.Module``, an empty ``--methods``, a count below 1, a malformed ``--input-shape``, a device that
is not there, a ``--json`` path that cannot be written (checked before the run) — is an argparse usage error:
exit status 2 and a one-line message that names the argument, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from gradreg._cli import dependency_warnings_hidden, device_arg
from gradreg.bench.measure import BREAKDOWN_ROWS, benchmark, breakdown
from gradreg.bench.report import BenchResult, Breakdown
from gradreg.bench.steppers import ATTENTION, DEFAULT_STEP, ROWS, StepConfig
from gradreg.bench.workloads import check_model_name, is_custom, load_custom_model


def _integer(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no method given: choose one or more of {','.join(ROWS)}")
    unknown = [m for m in names if m not in ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method {unknown[0]!r}: choose from {','.join(ROWS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a method is listed twice in {text!r}")
    return names


def _model(text: str) -> str:
    try:
        check_model_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _shape(text: str) -> list[int]:
    try:
        shape = [int(n) for n in text.split(",")]
    except ValueError:
        shape = []
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, e.g. 3,32,32; got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gradreg.bench",
        description="Time, peak memory and FLOPs of one training step of SGD, two plain passes, F-GR, B-GR, "
        "C-GR, DB-GR and DB through torch.func, measured side by side.",
    )
    count, add = _integer(1), parser.add_argument
    add("--model", type=_model, default="mlp",
        help="mlp (default), resnet18, transformer, or your own: package.module:function, a function that returns "
        "an nn.Module (then also --input-shape, --num-classes)")
    add("--input-shape", type=_shape, default=None, help="your own model's input shape per example, e.g. 3,32,32")
    add("--num-classes", type=count, default=None, help="your own model's number of classes (default 10)")
    add("--depth", type=count, default=8, help="MLP depth L (default 8)")
    add("--width", type=count, default=512, help="MLP width (default 512)")
    add("--batch-size", type=count, default=None,
        help="default: 128 (mlp, resnet18, the paper's CIFAR batch size), 32 (transformer)")
    add("--seq-len", type=count, default=64, help="transformer sequence length (default 64)")
    add("--repeats", type=count, default=10, help="timed (or profiled) rounds (default 10)")
    add("--warmup", type=_integer(0), default=2, help="untimed rounds first (default 2)")
    add("--device", type=device_arg, default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add("--methods", type=_methods, default=None,
        help=f"comma-separated subset of {','.join(ROWS)} (default: all; with --breakdown: "
        f"{','.join(BREAKDOWN_ROWS)})")
    add("--gamma", type=_positive, default=DEFAULT_STEP.gamma,
        help=f"GR strength γ of the GR rows (default {DEFAULT_STEP.gamma}; with --eps: c = γ/ε, 1 for F-GR at γ = ε)")
    add("--eps", type=_positive, default=DEFAULT_STEP.eps,
        help=f"finite-difference step ε of the GR rows and of usam (F-GR at γ = ε) (default {DEFAULT_STEP.eps})")
    add("--rho", type=_positive, default=DEFAULT_STEP.rho, help=f"ρ of the sam rows (default {DEFAULT_STEP.rho})")
    add("--attention", choices=ATTENTION, default="default",
        help="'math' forces the unfused attention kernel (which has a double backward)")
    add("--threads", type=count, default=None, help="torch.set_num_threads (default: torch's choice)")
    add("--breakdown", action="store_true",
        help="instead of the table: where each method's step time goes, phase by phase, under torch.profiler")
    add("--no-memory", action="store_true", help="skip the peak-memory measurement")
    add("--no-flops", action="store_true", help="skip the FLOP count")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--json", default=None, metavar="PATH", help="also write the results as JSON")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks that involve several arguments or the file system, before anything runs."""
    if is_custom(args.model):
        if args.input_shape is None:
            parser.error(f"--model {args.model}: a model of your own needs --input-shape, e.g. --input-shape 3,32,32")
        try:
            importlib.import_module(args.model.partition(":")[0])
        except ImportError as exc:
            parser.error(f"--model {args.model}: cannot import it ({exc}); is its folder on PYTHONPATH?")
        try:
            load_custom_model(args.model)
        except (ValueError, TypeError) as exc:
            parser.error(f"--model {args.model}: {exc}; give a function that returns an nn.Module")
        except Exception as exc:  # the user's function failed: say so in one line
            parser.error(f"--model {args.model}: calling it raised {type(exc).__name__}: {exc}")
    elif args.input_shape is not None or args.num_classes is not None:
        parser.error(f"--input-shape and --num-classes apply to a model of your own, not to --model {args.model}")
    if args.json is not None:
        _check_writable(parser, Path(args.json))


def _check_writable(parser: argparse.ArgumentParser, path: Path) -> None:
    if path.is_dir():
        parser.error(f"--json {path}: is a directory; give a file name")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        parser.error(f"--json {path}: cannot be written ({exc.strerror}); give a path in a writable folder")
    if not existed:
        path.unlink()


def main(argv: Sequence[str] | None = None) -> BenchResult | Breakdown:
    """The command; warnings of dependencies (e.g. torch's FutureWarnings) are not shown."""
    with dependency_warnings_hidden():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> BenchResult | Breakdown:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    workload = dict(depth=args.depth, width=args.width, batch_size=args.batch_size, seq_len=args.seq_len,
                    input_shape=args.input_shape, num_classes=args.num_classes or 10)
    result: BenchResult | Breakdown
    if args.breakdown:
        result = breakdown(
            args.model, methods=args.methods or BREAKDOWN_ROWS, rounds=args.repeats, warmup=args.warmup,
            device=args.device, progress=not args.no_progress,
            config=StepConfig(gamma=args.gamma, eps=args.eps, rho=args.rho, attention=args.attention),
            **workload,
        )
    else:
        result = benchmark(
            args.model, device=args.device, methods=args.methods or ROWS, repeats=args.repeats, warmup=args.warmup,
            memory=not args.no_memory, flops=not args.no_flops, attention=args.attention, gamma=args.gamma,
            eps=args.eps, rho=args.rho, progress=not args.no_progress, **workload,
        )
    print(result.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
