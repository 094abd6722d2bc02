"""What one GR training step costs: time, peak memory and FLOPs of every method, measured side by side.

    python -m gradreg.bench --model mlp --depth 8          # bias-free ReLU MLP, width 512, batch 128
    python -m gradreg.bench --model resnet18 --json r.json # CIFAR-style ResNet-18 with BatchNorm
    python -m gradreg.bench --model transformer            # small encoder; add --attention math, see below

or, from Python, :func:`benchmark` (what Chapter 2 calls). One *step* of every method is one full training step
with the same base optimizer (SGD, momentum 0.9, no weight decay), on one fixed batch:

* ``sgd``: one plain forward–backward pass and the optimizer step;
* ``two-passes``: two plain forward–backward passes (gradients summed) and the step — the physical limit of a
  finite-difference GR step, which needs two gradients and nothing else;
* ``forward`` (F-GR), ``backward`` (B-GR), ``central`` (three passes) and ``double`` (double backpropagation,
  reverse-over-reverse): :class:`gradreg.GR` with that ``method``;
* ``func-db``: double backpropagation written with ``torch.func``: g = grad(L), then the Hessian-vector product
  H g by forward-over-reverse, ``jvp(grad(L), (θ,), (g,))`` — the form torch.func recommends for HVPs.
  BatchNorm inside torch.func transforms cannot update running statistics (an in-place update of a captured
  buffer), so this method runs on a copy of the model prepared with
  ``torch.func.replace_all_batch_norm_modules_``: batch statistics, as in training, and no running-statistics
  update (a negligible saving for this method).

How each quantity is measured:

* **Time.** Every method has its own copy of the model and optimizer. After ``warmup`` untimed steps of each
  method, ``repeats`` rounds run every method once, in an order rotated each round, so that slow phases of a
  shared machine hit all methods alike. Each step is timed with ``time.perf_counter`` (with
  ``torch.cuda.synchronize`` on a GPU); Python's garbage collector is paused while timing. Reported: the median
  and the interquartile range of each method's times, and ratios as the median over rounds of the *paired*
  ratio t_method / t_reference within a round (robust against load that changes between rounds).
* **Peak memory** of a step = the bytes the method holds when the step starts (parameters, ``.grad``,
  optimizer state and buffers of its model: distinct storages, summed) + the highest level that allocations
  minus frees reach during the step, relative to its start. On CUDA the second term is
  ``max_memory_allocated() − memory_allocated()`` after ``reset_peak_memory_stats``. On the CPU it is the
  running sum of the allocation (+) and free (−) events that ``torch.profiler`` records with
  ``profile_memory=True``, in time order (:func:`peak_allocated`). Caveats of the CPU method: it sees the tensor
  storage that goes through PyTorch's CPU allocator (all tensors), in bytes requested — not the process's
  resident set, not allocator rounding or fragmentation, not memory that libraries (oneDNN caches) obtain by
  themselves, and not Python objects. The same method applies to every method, so the ratios compare like with
  like. The test suite checks it on allocations of known size.
* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` around one step (matrix products, convolutions and
  attention; elementwise work is not counted).

Memory and the batch size: F-GR keeps g in ``.grad`` during its second pass, as two plain passes keep their first
gradient, and in addition one parameter-sized buffer, the perturbed parameters θ + εg, which are swapped in
rather than written over θ (so that θ comes back bit for bit). With P bytes of parameters and A bytes of
activations, its peak is about 4P + A (θ, momentum, g, θ + εg, the second pass's activations), while an SGD step
peaks at about 2P + max(A, P), since ``zero_grad`` frees the old gradient before the new one exists. The ratio
is largest when the parameters dominate (a width-512 MLP at batch 128: about 1.45) and tends to 1 when the
activations do (ResNet-18 at batch 128). The default batch size is 128 for the MLP and ResNet-18 — the batch size
of the paper's Wide-ResNet experiments — and 32 sequences of 64 tokens for the transformer; ``--batch-size``
changes it. A training loop that calls ``step`` without ``zero_grad`` first makes every GR step hold the old
``.grad`` too (the engine keeps it to put it back if a pass fails): one more P.

Attention (``--model transformer``): PyTorch picks a fused ``scaled_dot_product_attention`` kernel when one
applies (on the CPU, a flash-attention kernel; on CUDA, flash or memory-efficient attention). These kernels
have no double backward, so ``double`` and ``func-db`` fail with the default kernels — the benchmark records
the error and goes on. ``attention="math"`` runs every method with the unfused math kernel, where DB works.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradreg import models
from gradreg.optim import GR

METHODS = ("sgd", "two-passes", "forward", "backward", "central", "double", "func-db")
LABELS = {
    "sgd": "SGD",
    "two-passes": "two passes",
    "forward": "F-GR",
    "backward": "B-GR",
    "central": "C-GR",
    "double": "DB-GR",
    "func-db": "DB (torch.func)",
}
MODELS = ("mlp", "resnet18", "transformer")
DEFAULT_BATCH_SIZE = {"mlp": 128, "resnet18": 128, "transformer": 32}
ATTENTION = ("default", "math")

#: Matrix products per step of a bias-free ReLU MLP of depth L whose every layer is width × width, in units
#: of one (batch × width) @ (width × width) product (see Chapter 2 for the counting argument).
FLOP_UNITS: dict[str, Callable[[int], int]] = {
    "sgd": lambda depth: 3 * depth - 1,
    "two-passes": lambda depth: 6 * depth - 2,
    "forward": lambda depth: 6 * depth - 2,
    "backward": lambda depth: 6 * depth - 2,
    "central": lambda depth: 9 * depth - 3,
    "double": lambda depth: 9 * depth - 5,
    # g (3L − 1), then jvp(grad) (9L − 3): forward mode gives the input x a zero tangent and multiplies it twice
    "func-db": lambda depth: 12 * depth - 4,
}


# --------------------------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """A model, one fixed batch and its loss: what every method takes one step on."""

    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    config: dict[str, Any] = field(default_factory=dict)
    #: ``loss_fn(model(inputs), targets)`` is the scalar loss (cross-entropy unless you pass another).
    loss_fn: Callable[[Tensor, Tensor], Tensor] = field(default_factory=lambda: nn.functional.cross_entropy)

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def make_workload(
    model: str = "mlp",
    *,
    depth: int = 8,
    width: int = 512,
    batch_size: int | None = None,
    seq_len: int = 64,
    d_model: int = 128,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    num_classes: int = 10,
) -> Workload:
    """Build one of the benchmark's models with a random batch.

    * ``"mlp"``: ``models.mlp(width, width, depth, width, bias=False)``, a bias-free ReLU MLP whose every layer is
      width × width (inputs and 'classes' are ``width`` wide too, so every matrix product of a step has the
      same size), He-initialised so that activations keep their scale at any depth (vanishing activations
      would reach subnormal floats, which slow a CPU down and distort timings); cross-entropy over ``width``
      classes.
    * ``"resnet18"``: :func:`gradreg.models.resnet18_cifar`, 3×32×32 inputs, 10 classes, training mode
      (BatchNorm with batch statistics).
    * ``"transformer"``: :func:`gradreg.models.transformer_encoder` (two encoder layers, ``d_model`` wide,
      4 heads, no dropout) on ``seq_len`` tokens, 10 classes.
    * ``"package.module:function"``: your own model, ``function()`` → ``nn.Module``, on standard-normal inputs
      of shape (batch, ``*input_shape``) and cross-entropy over ``num_classes`` classes (default batch 128).
    """
    custom = ":" in model
    if not custom and model not in MODELS:
        raise ValueError(
            f"model must be one of {', '.join(map(repr, MODELS))} or 'package.module:function'; got {model!r}"
        )
    device = torch.device(device)
    batch = (128 if custom else DEFAULT_BATCH_SIZE[model]) if batch_size is None else int(batch_size)
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config: dict[str, Any] = {"model": model, "batch_size": batch, "dtype": str(dtype).removeprefix("torch.")}
    if custom:
        module_name, _, function = model.partition(":")
        net = getattr(importlib.import_module(module_name), function)()
        if not isinstance(net, nn.Module):
            raise TypeError(f"{model} returned {type(net).__name__}, not a torch.nn.Module")
        if input_shape is None:
            raise ValueError(f"input_shape is required for a model of your own ({model}), e.g. (3, 32, 32)")
        x = torch.randn(batch, *input_shape, generator=generator)
        y = torch.randint(0, num_classes, (batch,), generator=generator)
        config.update(input_shape=list(input_shape), num_classes=num_classes)
        name = model
    elif model == "mlp":
        net = models.mlp(width, width, depth, width, bias=False)
        for layer in net:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
        x = torch.randn(batch, width, generator=generator)
        y = torch.randint(0, width, (batch,), generator=generator)
        config.update(depth=depth, width=width)
        name = f"MLP depth {depth}, width {width}"
    elif model == "resnet18":
        net = models.resnet18_cifar(10)
        x = torch.randn(batch, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        name = "ResNet-18 (CIFAR)"
    else:
        net = models.transformer_encoder(d_model, 4, num_layers=2, dim_feedforward=4 * d_model)
        x = torch.randn(batch, seq_len, d_model, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        config.update(seq_len=seq_len, d_model=d_model)
        name = f"Transformer encoder (2 layers, d={d_model}, {seq_len} tokens)"
    net = net.to(device=device, dtype=dtype).train()
    return Workload(name, net, x.to(device=device, dtype=dtype), y.to(device), config)


# --------------------------------------------------------------------------------------------- one step


def _attention_context(attention: str):
    if attention == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class Stepper:
    """One method's own model copy and optimizer; ``step()`` takes one full training step on the fixed batch."""

    def __init__(
        self, method: str, workload: Workload, *, gamma: float, eps: float, lr: float, momentum: float,
        attention: str = "default",
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
        self.method = method
        self.workload = workload
        self.attention = attention
        self.model = copy.deepcopy(workload.model)
        if method == "func-db":
            torch.func.replace_all_batch_norm_modules_(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.base = torch.optim.SGD(self.params, lr=lr, momentum=momentum)
        self.gamma = gamma
        self.optimizer: torch.optim.Optimizer = self.base
        if method in ("forward", "backward", "central", "double"):
            self.optimizer = GR(self.base, gamma=gamma, eps=None if method == "double" else eps, method=method)
        self.loss_fn = workload.loss_fn
        x, y = workload.inputs, workload.targets
        self.closure = lambda: self.loss_fn(self.model(x), y)
        if method == "func-db":
            self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]

            def loss_of(params: dict[str, Tensor]) -> Tensor:
                return self.loss_fn(torch.func.functional_call(self.model, params, (x,)), y)

            self.loss_of = loss_of

    def step(self) -> None:
        with _attention_context(self.attention):
            if self.method == "sgd":
                self.base.zero_grad(set_to_none=True)
                self.closure().backward()
                self.base.step()
            elif self.method == "two-passes":
                self.base.zero_grad(set_to_none=True)
                self.closure().backward()
                self.closure().backward()
                self.base.step()
            elif self.method == "func-db":
                self.base.zero_grad(set_to_none=True)
                params = {n: p.detach() for n, p in zip(self.names, self.params)}
                grad_fn = torch.func.grad(self.loss_of)
                g = grad_fn(params)
                _, hg = torch.func.jvp(grad_fn, (params,), (g,))
                for name, p in zip(self.names, self.params):
                    p.grad = g[name].add_(hg[name], alpha=self.gamma)
                self.base.step()
            else:  # GR: zero_grad first, as in a training loop; otherwise the engine keeps the old .grad
                # alive during the step, to put it back if a pass fails (one more parameter-sized buffer)
                self.optimizer.zero_grad(set_to_none=True)
                self.optimizer.step(self.closure)

    def resident_bytes(self) -> int:
        """Bytes this method holds between steps: parameters, ``.grad``, optimizer state, buffers (distinct storages)."""
        tensors: list[Tensor] = []
        for p in self.model.parameters():
            tensors.append(p)
            if p.grad is not None:
                tensors.append(p.grad)
        tensors += list(self.model.buffers())
        for state in self.base.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor)]
        return storage_bytes(tensors)


def storage_bytes(tensors: Sequence[Tensor]) -> int:
    """Total bytes of the distinct storages behind ``tensors``."""
    storages: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


# --------------------------------------------------------------------------------------------- measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CHATTER = re.compile(
    r"^(USDT|STAGE):\S+ \S+ \d+:\d+ \S+\.cpp:\d+\] "  # profiler start/stop log lines
    r"|^\[W\d+ [\d:.]+ CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated before the profiling"
)  # the second: a free, in ``before()``, of memory allocated before profiling — which is why before() exists


@contextlib.contextmanager
def _without_profiler_chatter():
    """The profiler's C++ backend prints 'USDT:<date> <time> <pid>:<tid> ...cpp:52] profiler_start' lines on file
    descriptor 2 (they would land, with time stamps, in a notebook's output), and PyTorch warns once when memory
    allocated before profiling is freed (what :func:`peak_allocated`'s ``before`` is for). Hold fd 2 in a
    temporary file meanwhile and pass on every line that is not one of these."""
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
    device = torch.device(device)
    if device.type == "cuda":
        if before is not None:
            before()
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile, record_function

    marker = "gradreg.bench.peak_allocated"
    with _without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if before is not None:
            before()
        with record_function(marker):
            fn()
    events = prof.profiler.kineto_results.events()
    window = [e for e in events if e.name() == marker]
    if len(window) != 1:
        raise RuntimeError(f"peak_allocated: expected one profiler event {marker!r}, found {len(window)}")
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
    return peak


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts while ``fn()`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def mlp_flop_units(method: str, *, depth: int, width: int = 512, batch_size: int = 32, **kwargs: Any) -> float:
    """FLOPs of one step of ``method`` on the bias-free ``depth``-layer MLP, in units of one
    (batch × width) @ (width × width) matrix product (2·batch·width² FLOPs)."""
    workload = make_workload("mlp", depth=depth, width=width, batch_size=batch_size)
    stepper = Stepper(method, workload, **{**_STEP_DEFAULTS, **kwargs})
    stepper.step()  # the first step allocates the momentum buffers; count a later one
    return count_flops(stepper.step) / (2 * batch_size * width * width)


def mlp_phase_units(*, depth: int, width: int = 512, batch_size: int = 32) -> dict[str, float]:
    """Products in each phase of double backprop on the bias-free MLP, counted by ``FlopCounterMode`` and
    expressed in units of one (batch × width) @ (width × width) product: ``forward`` (L), ``backward`` — the
    gradient, built as a graph with ``create_graph=True`` (2L − 1) — and ``double backward``, the
    Hessian-vector product H·g back through that graph (6L − 4). Their sum is DB's 9L − 5."""
    workload = make_workload("mlp", depth=depth, width=width, batch_size=batch_size)
    params = list(workload.model.parameters())
    unit = 2 * batch_size * width * width
    phases: dict[str, float] = {}
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss = workload.loss_fn(workload.model(workload.inputs), workload.targets)
    phases["forward"] = counter.get_total_flops() / unit
    with FlopCounterMode(display=False) as counter:
        grads = torch.autograd.grad(loss, params, create_graph=True)
    phases["backward"] = counter.get_total_flops() / unit
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(grads, params, grad_outputs=[g.detach() for g in grads])
    phases["double backward"] = counter.get_total_flops() / unit
    return phases


def memory_by_batch(
    batch_sizes: Sequence[int], *, model: str = "mlp", methods: Sequence[str] = ("sgd", "two-passes", "forward", "double"),
    device: str | torch.device = "cpu", **workload_kwargs: Any,
) -> dict[str, Any]:
    """Peak memory of one step of each method (as :func:`benchmark` measures it, no timing) for several batch
    sizes. Returns ``{"batch_size": [...], "parameter_bytes": P, "peak_bytes": {method: [...]}}``."""
    out: dict[str, Any] = {"batch_size": list(batch_sizes), "peak_bytes": {m: [] for m in methods}}
    for batch in batch_sizes:
        workload = make_workload(model, batch_size=batch, device=device, **workload_kwargs)
        out["parameter_bytes"] = storage_bytes(list(workload.model.parameters()))
        for method in methods:
            stepper = Stepper(method, workload, **_STEP_DEFAULTS)
            stepper.step()
            held = stepper.resident_bytes()
            out["peak_bytes"][method].append(held + peak_allocated(stepper.step, device, before=stepper.step))
            del stepper
    return out


_STEP_DEFAULTS = {"gamma": 0.005, "eps": 0.01, "lr": 1e-3, "momentum": 0.9}


# --------------------------------------------------------------------------------------------- results


@dataclass
class MethodResult:
    method: str
    label: str
    times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    resident_bytes: int | None = None
    flops: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # what gradreg added to the error (e.g. a hint)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s) if self.times_s else math.nan

    @property
    def iqr_s(self) -> tuple[float, float]:
        if len(self.times_s) < 2:
            return (self.median_s, self.median_s)
        q = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return (q[0], q[2])


@dataclass
class BenchResult:
    """Everything one :func:`benchmark` run measured; ``table()`` prints it, ``to_dict()`` is what the JSON holds."""

    workload: str
    config: dict[str, Any]
    machine: dict[str, Any]
    results: dict[str, MethodResult]

    def __getitem__(self, method: str) -> MethodResult:
        return self.results[method]

    def time_ratio(self, method: str, reference: str = "sgd") -> float:
        """Median over rounds of t_method / t_reference, both timed in the same round."""
        a, b = self.results.get(method), self.results.get(reference)
        if a is None or b is None or not (a.ok and b.ok and a.times_s and b.times_s):
            return math.nan
        return statistics.median(x / y for x, y in zip(a.times_s, b.times_s))

    def memory_ratio(self, method: str, reference: str = "sgd") -> float:
        a, b = self.results.get(method), self.results.get(reference)
        if a is None or b is None or a.peak_bytes is None or b.peak_bytes is None:
            return math.nan
        return a.peak_bytes / b.peak_bytes

    def flop_ratio(self, method: str, reference: str = "sgd") -> float:
        a, b = self.results.get(method), self.results.get(reference)
        if a is None or b is None or not a.flops or not b.flops:
            return math.nan
        return a.flops / b.flops

    def flop_units(self, method: str) -> float:
        """MLP only: FLOPs in units of one (batch × width) @ (width × width) product."""
        r = self.results.get(method)
        if self.config.get("model") != "mlp" or r is None or r.flops is None:
            return math.nan
        return r.flops / (2 * self.config["batch_size"] * self.config["width"] ** 2)

    def headline(self) -> dict[str, float]:
        """The ratios the issue's performance floors are stated in."""
        return {
            "forward/two-passes time": self.time_ratio("forward", "two-passes"),
            "forward/double time": self.time_ratio("forward", "double"),
            "forward/func-db time": self.time_ratio("forward", "func-db"),
            "forward/sgd memory": self.memory_ratio("forward"),
            "double/sgd memory": self.memory_ratio("double"),
        }

    def table(self) -> str:
        c, m = self.config, self.machine
        lines = [
            f"gradreg.bench: {self.workload}, batch {c['batch_size']}, {c['parameters'] / 1e6:.2f} M parameters, "
            f"{c.get('dtype', '')}, attention={c['attention']}",
            f"device {m['device']} ({m['threads']} threads), torch {m['torch']}, {c['repeats']} rounds after "
            f"{c['warmup']} warm-up; load average {m['load_before']} before, {m['load_after']} after",
            "",
            f"{'method':<16}{'ms/step':>10}{'IQR':>16}{'×SGD':>7}{'×2-pass':>9}{'peak MiB':>11}{'×SGD':>7}"
            f"{'GFLOP':>9}{'×SGD':>7}",
        ]
        for name, r in self.results.items():
            if not r.ok:
                lines.append(f"{r.label:<16}  failed: {r.error}")
                continue
            lo, hi = r.iqr_s
            mem = "" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:>11.1f}{self.memory_ratio(name):>7.2f}"
            flops = "" if r.flops is None else f"{r.flops / 1e9:>9.2f}{self.flop_ratio(name):>7.2f}"
            lines.append(
                f"{r.label:<16}{1e3 * r.median_s:>10.1f}{f'{1e3 * lo:.1f}–{1e3 * hi:.1f}':>16}"
                f"{self.time_ratio(name):>7.2f}{self.time_ratio(name, 'two-passes'):>9.2f}" + mem + flops
            )
        lines.append("")
        lines.append(
            "ratios: time = median over rounds of paired ratios; memory = peak bytes (held at the step's start + "
            "highest level of allocations during it)"
        )
        lines.append("  ".join(f"{k} {v:.2f}" for k, v in self.headline().items() if not math.isnan(v)))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        methods = {}
        for name, r in self.results.items():
            lo, hi = r.iqr_s
            methods[name] = {
                "label": r.label, "error": r.error, "notes": r.notes, "times_s": r.times_s, "median_s": r.median_s,
                "q25_s": lo, "q75_s": hi,
                "time_ratio_sgd": self.time_ratio(name), "time_ratio_two_passes": self.time_ratio(name, "two-passes"),
                "peak_bytes": r.peak_bytes, "resident_bytes": r.resident_bytes,
                "memory_ratio_sgd": self.memory_ratio(name),
                "flops": r.flops, "flop_ratio_sgd": self.flop_ratio(name), "flop_units": self.flop_units(name),
            }
        data = {"workload": self.workload, "config": self.config, "machine": self.machine, "methods": methods,
                "headline": self.headline()}
        return _json_safe(data)


def _json_safe(value: Any) -> Any:
    """NaN → None (strict JSON), tuples → lists, anything else unknown → its string."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _load() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not available on every platform
        return "n/a"


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return text[:300]


def _notes(exc: BaseException) -> list[str]:
    return [str(n) for n in getattr(exc, "__notes__", [])]


def benchmark(
    model: str | Workload = "mlp",
    *,
    depth: int = 8,
    width: int = 512,
    batch_size: int | None = None,
    seq_len: int = 64,
    d_model: int = 128,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    methods: Sequence[str] = METHODS,
    repeats: int = 10,
    warmup: int = 2,
    memory: bool = True,
    flops: bool = True,
    attention: str = "default",
    gamma: float = 0.005,
    eps: float = 0.01,
    lr: float = 1e-3,
    momentum: float = 0.9,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    num_classes: int = 10,
    progress: bool | None = None,
) -> BenchResult:
    """Measure time, peak memory and FLOPs of one training step of each method (see the module docstring).

    ``model`` is a name for :func:`make_workload` (with the keyword arguments it takes) or a
    :class:`Workload` of your own. ``device=None`` picks CUDA when available. A method that fails (DB through attention kernels without a
    double backward) is recorded with its error and left out of the timing. ``progress`` shows a tqdm bar
    (``None``: only in full-size mode, see :func:`gradreg.runtime.progress`).
    """
    from gradreg.runtime import progress as progress_bar

    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}; got {attention!r}")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if isinstance(model, Workload):
        workload = model
        device = workload.inputs.device
    else:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        workload = make_workload(
            model, depth=depth, width=width, batch_size=batch_size, seq_len=seq_len, d_model=d_model,
            device=device, dtype=dtype, seed=seed, input_shape=input_shape, num_classes=num_classes,
        )
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "load_before": _load(),
    }
    config = {
        "model": workload.name, "batch_size": len(workload.inputs),
        "dtype": str(workload.inputs.dtype).removeprefix("torch."), **workload.config,
        "parameters": workload.parameter_count, "methods": list(methods), "repeats": repeats,
        "warmup": warmup, "attention": attention, "gamma": gamma, "eps": eps, "lr": lr, "momentum": momentum,
        "seed": seed, "device": str(device),
    }
    results = {m: MethodResult(m, LABELS[m]) for m in methods}
    steppers: dict[str, Stepper] = {}
    for m in methods:
        steppers[m] = Stepper(m, workload, gamma=gamma, eps=eps, lr=lr, momentum=momentum, attention=attention)

    def attempt(m: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - recorded and reported, the other methods go on
            results[m].error = _describe(exc)
            results[m].notes = _notes(exc)
            steppers.pop(m, None)
            return None

    total = warmup * len(methods) + repeats * len(methods) + (len(methods) * (memory + flops))
    bar = progress_bar(range(total), enabled=progress, desc=f"bench {workload.name}", leave=False)
    ticks = iter(bar)

    def tick() -> None:
        next(ticks, None)

    gc.collect()
    for _ in range(warmup):
        for m in methods:
            if m in steppers:
                attempt(m, steppers[m].step)
            tick()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(repeats):
            k = round_index % len(methods)
            for m in list(methods[k:]) + list(methods[:k]):
                stepper = steppers.get(m)
                if stepper is not None:
                    _sync(device)
                    start = time.perf_counter()
                    ok = attempt(m, lambda s=stepper: s.step() or True)
                    _sync(device)
                    if ok:
                        results[m].times_s.append(time.perf_counter() - start)
                tick()
    finally:
        if gc_was_enabled:
            gc.enable()
    if memory:
        for m in methods:
            stepper = steppers.get(m)
            if stepper is not None:
                gc.collect()
                held = stepper.resident_bytes()
                transient = attempt(m, lambda s=stepper: peak_allocated(s.step, device, before=s.step))
                if transient is not None:
                    results[m].resident_bytes = held
                    results[m].peak_bytes = held + transient
            tick()
    if flops:
        for m in methods:
            stepper = steppers.get(m)
            if stepper is not None:
                results[m].flops = attempt(m, lambda s=stepper: count_flops(s.step))
            tick()
    for _ in ticks:
        pass
    if hasattr(bar, "close"):
        bar.close()
    for m in methods:  # a method that failed after some timed steps reports the failure, not partial times
        if results[m].error is not None:
            results[m].times_s.clear()
            results[m].peak_bytes = results[m].resident_bytes = results[m].flops = None
    machine["load_after"] = _load()
    return BenchResult(workload.name, config, machine, results)


# --------------------------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(
        prog="python -m gradreg.bench",
        description="Time, peak memory and FLOPs of one training step of SGD, two plain passes, F-GR, B-GR, "
        "C-GR, DB-GR and DB through torch.func, measured side by side.",
    )
    parser.add_argument("--model", default="mlp",
                        help="mlp (default), resnet18, transformer, or your own: package.module:function, a function "
                        "that returns an nn.Module (then also --input-shape, --num-classes)")
    parser.add_argument("--input-shape", default=None, help="your own model's input shape per example, e.g. 3,32,32")
    parser.add_argument("--num-classes", type=int, default=10, help="your own model's number of classes (default 10)")
    parser.add_argument("--depth", type=int, default=8, help="MLP depth L (default 8)")
    parser.add_argument("--width", type=int, default=512, help="MLP width (default 512)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 128 (mlp, resnet18, the paper's CIFAR batch size), 32 (transformer)")
    parser.add_argument("--seq-len", type=int, default=64, help="transformer sequence length (default 64)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--attention", choices=ATTENTION, default="default",
                        help="'math' forces the unfused attention kernel (which has a double backward)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result = benchmark(
        args.model, depth=args.depth, width=args.width, batch_size=args.batch_size, seq_len=args.seq_len,
        device=args.device, methods=methods, repeats=args.repeats, warmup=args.warmup, memory=not args.no_memory,
        flops=not args.no_flops, attention=args.attention, progress=not args.no_progress,
        input_shape=None if args.input_shape is None else [int(n) for n in args.input_shape.split(",")],
        num_classes=args.num_classes,
    )
    print(result.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return result

