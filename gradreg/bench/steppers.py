"""One training step per row of the benchmark, each on its own copy of the model and the base optimizer.

Every row uses the same base optimizer (SGD, momentum 0.9, no weight decay) on the same fixed batch:

* ``sgd``: one plain forward–backward pass and the optimizer step;
* ``two-passes``: two plain forward–backward passes (gradients summed) and the step — the physical limit of a
  finite-difference GR step, which needs two gradients and nothing else;
* ``forward`` (F-GR), ``backward`` (B-GR), ``central`` (three passes) and ``double`` (double backpropagation,
  reverse-over-reverse): :class:`gradreg.GR` with that ``method``;
* ``usam`` (F-GR at γ = ε, the configured ε: unnormalized SAM) and ``sam`` (SAM: normalized, γ = ε = ρ):
  :class:`gradreg.GR`'s presets, the configurations most users run;
* ``plain-sam``: the textbook SAM step, written here as a reference for gradreg's: one pass for g, the ascent
  θ + ρ g/‖g‖ written into the parameters, a second pass there, the descent back to θ, the step (no dropout
  replay, no running-statistics guard, no rollback: what gradreg's ``sam`` row adds to it);
* ``func-db``: double backpropagation written with ``torch.func``: g = grad(L), then the Hessian-vector product
  H g by forward-over-reverse, ``jvp(grad(L), (θ,), (g,))`` — the form torch.func recommends for HVPs.
  BatchNorm inside torch.func transforms cannot update running statistics (an in-place update of a captured
  buffer), so this row runs on a copy of the model prepared with
  ``torch.func.replace_all_batch_norm_modules_``: batch statistics, as in training, and no running-statistics
  update (a negligible saving for this row).

The plain rows mark their passes with the profiler ranges the engine uses (``gradreg:pass1``, ``gradreg:pass2``),
so that :func:`gradreg.bench.breakdown` compares like with like; a range costs microseconds when no profiler runs.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.profiler import record_function

from gradreg.bench.workloads import Workload
from gradreg.methods import METHODS
from gradreg.optim import GR

#: Every row the benchmark knows — the two references, the four GR methods, the SAM family with its textbook
#: reference, and DB through torch.func.
ROWS: tuple[str, ...] = ("sgd", "two-passes", *METHODS, "usam", "sam", "plain-sam", "func-db")
ATTENTION = ("default", "math")


@dataclass(frozen=True)
class StepConfig:
    """The hyperparameters of every step (the defaults are the benchmark's): GR's γ and ε, the SAM rows' ρ, the base
    SGD's learning rate and momentum, and the attention kernel (``"math"`` forces the unfused one)."""

    gamma: float = 0.005
    eps: float = 0.01
    rho: float = 0.05
    lr: float = 1e-3
    momentum: float = 0.9
    attention: str = "default"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}; got {self.attention!r}")


DEFAULT_STEP = StepConfig()


def check_rows(rows: Sequence[str]) -> list[str]:
    """Raise ``ValueError`` unless ``rows`` is a non-empty list of distinct names from :data:`ROWS`."""
    rows = list(rows)
    for row in rows:
        if row not in ROWS:
            raise ValueError(f"method must be one of {', '.join(map(repr, ROWS))}; got {row!r}")
    if not rows:
        raise ValueError(f"methods is empty: give at least one of {', '.join(ROWS)}")
    if len(set(rows)) != len(rows):
        raise ValueError(f"methods lists a name twice: {rows}")
    return rows


def _attention_context(attention: str) -> contextlib.AbstractContextManager:
    if attention == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class Stepper:
    """One row's own model copy and optimizer; ``step()`` takes one full training step on the fixed batch."""

    def __init__(self, method: str, workload: Workload, config: StepConfig = DEFAULT_STEP):
        check_rows([method])
        self.method, self.workload, self.config = method, workload, config
        self.model = copy.deepcopy(workload.model)
        if method == "func-db":
            torch.func.replace_all_batch_norm_modules_(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.base = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum)
        self.optimizer: torch.optim.Optimizer = self.base
        if method in METHODS:
            eps = None if method == "double" else config.eps
            self.optimizer = GR(self.base, gamma=config.gamma, eps=eps, method=method)
        elif method == "usam":  # F-GR at γ = ε: the configured ε, where the raw step is known to be small enough
            self.optimizer = GR.usam(self.base, rho=config.eps)
        elif method == "sam":
            self.optimizer = GR.sam(self.base, rho=config.rho)
        x, y, loss_fn = workload.inputs, workload.targets, workload.loss_fn
        self.closure = lambda: loss_fn(self.model(x), y)
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]

        def loss_of(params: dict[str, Tensor]) -> Tensor:
            return loss_fn(torch.func.functional_call(self.model, params, (x,)), y)

        self.loss_of = loss_of

    def step(self) -> None:
        with _attention_context(self.config.attention):
            if self.method == "sgd":
                self.base.zero_grad(set_to_none=True)
                with record_function("gradreg:pass1"):
                    self.closure().backward()
                self.base.step()
            elif self.method == "two-passes":
                self.base.zero_grad(set_to_none=True)
                with record_function("gradreg:pass1"):
                    self.closure().backward()
                with record_function("gradreg:pass2"):
                    self.closure().backward()
                self.base.step()
            elif self.method == "plain-sam":
                self._plain_sam()
            elif self.method == "func-db":
                self.base.zero_grad(set_to_none=True)
                params = {n: p.detach() for n, p in zip(self.names, self.params)}
                grad_fn = torch.func.grad(self.loss_of)
                g = grad_fn(params)
                _, hg = torch.func.jvp(grad_fn, (params,), (g,))
                for name, p in zip(self.names, self.params):
                    p.grad = g[name].add_(hg[name], alpha=self.config.gamma)
                self.base.step()
            else:  # GR: zero_grad first, as in a training loop; otherwise the engine keeps the old .grad
                # alive during the step, to put it back if a pass fails (one more parameter-sized buffer)
                self.optimizer.zero_grad(set_to_none=True)
                self.optimizer.step(self.closure)

    def _plain_sam(self) -> None:
        """The textbook SAM step: g, climb to θ + ρ g/‖g‖, the gradient there, back to θ, step."""
        self.base.zero_grad(set_to_none=True)
        with record_function("gradreg:pass1"):
            self.closure().backward()
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            climb = torch._foreach_mul(grads, self.config.rho / (float(norm) + 1e-12))
            torch._foreach_add_(self.params, climb)
        self.base.zero_grad(set_to_none=True)
        with record_function("gradreg:pass2"):
            self.closure().backward()
        with torch.no_grad():
            torch._foreach_sub_(self.params, climb)
        self.base.step()

    def held_tensors(self) -> list[Tensor]:
        """What this row holds between steps: parameters, ``.grad``, buffers, the optimizer's state and GR's kept
        buffer of the perturbed point."""
        tensors: list[Tensor] = []
        for p in self.model.parameters():
            tensors += [p] if p.grad is None else [p, p.grad]
        tensors += list(self.model.buffers())
        for state in self.base.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor)]
        if isinstance(self.optimizer, GR) and self.optimizer.buffer:  # the perturbed point, kept between steps
            tensors += list(self.optimizer.buffer.values())
        return tensors
