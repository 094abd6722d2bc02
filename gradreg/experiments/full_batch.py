"""Full-batch training on a torch optimizer and closures: GD, flooding and GR, with loss, gradient norm and
sharpness recorded along the way (Chapter 4).

Every method takes steps of size η = ``lr`` on the whole training set:

    "gd"        θ ← θ − η ∇L(θ)                                   torch.optim.SGD(lr=η) on L
    "flooding"  θ ← θ − η sign(L(θ) − b) ∇L(θ)                    torch.optim.SGD(lr=η) on |L − b| + b
    "forward"   θ ← θ − η [(1 − γ/ε) ∇L(θ) + (γ/ε) ∇L(θ + ε ∇L(θ))]   gradreg.GR(SGD(lr=η), gamma=γ, eps=ε)

and likewise ``"backward"``, ``"central"`` and ``"double"`` (any name of ``gradreg.methods.METHODS``).
GD and flooding use torch's closure convention (zero the gradients, ``backward()``, return the loss); GR methods
use gradreg's (return the loss, no ``backward()``: the engine differentiates).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradreg._checks import check_int, check_real
from gradreg.data import Dataset
from gradreg.experiments.training import LossFn, evaluate
from gradreg.flooding import Crossing, CrossingRecorder, flat, flooded
from gradreg.hessian import top_eigenvalue
from gradreg.methods import METHODS
from gradreg.optim import GR
from gradreg.runtime import progress

Stepper = Callable[[], tuple[float, float]]

#: What ``full_batch_run(method=...)`` accepts: the two references, then every GR method.
RUN_NAMES: tuple[str, ...] = ("gd", "flooding", *METHODS)


@dataclass
class FullBatchHistory:
    """What :func:`full_batch_run` records.

    Every step t = 0..steps−1 (before step t): ``losses`` L(θ_t) and, for ``"gd"`` and ``"flooding"``,
    ``grad_norms`` ‖∇L(θ_t)‖ (empty for GR methods, whose step does not expose ∇L). Every ``measure_every`` steps
    and at the end: ``step``, the training loss ``loss``, the gradient norm ``grad_norm`` = ‖∇L‖ (of the plain
    loss, also for flooding), ``sharpness`` (the top Hessian eigenvalue of L) and ``test_accuracy``.
    ``crossings``: the crossings kept by a flooding run (see :class:`gradreg.flooding.CrossingRecorder`).
    """

    method: str
    lr: float
    b: float | None = None
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    sharpness: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    crossings: list[Crossing] = field(default_factory=list)


def _grad_norm(params: list[Tensor]) -> float:
    """‖(p.grad for p in params)‖, the norm of the whole gradient vector (a parameter without .grad adds 0)."""
    return float(torch.linalg.vector_norm(flat([p.grad for p in params if p.grad is not None])))


def _stepper(
    model: nn.Module, data: Dataset, *, method: str, lr: float, b: float | None = None,
    gamma: float | None = None, eps: float | None = None, loss_fn: LossFn = nn.functional.cross_entropy,
) -> Stepper:
    """One full-batch step of ``method`` per call, on a torch optimizer; returns (L(θ_t), ‖∇L(θ_t)‖).

    The gradient norm is read from ``.grad`` after the step (the flooded gradient ±∇L has the norm of ∇L); it is
    ``nan`` for GR methods, whose ``.grad`` holds the GR direction, not ∇L. Arguments as in :func:`full_batch_run`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=lr)

    def loss() -> Tensor:
        return loss_fn(model(data.x), data.y)

    if method in METHODS:
        optimizer = GR(sgd, gamma=gamma, eps=eps, method=method)
        return lambda: (float(optimizer.step(loss)), math.nan)

    def closure() -> Tensor:  # torch's convention: fresh gradients of the objective, return the plain loss
        sgd.zero_grad()
        value = loss()
        (flooded(value, b) if method == "flooding" else value).backward()
        return value

    def step() -> tuple[float, float]:
        value = sgd.step(closure)
        return float(value.detach()), _grad_norm(params)

    return step


class Measurer:
    """Measures a model during a run: ``loss``, ``grad_norm`` ‖∇L‖, ``sharpness`` and ``test_accuracy``.

    The sharpness is a power iteration (:func:`gradreg.hessian.top_eigenvalue`) with at most ``iters``
    Hessian–vector products and relative tolerance ``tol``, warm-started from the previous measurement's
    eigenvector (seeded with the step number the first time).
    """

    def __init__(self, model: torch.nn.Module, data: Dataset, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 *, iters: int = 20, tol: float = 1e-3):
        self.model, self.data, self.loss_fn = model, data, loss_fn
        self.iters = check_int("sharpness_iters", iters, minimum=1)
        self.tol = check_real("sharpness_tol", tol, positive=True)
        self.vector: list[Tensor] | None = None

    def __call__(self, step: int) -> dict[str, float]:
        params = [p for p in self.model.parameters() if p.requires_grad]

        def closure() -> Tensor:
            return self.loss_fn(self.model(self.data.x), self.data.y)

        with torch.enable_grad():
            loss = closure()
            grads = [g for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None]
        top = top_eigenvalue(closure, params, iters=self.iters, tol=self.tol, seed=step, v0=self.vector)
        self.vector = top.vector
        accuracy = evaluate(self.model, self.data.x_test, self.data.y_test, self.loss_fn)[1]
        return dict(loss=float(loss.detach()), grad_norm=float(torch.linalg.vector_norm(flat(grads))),
                    sharpness=top.value, test_accuracy=accuracy)


def _check_run(method: str, lr: float, steps: int, b: float | None, gamma: float | None, eps: float | None,
               measure_every: int | None, keep_crossings: int, crossing_stride: int) -> None:
    """Every argument of :func:`full_batch_run` checked, with the allowed values in the message."""
    if method not in RUN_NAMES:
        raise ValueError(f"method must be one of {', '.join(map(repr, RUN_NAMES))}; got {method!r}")
    check_real("lr", lr, positive=True)
    check_int("steps", steps, minimum=0)
    if method == "flooding":
        if b is None:
            raise ValueError("method='flooding' needs the flood level b (a finite number >= 0)")
        check_real("b (the flood level)", b)
    elif b is not None:
        raise ValueError(f"b (the flood level) applies to method='flooding' only, not {method!r}: drop it")
    if method not in METHODS and (gamma is not None or eps is not None):
        raise ValueError(f"gamma and eps apply to the GR methods {METHODS} only, not {method!r}: drop them")
    if method in METHODS and gamma is None:
        raise ValueError(f"method={method!r} needs gamma (and eps unless method='double')")
    if measure_every is not None:
        check_int("measure_every", measure_every, minimum=1)
    check_int("keep_crossings", keep_crossings, minimum=0)
    check_int("crossing_stride", crossing_stride, minimum=1)
    if keep_crossings and method != "flooding":
        raise ValueError(f"keep_crossings applies to method='flooding' only, not {method!r}")


def full_batch_run(
    model: nn.Module,
    data: Dataset,
    *,
    method: str,
    lr: float,
    steps: int,
    b: float | None = None,
    gamma: float | None = None,
    eps: float | None = None,
    measure_every: int | None = 50,
    sharpness_iters: int = 20,
    sharpness_tol: float = 1e-3,
    keep_crossings: int = 0,
    crossing_stride: int = 1,
    loss_fn: LossFn = nn.functional.cross_entropy,
    desc: str | None = None,
) -> FullBatchHistory:
    """Train ``model`` in place (training mode) on ``data.x, data.y`` for ``steps`` full-batch steps of ``method``.

    ``method``: ``"gd"``, ``"flooding"`` (needs the flood level ``b``) or a GR method of
    ``gradreg.methods.METHODS`` (needs ``gamma``, and ``eps`` unless ``"double"``); see the module docstring.
    Records the loss (and ‖∇L‖ for GD and flooding) at every step and, every ``measure_every`` steps and at the
    end, what :class:`Measurer` measures (``measure_every=None``: nothing). A flooding run keeps up to
    ``keep_crossings`` crossings of each kind, every ``crossing_stride``-th one, for
    :func:`gradreg.flooding.two_step_identity`.
    """
    _check_run(method, lr, steps, b, gamma, eps, measure_every, keep_crossings, crossing_stride)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    step = _stepper(model, data, method=method, lr=lr, b=b, gamma=gamma, eps=eps, loss_fn=loss_fn)
    measure = None if measure_every is None else Measurer(model, data, loss_fn, iters=sharpness_iters,
                                                          tol=sharpness_tol)
    recorder = CrossingRecorder(b, keep_crossings, crossing_stride) if keep_crossings else None
    history = FullBatchHistory(method=method, lr=lr, b=b)

    def record(t: int) -> None:
        history.step.append(t)
        for key, value in measure(t).items():
            getattr(history, key).append(value)

    for t in progress(range(steps), desc=desc, leave=False):
        if measure is not None and t % measure_every == 0:
            record(t)
        theta = flat(params) if recorder is not None else None
        loss, grad_norm = step()
        history.losses.append(loss)
        if method not in METHODS:
            history.grad_norms.append(grad_norm)
        if recorder is not None:
            recorder.observe(t, loss, theta)
    if measure is not None:
        record(steps)
    if recorder is not None:
        recorder.observe(steps, math.nan, flat(params))  # θ_steps closes a crossing at steps − 2
        history.crossings = recorder.crossings
    return history


#: The series :func:`at_loss` reads: each quantity and the loss it is recorded against.
AT_LOSS_KEYS: dict[str, str] = {"grad_norm": "loss", "sharpness": "loss", "grad_norms": "losses"}


def at_loss(history: FullBatchHistory, level: float, key: str) -> float:
    """A quantity of a run at the training loss ``level``: a measured ``"grad_norm"`` or ``"sharpness"`` (against
    the measured ``loss``), or the per-step gradient norm ``"grad_norms"`` (against the per-step ``losses``; GD
    and flooding only).

    Interpolates log-log between the two records around the *last* time the loss fell through ``level``
    (L_i > level ≥ L_{i+1}): v = exp((1 − w) log v_i + w log v_{i+1}), w = log(L_i/level)/log(L_i/L_{i+1}).
    Compares runs at equal loss, e.g. flooding at b with GD passing b.
    """
    if key not in AT_LOSS_KEYS:
        raise ValueError(f"key must be one of {', '.join(map(repr, AT_LOSS_KEYS))}, got {key!r}")
    level = check_real("level", level, positive=True)
    losses, values = getattr(history, AT_LOSS_KEYS[key]), getattr(history, key)
    falls = [i for i in range(min(len(losses), len(values)) - 1) if losses[i] > level >= losses[i + 1]]
    if not falls:
        raise ValueError(f"the loss of this {history.method!r} run never falls through {level} (in the records "
                         f"of {key!r})")
    i = falls[-1]
    if min(values[i], values[i + 1], losses[i + 1]) <= 0:
        raise ValueError("log-log interpolation needs positive losses and values")
    w = math.log(losses[i] / level) / math.log(losses[i] / losses[i + 1])
    return math.exp((1 - w) * math.log(values[i]) + w * math.log(values[i + 1]))
