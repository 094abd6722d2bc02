"""What the two command lines (``python -m gradreg.bench``, ``python -m gradreg.experiments``) share: the
``--device`` argument type, the duplicate check of list arguments, and quiet dependencies."""

from __future__ import annotations

import argparse
import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch


def device_arg(text: str) -> str:
    """An argparse ``type``: ``cpu``, ``cuda``, ``cuda:N`` (an existing GPU) or ``mps`` where available."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA devices here "
                                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: choose cpu, cuda, cuda:N or mps")
    return text


def first_duplicate(values: Sequence[object]) -> object | None:
    """The first value that appears twice in ``values`` (None if none does)."""
    seen: list[object] = []
    for value in values:
        if value in seen:
            return value
        seen.append(value)
    return None


@contextlib.contextmanager
def dependency_warnings_hidden() -> Iterator[None]:
    """Warnings attributed to modules other than gradreg's (torch's FutureWarnings, numpy's, ...) are not shown:
    the command's output is its own. gradreg's warnings still are. For the CLI entry points only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"(gradreg(\.|$)|__main__$)")
        yield
