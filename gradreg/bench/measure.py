"""The measurement: one loop over (phase, row) pairs — warm-up, time, memory, FLOPs — for every row.

* **Time.** Every row has its own copy of the model and optimizer (:class:`~gradreg.bench.Stepper`).
  After ``warmup`` untimed rounds, ``repeats`` rounds run every row once, in an order rotated each round, so that
  slow phases of a shared machine hit all rows alike. Each step is timed with ``time.perf_counter`` (with
  ``torch.cuda.synchronize`` on a GPU); Python's garbage collector is paused while a step is timed. Reported: the
  median and the interquartile range of each row's times, and ratios as the median over rounds of the *paired*
  ratio t_row / t_reference within a round.
* **Peak memory**: one more step per row, measured as ``gradreg.bench.memory`` describes.
* **FLOPs**: one more step per row under ``torch.utils.flop_counter.FlopCounterMode``
  (``gradreg.bench.flops``).

A row that fails (DB through attention kernels without a double backward) is recorded with its error and left
out of every later phase; the other rows go on.

Attention (``model="transformer"``): PyTorch picks a fused ``scaled_dot_product_attention`` kernel when one
applies (on the CPU, a flash-attention kernel; on CUDA, flash or memory-efficient attention). These kernels have
no double backward, so ``double`` and ``func-db`` fail with the default kernels. ``attention="math"`` runs every
row with the unfused math kernel, where DB works.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradreg.bench._profiler import gc_paused, sync
from gradreg.bench.flops import count_flops
from gradreg.bench.memory import step_peak
from gradreg.bench.phases import profiled_step
from gradreg.bench.report import BenchResult, Breakdown, MethodResult, new_results
from gradreg.bench.steppers import DEFAULT_STEP, ROWS, StepConfig, Stepper, check_rows
from gradreg.bench.workloads import Workload, make_workload

#: The rows :func:`breakdown` compares by default: F-GR against its two plain passes.
BREAKDOWN_ROWS = ("two-passes", "forward")


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. ``"1.31/1.81/1.84"`` (``"n/a"`` where the OS has none)."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(device: torch.device) -> dict[str, Any]:
    """The device, torch's thread count, versions and the load average before the run."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu ({platform.processor() or platform.machine()})")
    return {"device": name, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "load_before": load_average()}


def schedule(
    methods: Sequence[str], *, warmup: int, repeats: int, memory: bool = False, flops: bool = False,
    rounds: str = "time",
) -> list[tuple[str, str]]:
    """Every (phase, row) step of a run, in order: ``warmup`` rounds, ``repeats`` rounds of phase ``rounds``
    (``"time"``, or ``"profile"`` for the breakdown; the order of the rows rotated by one each round), then one
    memory step and one counted step per row."""
    rows = list(methods)
    plan = [("warm-up", m) for _ in range(warmup) for m in rows]
    for r in range(repeats):
        k = r % len(rows)
        plan += [(rounds, m) for m in rows[k:] + rows[:k]]
    plan += [("memory", m) for m in rows if memory] + [("flops", m) for m in rows if flops]
    return plan


def timed_step(stepper: Stepper, device: torch.device) -> float:
    """Seconds of one step, with the garbage collector paused (and the device synchronised)."""
    with gc_paused():
        sync(device)
        start = time.perf_counter()
        stepper.step()
        sync(device)
        return time.perf_counter() - start


def _warm_up(stepper: Stepper, result: MethodResult, device: torch.device) -> None:
    stepper.step()


def _time(stepper: Stepper, result: MethodResult, device: torch.device) -> None:
    result.times_s.append(timed_step(stepper, device))


def _profile(stepper: Stepper, result: MethodResult, device: torch.device) -> None:
    """One step timed without the profiler and one split into phases under it (``gradreg.bench.phases``), in
    alternating order from round to round, so that neither always follows the other rows' steps."""
    if len(result.times_s) % 2:
        result.splits.append(profiled_step(stepper, device))
        result.times_s.append(timed_step(stepper, device))
    else:
        result.times_s.append(timed_step(stepper, device))
        result.splits.append(profiled_step(stepper, device))


def _memory(stepper: Stepper, result: MethodResult, device: torch.device) -> None:
    gc.collect()
    result.resident_bytes, result.peak_bytes = step_peak(stepper, device)


def _flops(stepper: Stepper, result: MethodResult, device: torch.device) -> None:
    result.flops = count_flops(stepper.step)


#: What each phase does with one row's step.
MEASURE: dict[str, Callable[[Stepper, MethodResult, torch.device], None]] = {
    "warm-up": _warm_up, "time": _time, "profile": _profile, "memory": _memory, "flops": _flops,
}


def run(steppers: dict[str, Stepper], plan: Sequence[tuple[str, str]], device: torch.device, *,
        progress: bool | None = None, desc: str = "bench") -> dict[str, MethodResult]:
    """Take every step of ``plan`` (see :func:`schedule`); a row that raises is recorded and dropped."""
    from gradreg.runtime import progress as progress_bar

    results = new_results(list(steppers))
    active = dict(steppers)
    gc.collect()
    for phase, m in progress_bar(plan, enabled=progress, desc=desc, leave=False):
        if m not in active:
            continue
        try:
            MEASURE[phase](active[m], results[m], device)
        except Exception as exc:  # recorded and reported; the other rows go on
            results[m].fail(exc)
            del active[m]
    return results


def prepare(model: str | Workload, device: str | torch.device | None, **workload_kwargs: Any
            ) -> tuple[Workload, torch.device]:
    """The workload (built by :func:`~gradreg.bench.make_workload` unless given) and its device
    (``None``: CUDA when available)."""
    if isinstance(model, Workload):
        return model, model.inputs.device
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return make_workload(model, device=device, **workload_kwargs), device


def benchmark(
    model: str | Workload = "mlp", *, depth: int = 8, width: int = 512, batch_size: int | None = None,
    seq_len: int = 64, d_model: int = 128, device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32, methods: Sequence[str] = ROWS, repeats: int = 10, warmup: int = 2,
    memory: bool = True, flops: bool = True, attention: str = DEFAULT_STEP.attention,
    gamma: float = DEFAULT_STEP.gamma, eps: float = DEFAULT_STEP.eps, rho: float = DEFAULT_STEP.rho,
    lr: float = DEFAULT_STEP.lr,
    momentum: float = DEFAULT_STEP.momentum, seed: int = 0, input_shape: Sequence[int] | None = None,
    num_classes: int = 10, progress: bool | None = None,
) -> BenchResult:
    """Measure time, peak memory and FLOPs of one training step of each row (see the module docstring).

    ``model`` is a name for :func:`~gradreg.bench.make_workload` (with the keyword arguments it takes)
    or a :class:`~gradreg.bench.Workload` of your own. ``device=None`` picks CUDA when available. A row
    that fails is recorded with its error. ``progress`` shows a tqdm bar (``None``: only in full-size mode, see
    :func:`gradreg.runtime.progress`).
    """
    config = StepConfig(gamma=gamma, eps=eps, rho=rho, lr=lr, momentum=momentum, attention=attention)
    methods = check_rows(methods)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    workload, device = prepare(model, device, depth=depth, width=width, batch_size=batch_size, seq_len=seq_len,
                               d_model=d_model, dtype=dtype, seed=seed, input_shape=input_shape,
                               num_classes=num_classes)
    machine = machine_info(device)
    steppers = {m: Stepper(m, workload, config) for m in methods}
    plan = schedule(methods, warmup=warmup, repeats=repeats, memory=memory, flops=flops)
    results = run(steppers, plan, device, progress=progress, desc=f"bench {workload.name}")
    machine["load_after"] = load_average()
    return BenchResult(workload.name, _run_config(workload, device, methods, repeats, warmup, config, seed),
                       machine, results)


def _run_config(workload: Workload, device: torch.device, methods: list[str], repeats: int, warmup: int,
                config: StepConfig, seed: int) -> dict[str, Any]:
    return {
        "model": workload.name, "batch_size": len(workload.inputs),
        "dtype": str(workload.inputs.dtype).removeprefix("torch."), **workload.config,
        "parameters": workload.parameter_count, "methods": methods, "repeats": repeats, "warmup": warmup,
        "attention": config.attention, "gamma": config.gamma, "eps": config.eps, "rho": config.rho,
        "lr": config.lr,
        "momentum": config.momentum, "seed": seed, "device": str(device),
    }


def breakdown(
    model: str | Workload = "mlp", *, methods: Sequence[str] = BREAKDOWN_ROWS, rounds: int = 10,
    warmup: int = 2, device: str | torch.device | None = None, config: StepConfig = DEFAULT_STEP, seed: int = 0,
    progress: bool | None = None, **workload_kwargs: Any,
) -> Breakdown:
    """Where each row's step time goes: ``rounds`` interleaved rounds (after ``warmup``), each taking, per row,
    one step without the profiler and one under it, split into the phases the engine marks
    (``gradreg.bench.phases``). ``model`` and ``workload_kwargs`` as for :func:`benchmark`; ``config`` holds
    γ, ε, the learning rate, the momentum and the attention kernel."""
    methods = check_rows(methods)
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    workload, device = prepare(model, device, seed=seed, **workload_kwargs)
    machine = machine_info(device)
    steppers = {m: Stepper(m, workload, config) for m in methods}
    plan = schedule(methods, warmup=warmup, repeats=rounds, rounds="profile")
    results = run(steppers, plan, device, progress=progress, desc=f"breakdown {workload.name}")
    machine["load_after"] = load_average()
    return Breakdown(workload.name, _run_config(workload, device, methods, rounds, warmup, config, seed),
                     machine, results)
