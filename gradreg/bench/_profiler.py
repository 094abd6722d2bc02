"""Small helpers shared by the measurements: device synchronisation and a quiet ``torch.profiler``."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import tempfile
from collections.abc import Iterator

import torch

_CHATTER = re.compile(
    r"^(USDT|STAGE):\S+ \S+ \d+:\d+ \S+\.cpp:\d+\] "  # profiler start/stop log lines
    r"|^\[W\d+ [\d:.]+ CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated before the profiling"
)  # the second: a free, in ``before()``, of memory allocated before profiling — which is why before() exists


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The garbage collector paused (and switched back on after, if it was on): no collection inside a timed step."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def without_profiler_chatter() -> Iterator[None]:
    """The profiler's C++ backend prints 'USDT:<date> <time> <pid>:<tid> ...cpp:52] profiler_start' lines on file
    descriptor 2 (they would land, with time stamps, in a notebook's output), and PyTorch warns once when memory
    allocated before profiling is freed (what :func:`~gradreg.bench.peak_allocated`'s ``before`` is for).
    Hold fd 2 in a temporary file meanwhile and pass on every line that is not one of these."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable file descriptor 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(True) if not _CHATTER.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
