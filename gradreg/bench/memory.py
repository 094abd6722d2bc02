"""Peak memory of one step: what a row holds when the step starts, plus the highest level its allocations reach.

Peak memory of a step = the bytes the row holds when the step starts (parameters, ``.grad``, optimizer state and
buffers of its model: distinct storages, summed; :func:`resident_bytes`) + the highest level that allocations
minus frees reach during the step, relative to its start (:func:`peak_allocated`). On CUDA the second term is
``max_memory_allocated() − memory_allocated()`` after ``reset_peak_memory_stats``. On the CPU it is the running
sum of the allocation (+) and free (−) events that ``torch.profiler`` records with ``profile_memory=True``, in
time order. Caveats of the CPU method: it sees the tensor storage that goes through PyTorch's CPU allocator (all
tensors), in bytes requested — not the process's resident set, not allocator rounding or fragmentation, not
memory that libraries (oneDNN caches) obtain by themselves, and not Python objects. The same method applies to
every row, so the ratios compare like with like. The test suite checks it on allocations of known size.

Memory and the batch size: F-GR keeps g in ``.grad`` during its second pass, as two plain passes keep their first
gradient, and in addition one parameter-sized buffer, the perturbed parameters θ + εg, which are swapped in
rather than written over θ (so that θ comes back bit for bit). With P bytes of parameters and A bytes of
activations (what the forward pass keeps for the backward one, :func:`activation_bytes`), its peak is about
4P + A (θ, momentum, g, θ + εg, the second pass's activations), while an SGD step peaks at about 2P + max(A, P),
since ``zero_grad`` frees the old gradient before the new one exists. The ratio (4P + A) / (2P + max(A, P))
grows from 4/3 towards its maximum 5/3 while A < P, where SGD's peak is set by its gradient, and falls towards
1 once A > P, where activations set both peaks (:func:`memory_model`). A training loop that calls ``step``
without ``zero_grad`` first makes every GR step hold the old ``.grad`` too (the engine keeps it to put it back
if a pass fails): one more P.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradreg.bench._profiler import sync, without_profiler_chatter
from gradreg.bench.steppers import DEFAULT_STEP, Stepper
from gradreg.bench.workloads import make_workload

_MARKER = "gradreg.bench.peak_allocated"


def storage_bytes(tensors: Sequence[Tensor]) -> int:
    """Total bytes of the distinct storages behind ``tensors``."""
    storages: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def resident_bytes(stepper: Stepper) -> int:
    """Bytes a row holds between steps: parameters, ``.grad``, optimizer state, buffers (distinct storages)."""
    return storage_bytes(stepper.held_tensors())


def allocation_levels(
    fn: Callable[[], Any], device: str | torch.device = "cpu", *, before: Callable[[], Any] | None = None
) -> tuple[int, int]:
    """(peak, end): the highest level, in bytes, that tensor allocations minus frees reach while ``fn()`` runs,
    and the level when it returns, both relative to the level when it starts (see :func:`peak_allocated`)."""
    device = torch.device(device)
    if device.type == "cuda":
        if before is not None:
            before()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start, torch.cuda.memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile, record_function

    with without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if before is not None:
            before()
        with record_function(_MARKER):
            fn()
    events = prof.profiler.kineto_results.events()
    window = [e for e in events if e.name() == _MARKER]
    if len(window) != 1:
        raise RuntimeError(f"peak_allocated: expected one profiler event {_MARKER!r}, found {len(window)}")
    start, end = window[0].start_ns(), window[0].end_ns()
    memory = [
        (e.start_ns(), e.nbytes()) for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU and start <= e.start_ns() <= end
    ]
    memory.sort(key=lambda item: item[0])  # stable: events with equal time stamps keep their order
    level = peak = 0
    for _, nbytes in memory:
        level += nbytes
        peak = max(peak, level)
    return peak, level


def peak_allocated(
    fn: Callable[[], Any], device: str | torch.device = "cpu", *, before: Callable[[], Any] | None = None
) -> int:
    """The highest level, in bytes, that tensor allocations minus frees reach while ``fn()`` runs, relative to
    the level when it starts (freeing memory that was allocated earlier counts as negative).

    On CUDA: the caching allocator's ``max_memory_allocated`` after ``reset_peak_memory_stats``. On the CPU:
    the running sum, in time order, of the memory events that ``torch.profiler`` records with
    ``profile_memory=True`` (one per allocation, + bytes, and one per free, − bytes) between the start and the
    end of ``fn()``. The profiler records no free event for memory allocated before it started (PyTorch warns
    "Memory block of unknown size was allocated before the profiling started"), so ``before()`` — typically one
    step of the same kind — runs first inside the same profiling session: what ``fn()`` frees of its output is
    then counted.
    """
    return allocation_levels(fn, device, before=before)[0]


def step_peak(stepper: Stepper, device: torch.device) -> tuple[int, int]:
    """(held, peak) of one more step: the bytes the stepper holds at its start (:func:`resident_bytes`), and those
    plus the highest level of allocations during the step (:func:`peak_allocated`)."""
    held = resident_bytes(stepper)
    return held, held + peak_allocated(stepper.step, device, before=stepper.step)


def activation_bytes(stepper: Stepper) -> int:
    """A: the bytes a forward pass of the row's model leaves allocated while its loss (and graph) is alive —
    the activations saved for the backward pass, measured as :func:`allocation_levels`' end level."""
    kept: list[Tensor] = []
    _, level = allocation_levels(lambda: kept.append(stepper.closure()), stepper.workload.inputs.device)
    kept.clear()
    return level


def memory_model(parameter_bytes: float, activation_bytes: float) -> float:
    """The F-GR / SGD peak-memory ratio of the module docstring's accounting: (4P + A) / (2P + max(A, P))."""
    P, A = parameter_bytes, activation_bytes
    return (4 * P + A) / (2 * P + max(A, P))


def memory_by_batch(
    batch_sizes: Sequence[int], *, model: str = "mlp",
    methods: Sequence[str] = ("sgd", "two-passes", "forward", "double"), device: str | torch.device = "cpu",
    **workload_kwargs: Any,
) -> dict[str, Any]:
    """Peak memory of one step of each row (as :func:`~gradreg.bench.benchmark` measures it, no timing)
    for several batch sizes, and the activations A of each batch (:func:`activation_bytes`). Returns
    ``{"batch_size": [...], "parameter_bytes": P, "activation_bytes": [...], "peak_bytes": {row: [...]}}``."""
    out: dict[str, Any] = {"batch_size": list(batch_sizes), "activation_bytes": [],
                           "peak_bytes": {m: [] for m in methods}}
    for batch in batch_sizes:
        workload = make_workload(model, batch_size=batch, device=device, **workload_kwargs)
        out["parameter_bytes"] = storage_bytes(list(workload.model.parameters()))
        for method in methods:
            stepper = Stepper(method, workload, DEFAULT_STEP)
            stepper.step()
            out["peak_bytes"][method].append(step_peak(stepper, device)[1])
            if method == methods[0]:
                out["activation_bytes"].append(activation_bytes(stepper))
            del stepper
    return out
