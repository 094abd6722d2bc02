"""What one GR training step costs: time, peak memory and FLOPs of every method, measured side by side.

    python -m gradreg.bench --model mlp --depth 8          # bias-free ReLU MLP, width 512, batch 128
    python -m gradreg.bench --model resnet18 --json r.json # CIFAR-style ResNet-18 with BatchNorm
    python -m gradreg.bench --model transformer            # small encoder; add --attention math for DB
    python -m gradreg.bench --breakdown                    # where F-GR's time goes, against two plain passes

or, from Python, :func:`benchmark` and :func:`breakdown` (what Chapter 2 calls). One *step* of every row is one
full training step with the same base optimizer (SGD, momentum 0.9) on one fixed batch. The package, one module
per part:

* ``gradreg.bench.workloads``: the models and their fixed batches (:func:`make_workload`);
* ``gradreg.bench.steppers``: one training step per row (:data:`~gradreg.bench.steppers.ROWS`: ``sgd``,
  ``two-passes``, the four GR methods, ``func-db``);
* ``gradreg.bench.measure``: the measurement loop — warm-up, interleaved timed rounds, memory, FLOPs
  (:func:`benchmark`) and the profiled rounds of :func:`breakdown`;
* ``gradreg.bench.memory``: peak memory (:func:`peak_allocated`) and its dependence on the batch size;
* ``gradreg.bench.flops``: the FLOP model (SGD 3L − 1, F-GR 6L − 2, DB 9L − 5, ...) with its derivation;
* ``gradreg.bench.phases``: one step under ``torch.profiler``, split by the engine's phase ranges;
* ``gradreg.bench.report``: the results, as a table and as JSON;
* ``gradreg/bench/__main__.py``: the command line.
"""

from __future__ import annotations

from gradreg.bench.flops import FLOP_FORMULAS, FLOP_UNITS, count_flops, mlp_flop_units, mlp_phase_units
from gradreg.bench.measure import benchmark, breakdown, load_average
from gradreg.bench.memory import (
    activation_bytes,
    allocation_levels,
    memory_by_batch,
    memory_model,
    peak_allocated,
    resident_bytes,
    storage_bytes,
)
from gradreg.bench.phases import PHASES, profiled_step
from gradreg.bench.report import BenchResult, Breakdown, MethodResult
from gradreg.bench.steppers import ATTENTION, DEFAULT_STEP, ROWS, StepConfig, Stepper
from gradreg.bench.workloads import DEFAULT_BATCH_SIZE, MODELS, Workload, make_workload

__all__ = [
    "ATTENTION", "DEFAULT_BATCH_SIZE", "DEFAULT_STEP", "FLOP_FORMULAS", "FLOP_UNITS", "MODELS", "PHASES", "ROWS",
    "BenchResult", "Breakdown", "MethodResult", "StepConfig", "Stepper", "Workload", "activation_bytes",
    "allocation_levels",
    "benchmark", "breakdown", "count_flops", "load_average", "make_workload", "memory_by_batch", "memory_model",
    "mlp_flop_units", "mlp_phase_units", "peak_allocated", "profiled_step", "resident_bytes", "storage_bytes",
]
