"""Flooding, and why two flooding steps across the flood level make one finite-difference GR step.

Flooding (Ishida et al. 2020) trains on the flooded loss with flood level b ≥ 0,

    F(θ) = |L(θ) − b| + b,        ∇F(θ) = sign(L(θ) − b) ∇L(θ),

so gradient descent on F descends while L > b and *ascends* while L < b:
θ_{t+1} = θ_t − η sign(L(θ_t) − b) ∇L(θ_t). When the loss crosses b from below (L(θ_t) < b < L(θ_{t+1})),
an ascent step is followed by a descent step, and with g = ∇L(θ_t)

    θ_{t+2} = θ_t + η g − η ∇L(θ_t + η g) = θ_t − η² [∇L(θ_t + η g) − g] / η        (exact)

the plain-loss terms cancel and what is left is η² times the forward finite-difference estimate of H g with
ε = η: one F-GR-type step on ½‖∇L‖² with step size η². Crossing from above (descent, then ascent) gives
θ_{t+2} = θ_t − η² [g − ∇L(θ_t − η g)] / η, the backward (B-GR-type) estimate.

This module has the flooded loss (:func:`flooded`, batch-level or per-example iFlood), a flooding GD step and a
full-batch runner that records the loss at every step and the parameters around a bounded number of crossings
(:func:`flooding_gd`), the crossing finder (:func:`find_crossings`), the identity check
(:func:`two_step_identity`) and the full-batch comparison of GD, flooding and F-GR used by Chapter 4
(:func:`full_batch_run`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from gradreg.data import Dataset
from gradreg.engine import gr_grad
from gradreg.hessian import hvp, top_eigenvalue
from gradreg.optim import GR
from gradreg.runtime import progress

Kind = Literal["up", "down"]
LossFn = Callable[[Tensor, Tensor], Tensor]


def flooded(loss: Tensor, b: float) -> Tensor:
    """The flooded loss with flood level ``b``.

    * a scalar ``loss`` L (batch-level flooding, Ishida et al. 2020): |L − b| + b;
    * a vector of per-example losses ℓ_i (iFlood, Xie et al. 2022): mean_i (|ℓ_i − b| + b).

    Use it in any training loop (``flooded(loss_fn(model(x), y), b).backward()``) or inside the closure of a
    :class:`gradreg.GR` optimizer. For iFlood, compute the losses with ``reduction="none"``.
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
        raise TypeError(f"b must be a finite number, got {b!r}")
    if loss.ndim == 0:
        return (loss - b).abs() + b
    if loss.ndim == 1:
        return ((loss - b).abs() + b).mean()
    raise ValueError(f"loss must be a scalar (flooding) or a vector of per-example losses (iFlood), got shape "
                     f"{tuple(loss.shape)}")


def flooding_step(closure: Callable[[], Tensor], params: Sequence[Tensor], *, lr: float, b: float) -> Tensor:
    """One gradient-descent step on the flooded loss: θ ← θ − η sign(L(θ) − b) ∇L(θ). Returns L(θ) (detached).

    ``closure()`` returns the plain loss L (a scalar); ``params`` are updated in place.
    """
    return _flooding_step(closure, list(params), lr, b)[0]


def _flooding_step(closure: Callable[[], Tensor], params: list[Tensor], lr: float, b: float) -> tuple[Tensor, float]:
    """:func:`flooding_step`, also returning ‖∇L(θ)‖ (the flooded gradient is ±∇L, so it has the same norm)."""
    with torch.enable_grad():
        loss = closure()
        grads = torch.autograd.grad(flooded(loss, b), params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.add_(g, alpha=-lr)
    return loss.detach(), _norm([g for g in grads if g is not None])


def _norm(tensors: Sequence[Tensor]) -> float:
    return float(torch.sqrt(sum((t.detach() ** 2).sum() for t in tensors)))


def _flat(params: Sequence[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _unflatten_into(params: Sequence[Tensor], flat: Tensor) -> None:
    with torch.no_grad():
        start = 0
        for p in params:
            p.copy_(flat[start:start + p.numel()].view_as(p))
            start += p.numel()


@dataclass
class Crossing:
    """A flooding crossing at step t: ``kind="up"`` if L_t < b < L_{t+1} (ascent then descent), ``"down"`` if
    L_t > b > L_{t+1}; with the flattened parameters θ_t and θ_{t+2}."""

    t: int
    kind: Kind
    theta_t: Tensor
    theta_t2: Tensor


@dataclass
class Crossings:
    """Step indices t of the crossings of b in a loss sequence, by direction."""

    up: list[int]
    down: list[int]


def find_crossings(losses: Sequence[float], b: float) -> Crossings:
    """Indices t with L_t < b < L_{t+1} (``up``: crossing from below) and L_t > b > L_{t+1} (``down``).

    Strict inequalities: a loss exactly at b has a zero flooded gradient and crosses nothing.
    """
    up, down = [], []
    for t in range(len(losses) - 1):
        now, after = float(losses[t]), float(losses[t + 1])
        if now < b < after:
            up.append(t)
        elif now > b > after:
            down.append(t)
    return Crossings(up, down)


class CrossingRecorder:
    """Keeps θ_t and θ_{t+2} of up to ``keep`` crossings of each kind while a flooding run goes on.

    Of each kind it keeps crossing number 0, ``stride``, 2·``stride``, … (so a large stride samples the whole
    run). Call ``observe(t, L_t, θ_t)`` at every step t, with θ_t flattened before the step. Memory: three
    parameter copies plus 2·``keep`` saved pairs, however long the run.
    """

    def __init__(self, b: float, keep: int = 4, stride: int = 1):
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.b = b
        self.keep = keep
        self.stride = stride
        self.window: deque[tuple[int, float, Tensor]] = deque(maxlen=3)
        self.crossings: list[Crossing] = []
        self._seen = {"up": 0, "down": 0}
        self._kept = {"up": 0, "down": 0}

    def observe(self, t: int, loss: float, theta: Tensor) -> None:
        """Record step t: its loss L_t and the flattened θ_t (before the step); saves a crossing at t − 2."""
        if self.keep <= 0:
            return
        if self.window and self.window[-1][0] != t - 1:
            raise ValueError("observe() must be called at every step, in order")
        self.window.append((t, float(loss), theta))
        if len(self.window) < 3:
            return
        (t0, l0, theta0), (_, l1, _), (_, _, theta2) = self.window
        found = find_crossings([l0, l1], self.b)
        for kind in ("up", "down"):
            if getattr(found, kind):
                if self._seen[kind] % self.stride == 0 and self._kept[kind] < self.keep:
                    self._kept[kind] += 1
                    self.crossings.append(Crossing(t0, kind, theta0, theta2))
                self._seen[kind] += 1


@dataclass
class FloodingTrajectory:
    """What :func:`flooding_gd` records: L_t and ‖∇L(θ_t)‖ at every step t = 0..steps−1, and the kept crossings."""

    b: float
    lr: float
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    crossings: list[Crossing] = field(default_factory=list)


def flooding_gd(
    closure: Callable[[], Tensor], params: Sequence[Tensor], *, lr: float, b: float, steps: int, keep: int = 4,
    stride: int = 1,
) -> FloodingTrajectory:
    """Run ``steps`` steps of GD on the flooded loss (:func:`flooding_step`), recording the trajectory.

    ``closure()`` must return the full-batch loss L (the same function at every step: see
    :func:`two_step_identity`). Records L_t and ‖∇L(θ_t)‖ for every step and, for up to ``keep`` crossings of
    each kind, θ_t and θ_{t+2} (every ``stride``-th crossing: :class:`CrossingRecorder`).
    """
    params = list(params)
    recorder = CrossingRecorder(b, keep, stride)
    trajectory = FloodingTrajectory(b=b, lr=lr)
    for t in range(steps):
        theta = _flat(params) if keep > 0 else torch.empty(0)
        loss, grad_norm = _flooding_step(closure, params, lr, b)
        recorder.observe(t, float(loss), theta)
        trajectory.losses.append(float(loss))
        trajectory.grad_norms.append(grad_norm)
    if keep > 0:  # θ_steps closes a crossing at steps − 2
        recorder.observe(steps, math.nan, _flat(params))
        trajectory.crossings = recorder.crossings
    return trajectory


@dataclass
class IdentityError:
    """Result of :func:`two_step_identity` for one crossing.

    ``change``: ‖Δ − Δ̂‖/‖Δ‖ with Δ = θ_{t+2} − θ_t as the run produced it and Δ̂ = −η²·(FD estimate of H g)
    computed afresh (the demanding measure); ``params``: ‖θ_{t+2} − (θ_t + Δ̂)‖/‖θ_{t+2}‖;
    ``hessian``: ‖Δ + η² H g‖/‖Δ‖, how far the two steps are from the exact GR step −η² H g (O(η), not round-off).
    ``floor``: u‖θ_{t+2}‖/‖Δ‖ with u the unit round-off of the dtype, the size of ``change`` that rounding
    θ_t + η g into θ_{t+1} alone causes: the run's own round-off, seen relative to ‖Δ‖.
    """

    t: int
    kind: Kind
    change: float
    params: float
    hessian: float
    step_norm: float
    floor: float


def two_step_identity(
    closure: Callable[[], Tensor], params: Sequence[Tensor], crossing: Crossing, *, lr: float,
) -> IdentityError:
    """Check θ_{t+2} = θ_t − η² Δ_η at a crossing, with Δ_η computed independently by the GR engine.

    ``up`` (L_t < b < L_{t+1}): Δ_η = [∇L(θ_t + η g) − g]/η, the F-GR estimate: :func:`gradreg.gr_grad` with
    ``method="forward"``, γ = ε = η returns d = g + γΔ_η, so Δ̂ = −η² Δ_η = −η (d − g).
    ``down`` (L_t > b > L_{t+1}): Δ_η = [g − ∇L(θ_t − η g)]/η, the B-GR estimate (``method="backward"``).

    The closure must be the one the run used (same full batch, deterministic): the identity holds step by step
    only when both steps see the same loss. The parameters are restored on return.
    """
    params = list(params)
    saved = _flat(params)
    try:
        _unflatten_into(params, crossing.theta_t)
        with torch.enable_grad():
            g = torch.autograd.grad(closure(), params)
        method = "forward" if crossing.kind == "up" else "backward"
        old_grads = [p.grad for p in params]
        gr_grad(closure, params, gamma=lr, eps=lr, method=method)
        d = [p.grad.detach().clone() for p in params]
        for p, old in zip(params, old_grads):
            p.grad = old
        hg = hvp(closure, params, g)
    finally:
        _unflatten_into(params, saved)
    predicted = -lr * torch.cat([(di - gi).reshape(-1) for di, gi in zip(d, g)])
    exact_gr = -(lr**2) * torch.cat([h.reshape(-1) for h in hg])
    change = crossing.theta_t2 - crossing.theta_t
    step_norm = float(change.norm())
    unit_roundoff = torch.finfo(change.dtype).eps / 2
    return IdentityError(
        t=crossing.t,
        kind=crossing.kind,
        change=float((change - predicted).norm()) / step_norm,
        params=float((crossing.theta_t2 - (crossing.theta_t + predicted)).norm() / crossing.theta_t2.norm()),
        hessian=float((change - exact_gr).norm()) / step_norm,
        step_norm=step_norm,
        floor=unit_roundoff * float(crossing.theta_t2.norm()) / step_norm,
    )


# ----------------------------------------------------------------------------------- GD, flooding and F-GR


METHODS = ("gd", "flooding", "fgr")


@dataclass
class FullBatchHistory:
    """What :func:`full_batch_run` records.

    Every step t = 0..steps−1 (before step t): ``losses`` L(θ_t) and, for ``"gd"`` and ``"flooding"``,
    ``grad_norms`` ‖∇L(θ_t)‖ (empty for ``"fgr"``, whose step does not expose ∇L). Every ``measure_every`` steps
    and at the end: ``step``, the training loss ``loss``, the gradient norm ``grad_norm`` = ‖∇L‖ (of the plain
    loss, also for flooding), ``sharpness`` (the top Hessian eigenvalue of L) and ``test_accuracy``.
    ``crossings``: the crossings kept by a flooding run (see :class:`CrossingRecorder`).
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
    measure_every: int = 50,
    sharpness_iters: int = 20,
    sharpness_tol: float = 1e-3,
    keep_crossings: int = 0,
    crossing_stride: int = 1,
    loss_fn: LossFn = nn.functional.cross_entropy,
    desc: str | None = None,
) -> FullBatchHistory:
    """Full-batch training of ``model`` on ``data.x, data.y`` with one of three methods, all with step size η = ``lr``:

    * ``"gd"``: θ ← θ − η ∇L(θ);
    * ``"flooding"``: θ ← θ − η sign(L(θ) − b) ∇L(θ) (GD on :func:`flooded`, flood level ``b``);
    * ``"fgr"``: F-GR, θ ← θ − η [(1 − γ/ε) ∇L(θ) + (γ/ε) ∇L(θ + ε ∇L(θ))] (:class:`gradreg.GR` around SGD).

    Measures loss, ‖∇L‖, sharpness (power iteration warm-started from the previous eigenvector, at most
    ``sharpness_iters`` Hessian–vector products, relative tolerance ``sharpness_tol``) and test accuracy every
    ``measure_every`` steps. A flooding run keeps up to ``keep_crossings`` crossings of each kind, every
    ``crossing_stride``-th one, for :func:`two_step_identity`. The model is trained in place, in training mode.
    """
    from gradreg.experiments import evaluate

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if method == "flooding" and b is None:
        raise ValueError("method='flooding' needs the flood level b")
    if method == "fgr" and (gamma is None or eps is None):
        raise ValueError("method='fgr' needs gamma and eps")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def closure() -> Tensor:
        return loss_fn(model(data.x), data.y)

    history = FullBatchHistory(method=method, lr=lr, b=b)
    recorder = CrossingRecorder(
        b if b is not None else math.nan, keep_crossings if method == "flooding" else 0, crossing_stride
    )
    optimizer = GR(torch.optim.SGD(params, lr=lr), gamma=gamma, eps=eps) if method == "fgr" else None
    vector: list[Tensor] | None = None

    def measure(step: int) -> None:
        nonlocal vector
        with torch.enable_grad():
            loss = closure()
            grads = torch.autograd.grad(loss, params)
        top = top_eigenvalue(closure, params, iters=sharpness_iters, tol=sharpness_tol, seed=step, v0=vector)
        vector = top.vector
        history.step.append(step)
        history.loss.append(float(loss.detach()))
        history.grad_norm.append(_norm(grads))
        history.sharpness.append(top.value)
        history.test_accuracy.append(evaluate(model, data.x_test, data.y_test, loss_fn)[1])

    for t in progress(range(steps), desc=desc, leave=False):
        if t % measure_every == 0:
            measure(t)
        theta = _flat(params) if recorder.keep > 0 else torch.empty(0)
        if method == "flooding":
            loss, grad_norm = _flooding_step(closure, params, lr, b)
            history.grad_norms.append(grad_norm)
        elif method == "fgr":
            loss = optimizer.step(closure)
        else:
            with torch.enable_grad():
                loss = closure()
                grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(g, alpha=-lr)
            history.grad_norms.append(_norm(grads))
        loss = float(loss.detach())
        recorder.observe(t, loss, theta)
        history.losses.append(loss)
    measure(steps)
    if recorder.keep > 0:
        recorder.observe(steps, math.nan, _flat(params))
    history.crossings = recorder.crossings
    return history


def at_loss(history: FullBatchHistory, level: float, key: str) -> float:
    """A measured quantity of a run (``"grad_norm"`` or ``"sharpness"``) at the training loss ``level``.

    Interpolates log-log between the two measurements around the *last* time the measured loss fell through
    ``level`` (L_i > level ≥ L_{i+1}): v = exp((1 − w) log v_i + w log v_{i+1}),
    w = log(L_i/level)/log(L_i/L_{i+1}). Compares runs at equal loss, e.g. flooding at b with GD passing b.
    """
    losses, values = history.loss, getattr(history, key)
    falls = [i for i in range(len(losses) - 1) if losses[i] > level >= losses[i + 1]]
    if not falls:
        raise ValueError(f"the measured loss of this {history.method!r} run never falls through {level}")
    i = falls[-1]
    if min(values[i], values[i + 1], losses[i + 1]) <= 0:
        raise ValueError("log-log interpolation needs positive losses and values")
    w = math.log(losses[i] / level) / math.log(losses[i] / losses[i + 1])
    return math.exp((1 - w) * math.log(values[i]) + w * math.log(values[i + 1]))
