"""Where a step's time goes: one step under ``torch.profiler``, split by the ranges that mark its phases.

The engine marks its phases with ``torch.profiler.record_function`` ranges: ``gradreg:pass1`` (the gradient at
θ), ``gradreg:perturb`` (θ + s δ swapped in), ``gradreg:pass2`` (the gradient there), ``gradreg:pass3`` (central
only), ``gradreg:combine`` (the stencil's sum into ``.grad``), ``gradreg:check`` (finiteness) and
``gradreg:restore`` (θ back). The plain rows of the benchmark mark their passes with the same names
(``gradreg.bench.steppers``), and ``torch.optim`` marks every optimizer's ``step`` and ``zero_grad``
(``Optimizer.step#SGD.step``). :func:`profiled_step` takes one step inside a range of its own and splits that
range's time into:

* each ``gradreg:*`` range (reported without the prefix) and the base optimizer's ``zero_grad`` and ``step``:
  its *exclusive* time, i.e. without the time of such ranges nested inside it, so that nothing counts twice;
* ``rest``: the step minus all of these — Python between the ranges, and all of a step that marks no ranges.

What the profiler can and cannot attribute:

* It measures wall-clock time on the host thread that enters a range, with the work of torch's intra-op threads
  inside it. On a GPU, kernels run asynchronously: a range's time is the host's (mostly launching), not the
  kernels'; only the step's total is synchronised.
* It adds a cost to every operation it records (microseconds each), so a phase made of many small operations
  (per-parameter loops, finiteness checks) looks dearer under the profiler than without it. That is why the
  breakdown reports the profiled total next to the unprofiled step time of the same rounds.
* Inside a range it does not separate arithmetic from memory traffic, page faults of a fresh buffer, or waiting
  for threads: a phase's time includes all of them.
* A step that marks no ranges (an engine that predates them, ``func-db``) is all ``rest``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradreg.bench._profiler import gc_paused, sync, without_profiler_chatter
from gradreg.bench.steppers import Stepper

#: The engine's phases, in the order of a step (``gradreg:`` + name).
PHASES = ("pass1", "perturb", "pass2", "pass3", "combine", "check", "restore")
RANGE_PREFIX = "gradreg:"
STEP_RANGE = "gradreg.bench:step"
#: Labels of the base optimizer's own ranges, after the engine's phases.
OPTIMIZER_LABELS = ("zero_grad", "base step")


def exclusive_times(intervals: Sequence[tuple[int, int, str]]) -> dict[str, int]:
    """Exclusive time per label of properly nested intervals (start, end, label): each interval's length
    minus the lengths of the intervals directly inside it. The values add up to the union of the top-level ones."""
    out: dict[str, int] = {}
    open_ranges: list[tuple[int, str]] = []  # (end, label) of the enclosing intervals, innermost last
    for start, end, label in sorted(intervals, key=lambda i: (i[0], -i[1])):
        while open_ranges and open_ranges[-1][0] <= start:
            open_ranges.pop()
        if open_ranges:
            parent = open_ranges[-1][1]
            out[parent] = out.get(parent, 0) - (end - start)
        out[label] = out.get(label, 0) + (end - start)
        open_ranges.append((end, label))
    return out


def split_step(events: Sequence[Any], optimizer: str) -> dict[str, float]:
    """Seconds per phase of the one :data:`STEP_RANGE` among profiler ``events`` (kineto events), with
    ``"rest"`` and ``"total"``; ``optimizer`` is the base optimizer's class name (``"SGD"``)."""
    steps = [e for e in events if e.name() == STEP_RANGE]
    if len(steps) != 1:
        raise RuntimeError(f"expected one profiler range {STEP_RANGE!r}, found {len(steps)}")
    t0, t1, thread = steps[0].start_ns(), steps[0].end_ns(), steps[0].start_thread_id()
    optimizer_ranges = {f"Optimizer.zero_grad#{optimizer}.zero_grad": "zero_grad",
                        f"Optimizer.step#{optimizer}.step": "base step"}
    intervals = []
    for e in events:
        name = e.name()
        label = name.removeprefix(RANGE_PREFIX) if name.startswith(RANGE_PREFIX) else optimizer_ranges.get(name)
        if label is not None and e.start_thread_id() == thread and t0 <= e.start_ns() <= t1:
            intervals.append((e.start_ns(), e.end_ns(), label))
    split = {label: ns / 1e9 for label, ns in exclusive_times(intervals).items()}
    split["rest"] = (t1 - t0) / 1e9 - sum(split.values())
    split["total"] = (t1 - t0) / 1e9
    return split


def profiled_step(stepper: Stepper, device: torch.device) -> dict[str, float]:
    """Take one ``stepper.step()`` under ``torch.profiler`` (CPU activity, garbage collector paused) and split
    its time (``split_step``)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with gc_paused(), without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(STEP_RANGE):
            stepper.step()
            sync(device)
    return split_step(prof.profiler.kineto_results.events(), type(stepper.base).__name__)


def ordered_labels(labels: set[str]) -> list[str]:
    """The engine's phases in step order, other ``gradreg:*`` names, the optimizer's ranges, then ``rest``."""
    known = [p for p in PHASES if p in labels]
    others = sorted(labels - set(PHASES) - set(OPTIMIZER_LABELS) - {"rest", "total"})
    return known + others + [o for o in OPTIMIZER_LABELS if o in labels] + ["rest"]
