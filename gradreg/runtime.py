"""One call that every chapter makes: seeds, device, threads, plot style and the fast/full switch.

The book has one documented switch, the environment variable ``GRADREG_FULL``:

* unset (default): full-size experiments when a CUDA GPU is present, the fast CPU size otherwise;
* ``GRADREG_FULL=1``: full size even on a CPU (slow);
* ``GRADREG_FULL=0``: fast size even on a GPU (what CI and the committed notebooks use).

Threads (:func:`pick_threads`): an explicit choice is kept (``OMP_NUM_THREADS`` in the environment, or
``setup(threads=...)``). Otherwise the fast size runs on **one thread**: it is sized to take seconds to a minute
on one core; one thread cannot oversubscribe a busy laptop or a shared CI machine (two processes that each spin
threads on every core make both crawl, 10× and worse was measured on 2 cores); and it sums in the same order on
every machine. The full size uses torch's default (one thread per physical core) capped at :data:`MAX_THREADS`,
since small matrix products get slower, not faster, beyond a few threads. The thread count changes the order of
floating-point sums, so results differ in their last digits; what the chapters assert holds at any thread count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from gradreg._optional import require

FULL_ENV = "GRADREG_FULL"
CHECK_FIGURES_ENV = "GRADREG_CHECK_FIGURES"
#: The most intra-op threads :func:`pick_threads` chooses by itself (small models slow down beyond a few).
MAX_THREADS = 4
CACHE_ENV = "GRADREG_CACHE"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

T = TypeVar("T")


def full_size() -> bool:
    """Whether experiments run at full size: ``GRADREG_FULL`` if set, else whether CUDA is available."""
    value = os.environ.get(FULL_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value:
        raise ValueError(f"{FULL_ENV} must be one of 1/true/yes/on or 0/false/no/off, got {value!r}")
    return torch.cuda.is_available()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and all CUDA devices) random number generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


_TORCH_THREADS = torch.get_num_threads()  # torch's own choice (or OMP_NUM_THREADS), before setup() changes it


def pick_threads(threads: int | None = None, *, full: bool = False) -> tuple[int, str]:
    """The intra-op thread count for a chapter and why: ``threads`` if given, ``OMP_NUM_THREADS`` if the
    environment sets it, 1 at the fast size, torch's default capped at :data:`MAX_THREADS` at full size."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1 (or None for the automatic choice), got {threads!r}")
        return threads, "setup(threads=)"
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return _TORCH_THREADS, "OMP_NUM_THREADS"
    return (max(1, min(_TORCH_THREADS, MAX_THREADS)), "full size") if full else (1, "fast size")


@dataclass(frozen=True)
class Setup:
    """What a chapter runs with; ``size(fast, full)`` picks a value for the current size."""

    device: torch.device
    full: bool
    seed: int
    threads: int
    threads_why: str = ""

    def size(self, fast: T, full: T) -> T:
        """Return ``full`` in full-size mode and ``fast`` otherwise."""
        return full if self.full else fast

    def __repr__(self) -> str:
        from gradreg import __version__

        mode = "full" if self.full else "fast"
        return (
            f"Setup(device='{self.device}', size='{mode}', seed={self.seed}, threads={self.threads} "
            f"({self.threads_why}), "
            f"gradreg={__version__}, torch={torch.__version__})"
        )


def setup(seed: int = 0, *, style: bool = True, threads: int | None = None) -> Setup:
    """Seed everything, pick the device (CUDA when available) and the thread count (:func:`pick_threads`),
    set the plot style, read the size switch."""
    seed_everything(seed)
    full = full_size()
    count, why = pick_threads(threads, full=full)
    torch.set_num_threads(count)
    if style:
        require("matplotlib", extra="book", purpose="gr.setup(style=True), the book's plot style,")
        from gradreg.plotting import use_style

        use_style()
    if os.environ.get(CHECK_FIGURES_ENV, "").strip().lower() in _TRUE:
        _check_figures_after_each_cell()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Setup(device=device, full=full, seed=seed, threads=torch.get_num_threads(), threads_why=why)


def unlabelled_axes(figure: Any) -> list[str]:
    """The axes of a matplotlib ``figure`` that show data without an x or y label. An axis label may come from
    the axes, a figure-level ``supxlabel``/``supylabel``, or an axes it shares that axis with; axes turned off
    (drawings) and colour bars are exempt."""
    problems = []
    for index, ax in enumerate(figure.axes):
        if not ax.axison or ax.get_label() == "<colorbar>":
            continue
        for axis, sup, shared in (("x", figure._supxlabel, ax.get_shared_x_axes()),
                                  ("y", figure._supylabel, ax.get_shared_y_axes())):
            label = getattr(ax, f"get_{axis}label")
            if not (label() or sup or any(getattr(s, f"get_{axis}label")() for s in shared.get_siblings(ax))):
                problems.append(f"axes {index} ('{ax.get_title()}') has no {axis} label")
    return problems


def _check_figures_after_each_cell() -> None:
    """In a notebook kernel, after each cell and before the figures are shown: fail if a figure has an unlabelled
    axis. On when ``GRADREG_CHECK_FIGURES=1`` (the test suite sets it); a no-op outside IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or getattr(shell, "_gradreg_checks_figures", False):
        return

    def check() -> None:
        import matplotlib.pyplot as plt

        bad = {n: unlabelled_axes(plt.figure(n)) for n in plt.get_fignums()}
        problems = [f"figure {n}: {p}" for n, found in bad.items() for p in found]
        for n in (n for n, found in bad.items() if found):
            plt.close(n)  # reported once, in the cell that drew it
        if problems:
            raise AssertionError("gradreg: every axis that shows data needs a label: " + "; ".join(problems))

    shell.events.callbacks["post_execute"].insert(0, check)  # before the inline backend shows and closes figures
    shell._gradreg_checks_figures = True


def progress(iterable: Iterable[T], *, enabled: bool | None = None, **kwargs: Any) -> Iterable[T]:
    """A tqdm progress bar, shown in full-size mode only (fast runs take seconds and keep outputs stable)."""
    show = full_size() if enabled is None else enabled
    if not show:
        return iterable
    tqdm = require("tqdm.auto", extra="book", purpose="the progress bar of full-size runs").tqdm
    return tqdm(iterable, **kwargs)


def cache_dir() -> Path:
    """Where long runs keep their results: ``GRADREG_CACHE``, else ``~/.cache/gradreg``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "gradreg"))


def package_fingerprint() -> str:
    """A hash of gradreg's source files and torch's version: cached results die with any change to the code."""
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a fresh temporary file beside ``path`` (a name unique to this writer), flushed to disk,
    then moved onto ``path`` with ``os.replace``: readers see the old file or the new one, never part of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: The version of the cache files' format (a dict of ``schema``, ``key`` and the encoded ``result``).
CACHE_SCHEMA = 1


def _encode(value: Any) -> Any:
    """``value`` in the types ``torch.load(weights_only=True)`` reads: gradreg's dataclasses, tuples and numpy
    arrays become tagged dicts; anything else that is not a tensor, number, string, list or dict is refused."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith("gradreg."):
            raise TypeError(f"cached: cannot store a {cls.__qualname__} (only gradreg's dataclasses)")
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(value.copy())}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int, float, bool)) or k is None for k in value):
            raise TypeError("cached: dict keys must be strings or numbers")
        return {k: _encode(v) for k, v in value.items()}
    for kind in (bool, int, float, str):  # subclasses (torch.__version__'s TorchVersion) as the plain type
        if isinstance(value, kind):
            return kind(value)
    if value is None or isinstance(value, (torch.Tensor, torch.dtype, torch.device)):
        return value
    raise TypeError(f"cached: cannot store a {type(value).__name__}: results must be tensors, numpy arrays, "
                    "numbers, strings, lists, tuples, dicts or gradreg's dataclasses")


def _decode(value: Any) -> Any:
    """The inverse of :func:`_encode` (only classes of gradreg's own modules are rebuilt)."""
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__ndarray__" in value:
        return value["__ndarray__"].numpy()
    if "__dataclass__" in value:
        module, _, name = value["__dataclass__"].partition(":")
        if not module.startswith("gradreg."):
            raise ValueError(f"not a gradreg class: {value['__dataclass__']}")
        import importlib

        cls = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
        fields = {k: _decode(v) for k, v in value["fields"].items()}
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        made = cls(**{k: v for k, v in fields.items() if k in init})
        for k, v in fields.items():
            if k not in init:
                object.__setattr__(made, k, v)
        return made
    return {k: _decode(v) for k, v in value.items()}


def _read_cache(path: Path, key: str) -> tuple[bool, Any]:
    """(True, result) for a whole cache file of ``key``; (False, None), with a warning naming the file, otherwise."""
    try:
        stored = torch.load(path, weights_only=True)
        if not isinstance(stored, dict) or stored.get("schema") != CACHE_SCHEMA or stored.get("key") != key:
            raise ValueError("not a cache file of this result (an older format, or renamed)")
        return True, _decode(stored["result"])
    except Exception as exc:  # unreadable, truncated, old pickles (weights_only refuses them): recompute
        warnings.warn(f"gradreg.runtime.cached: {path} cannot be used ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); recomputing and "
                      "overwriting it", stacklevel=3)
        return False, None


def cached(name: str, config: dict[str, Any], compute: Callable[[], T], *, enabled: bool | None = None) -> T:
    """Return ``compute()``, stored on disk under a key made of ``name``, ``config`` and the package's code.

    Caching is on in full-size mode only (``enabled=None``): fast runs take seconds, and recomputing them keeps
    CI honest.
    ``config`` must be JSON-serialisable and hold everything the result depends on besides gradreg's own code
    (which :func:`package_fingerprint` covers); the result is saved with ``torch.save`` (tensors, numpy arrays,
    numbers, strings, lists, tuples, dicts, gradreg's dataclasses) and read back with ``weights_only=True``, so
    loading a cache file runs no code from it; a file that cannot be read (or is not this result's) is recomputed,
    with a warning naming it. Delete the cache directory (:func:`cache_dir`) to recompute.
    """
    if not (full_size() if enabled is None else enabled):
        return compute()
    key = json.dumps({"name": name, "config": config, "code": package_fingerprint()}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{digest}.pt"
    if path.exists():
        found, result = _read_cache(path, key)
        if found:
            return result
    result = compute()
    encoded = {"schema": CACHE_SCHEMA, "key": key, "result": _encode(result)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: torch.save(encoded, file))
    return result
