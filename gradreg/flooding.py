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

This module has the flooded loss (:func:`flooded`, batch-level or per-example iFlood), one flooding step
(:func:`flooding_step`), the crossing finder (:func:`find_crossings`) and a bounded recorder of crossings
(:class:`CrossingRecorder`), and the identity check (:func:`two_step_identity`). Training runs (GD, flooding,
F-GR on the full batch) live in :mod:`gradreg.experiments.full_batch`. Every public function checks its
arguments before doing any work.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from gradreg._checks import check_int, check_real, check_unique, trainable
from gradreg.engine import gr_grad
from gradreg.hessian import hvp

Kind = Literal["up", "down"]
KINDS: tuple[str, ...] = ("up", "down")


# ------------------------------------------------------------------------------------------ argument checks


def _check_closure(closure: object) -> None:
    if not callable(closure):
        raise TypeError(f"closure must be a callable that returns the loss, got {type(closure).__name__}")


def flat(params: Iterable[Tensor]) -> Tensor:
    """The parameters as one detached vector (a copy), by ``torch.nn.utils.parameters_to_vector``."""
    with torch.no_grad():
        return parameters_to_vector(params)


def load_flat(params: Sequence[Tensor], vector: Tensor) -> None:
    """Copy ``vector`` into ``params`` in place, the inverse of :func:`flat`.

    In place on purpose: ``torch.nn.utils.vector_to_parameters`` instead rebinds every ``p.data`` to a
    view of ``vector``, so the parameters would share memory with it (and with each other's storage).
    """
    sizes = [p.numel() for p in params]
    if vector.ndim != 1 or vector.numel() != sum(sizes):
        raise ValueError(f"vector must be flat with {sum(sizes)} entries (one per parameter entry), got shape "
                         f"{tuple(vector.shape)}")
    with torch.no_grad():
        for p, chunk in zip(params, vector.split(sizes)):
            p.copy_(chunk.view_as(p))


# ------------------------------------------------------------------------------------- the flooded loss, a step


def flooded(loss: Tensor, b: float) -> Tensor:
    """The flooded loss with flood level ``b`` ≥ 0.

    * a scalar ``loss`` L (batch-level flooding, Ishida et al. 2020): |L − b| + b;
    * a vector of per-example losses ℓ_i (iFlood, Xie et al. 2022): mean_i (|ℓ_i − b| + b).

    Use it in any training loop (``flooded(loss_fn(model(x), y), b).backward()``) or inside the closure of a
    :class:`gradreg.GR` optimizer. For iFlood, compute the losses with ``reduction="none"``.
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
    b = check_real("b (the flood level)", b)
    if loss.ndim == 0:
        return (loss - b).abs() + b
    if loss.ndim == 1:
        return ((loss - b).abs() + b).mean()
    raise ValueError(f"loss must be a scalar (flooding) or a vector of per-example losses (iFlood), got shape "
                     f"{tuple(loss.shape)}")


def flooding_step(closure: Callable[[], Tensor], params: Iterable[Tensor], *, lr: float, b: float) -> Tensor:
    """One gradient-descent step on the flooded loss: θ ← θ − η sign(L(θ) − b) ∇L(θ). Returns L(θ) (detached).

    ``closure()`` returns the plain loss L (a scalar, no ``backward()`` inside); ``params`` are updated in place.
    The written-out definition; a training loop gets the same step from ``torch.optim.SGD`` on :func:`flooded`
    (:func:`gradreg.experiments.full_batch.full_batch_run`).
    """
    _check_closure(closure)
    params = check_unique(trainable(params))
    lr = check_real("lr", lr, positive=True)
    b = check_real("b (the flood level)", b)
    with torch.enable_grad():
        loss = closure()
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            raise ValueError("closure must return the plain loss L as a scalar tensor")
        grads = torch.autograd.grad(flooded(loss, b), params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.add_(g, alpha=-lr)
    return loss.detach()


# ------------------------------------------------------------------------------------------------ crossings


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

    Strict inequalities: a loss exactly at b has a zero flooded gradient and crosses nothing; a NaN crosses
    nothing either.
    """
    b = check_real("b (the flood level)", b)
    up, down = [], []
    for t in range(len(losses) - 1):
        now, after = float(losses[t]), float(losses[t + 1])
        if now < b < after:
            up.append(t)
        elif now > b > after:
            down.append(t)
    return Crossings(up, down)


class CrossingRecorder:
    """Keeps θ_t and θ_{t+2} of up to ``keep`` (≥ 1) crossings of each kind while a flooding run goes on.

    Of each kind it keeps crossing number 0, ``stride``, 2·``stride``, … (so a large stride samples the whole
    run). Call ``observe(t, L_t, θ_t)`` at every step t, with θ_t flattened before the step, and once more after
    the last step (with the loss ``nan``) to close a crossing two steps before the end. Memory: three parameter
    copies plus 2·``keep`` saved pairs, however long the run.
    """

    def __init__(self, b: float, keep: int = 4, stride: int = 1):
        self.b = check_real("b (the flood level)", b)
        self.keep = check_int("keep", keep, minimum=1)
        self.stride = check_int("stride", stride, minimum=1)
        self.window: deque[tuple[int, float, Tensor]] = deque(maxlen=3)
        self.crossings: list[Crossing] = []
        self._seen = {"up": 0, "down": 0}
        self._kept = {"up": 0, "down": 0}

    def observe(self, t: int, loss: float, theta: Tensor) -> None:
        """Record step t: its loss L_t and the flattened θ_t (before the step); saves a crossing at t − 2."""
        check_int("t", t, minimum=0)
        if not isinstance(theta, Tensor):
            raise TypeError(f"theta must be the flattened parameters (a tensor), got {type(theta).__name__}")
        if self.window and self.window[-1][0] != t - 1:
            raise ValueError(f"observe() must be called at every step, in order: got t = {t} after "
                             f"t = {self.window[-1][0]}")
        self.window.append((t, float(loss), theta))
        if len(self.window) < 3:
            return
        (t0, l0, theta0), (_, l1, _), (_, _, theta2) = self.window
        found = find_crossings([l0, l1], self.b)
        for kind in KINDS:
            if getattr(found, kind):
                if self._seen[kind] % self.stride == 0 and self._kept[kind] < self.keep:
                    self._kept[kind] += 1
                    self.crossings.append(Crossing(t0, kind, theta0, theta2))
                self._seen[kind] += 1


# ------------------------------------------------------------------------------------- the two-step identity


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


def _check_crossing(crossing: object, params: list[Tensor]) -> Crossing:
    if not isinstance(crossing, Crossing):
        raise TypeError(f"crossing must be a gradreg.flooding.Crossing, got {type(crossing).__name__}")
    if crossing.kind not in KINDS:
        raise ValueError(f"crossing.kind must be one of {KINDS}, got {crossing.kind!r}")
    size = sum(p.numel() for p in params)
    for name in ("theta_t", "theta_t2"):
        theta = getattr(crossing, name)
        if not isinstance(theta, Tensor) or theta.shape != (size,):
            raise ValueError(f"crossing.{name} must be the flattened parameters, a vector of {size} entries; got "
                             f"{getattr(theta, 'shape', type(theta).__name__)}")
    return crossing


def two_step_identity(
    closure: Callable[[], Tensor], params: Iterable[Tensor], crossing: Crossing, *, lr: float,
) -> IdentityError:
    """Check θ_{t+2} = θ_t − η² Δ_η at a crossing, with Δ_η computed independently by the GR engine.

    ``up`` (L_t < b < L_{t+1}): Δ_η = [∇L(θ_t + η g) − g]/η, the F-GR estimate: :func:`gradreg.gr_grad` with
    ``method="forward"``, γ = ε = η returns d = g + γΔ_η, so Δ̂ = −η² Δ_η = −η (d − g).
    ``down`` (L_t > b > L_{t+1}): Δ_η = [g − ∇L(θ_t − η g)]/η, the B-GR estimate (``method="backward"``).

    The closure must be the one the run used (same full batch, deterministic): the identity holds step by step
    only when both steps see the same loss. The parameters and their ``.grad`` are restored on return.
    """
    _check_closure(closure)
    params = check_unique(trainable(params))
    crossing = _check_crossing(crossing, params)
    lr = check_real("lr", lr, positive=True)
    saved, old_grads = flat(params), [p.grad for p in params]
    try:
        load_flat(params, crossing.theta_t)
        with torch.enable_grad():
            g = torch.autograd.grad(closure(), params)
        gr_grad(closure, params, gamma=lr, eps=lr, method="forward" if crossing.kind == "up" else "backward")
        d = flat([p.grad for p in params])
        hg = flat(hvp(closure, params, g))
    finally:
        load_flat(params, saved)
        for p, old in zip(params, old_grads):
            p.grad = old
    predicted = -lr * (d - flat(g))
    change = crossing.theta_t2 - crossing.theta_t
    step_norm = float(change.norm())
    unit_roundoff = torch.finfo(change.dtype).eps / 2
    return IdentityError(
        t=crossing.t,
        kind=crossing.kind,
        change=float((change - predicted).norm()) / step_norm,
        params=float((crossing.theta_t2 - (crossing.theta_t + predicted)).norm() / crossing.theta_t2.norm()),
        hessian=float((change + lr**2 * hg).norm()) / step_norm,
        step_norm=step_norm,
        floor=unit_roundoff * float(crossing.theta_t2.norm()) / step_norm,
    )
