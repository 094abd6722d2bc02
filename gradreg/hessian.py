"""Hessian–vector products and the top Hessian eigenvalue ("sharpness"), without forming the Hessian.

    Hv = ∇(∇L(θ)·v)                          (double backpropagation, Pearlmutter 1994)
    λ_top = lim_k  v_kᵀ H v_k,  v_{k+1} = H v_k / ‖H v_k‖       (power iteration)

Both call ``closure()`` (the loss on a fixed batch, no ``backward()`` inside) and differentiate it twice.

The function whose Hessian is taken must be the same in every call. Put the model in the mode you want to
measure *before* calling: in training mode BatchNorm normalizes with the batch statistics and dropout draws
masks, in eval mode BatchNorm uses its running statistics and dropout is off — two different functions with two
different Hessians. :func:`top_eigenvalue` keeps a training-mode function fixed across its many calls: it
replays the same random numbers in every call (same dropout masks) and stops normalization layers from updating
their running statistics (:class:`gradreg.replay.Replay`, the step context the GR engine uses too), so measuring
leaves the model, its buffers, ``.grad`` and the RNG as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

from gradreg._checks import as_params, check_unique, trainable
from gradreg.replay import Replay


def _as_list(tensors: Sequence[Tensor] | Tensor) -> list[Tensor]:
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def hvp(closure: Callable[[], Tensor], params: Sequence[Tensor], v: Sequence[Tensor]) -> list[Tensor]:
    """The Hessian–vector product H v of ``closure()`` with respect to ``params``, by double backprop.

    H v = ∇_θ (∇_θ L(θ) · v). ``v`` has one tensor per parameter (same shapes); parameters that the loss does not
    depend on get zeros. Evaluate in the mode you want to measure (see the module docstring): each call runs the
    closure once, so in training mode dropout draws new masks and BatchNorm updates its running statistics.
    """
    params, v = _check_vectors(_as_list(params), _as_list(v))
    with torch.enable_grad():
        loss = closure()
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            raise ValueError("closure must return the loss as a scalar tensor")
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(g, u) for g, u in zip(grads, v) if g is not None and g.requires_grad]
        if not pairs:
            return [torch.zeros_like(p) for p in params]
        dot = sum((g * u).sum() for g, u in pairs)
        hv = torch.autograd.grad(dot, params, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, params)]


def _check_vectors(params: list[Tensor], v: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Distinct parameters, and one vector per parameter with its exact shape, dtype and device (a broadcastable
    shape would give a wrong product without an error)."""
    params = check_unique(as_params(params), "params")
    v = as_params(v, "v")
    if len(params) != len(v):
        raise ValueError(f"v must have one tensor per parameter: got {len(v)} for {len(params)} parameters")
    for i, (p, u) in enumerate(zip(params, v)):
        if u.shape != p.shape or u.dtype != p.dtype or u.device != p.device:
            raise ValueError(f"v[{i}] must match parameter {i}: shape {tuple(p.shape)}, {p.dtype} on {p.device}; "
                             f"got shape {tuple(u.shape)}, {u.dtype} on {u.device}")
    return params, v


@dataclass(frozen=True)
class TopEigen:
    """Result of :func:`top_eigenvalue`: the eigenvalue, its unit eigenvector, iterations used, convergence."""

    value: float
    vector: list[Tensor]
    iterations: int
    converged: bool


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def top_eigenvalue(
    closure: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    iters: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    v0: Sequence[Tensor] | None = None,
) -> TopEigen:
    """The Hessian eigenvalue of **largest magnitude**, by power iteration on Hessian–vector products.

    v₀ is a seeded Gaussian (or ``v0``, e.g. the previous vector, to warm-start a tracked sharpness);
    v_{k+1} = H v_k/‖H v_k‖ and λ_k = v_kᵀ H v_k (the Rayleigh quotient, which carries the sign). It stops
    when abs(λ_k − λ_{k−1}) ≤ tol·abs(λ_k) or after ``iters`` products. Power iteration finds the eigenvalue of
    largest absolute value: near a minimum that is the top ("sharpness") eigenvalue, but where a negative
    eigenvalue dominates the result is negative. It converges like (λ₂/λ₁)^{2k}; ``converged=False`` says the
    tolerance was not reached (e.g. when λ and −λ are both eigenvalues of the largest magnitude).

    The closure is evaluated once per iteration as the same function, in a :class:`gradreg.replay.Replay`
    (same dropout masks; running statistics of every normalization layer, InstanceNorm included, untouched;
    ``.grad`` untouched), and the RNG is left as it was. ``iters`` ≥ 1, ``tol`` ≥ 0, and ``v0`` has one finite,
    not-all-zero tensor per parameter, shaped like it.
    """
    params = check_unique(trainable(_as_list(params)))
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    if isinstance(tol, bool) or not isinstance(tol, Real) or not tol >= 0 or not math.isfinite(tol):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    v = _start_vector(params, seed, v0)
    replay = Replay(params, replay_first=True)
    try:
        result = _power_iteration(lambda: replay.evaluate(closure), replay, params, v, iters, tol)
    except BaseException as exc:
        replay.rollback(exc, f"in power iteration {replay.passes}")
        raise
    replay.close(keep_grads=False)
    return result


def _start_vector(params: list[Tensor], seed: int, v0: Sequence[Tensor] | None) -> list[Tensor]:
    if v0 is None:
        generator = torch.Generator().manual_seed(seed)
        v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    else:
        v = [u.detach().clone() for u in _as_list(v0)]
        if len(v) != len(params) or any(u.shape != p.shape for u, p in zip(v, params)):
            raise ValueError(f"v0 must have one tensor per parameter, shaped like it: got shapes "
                             f"{[tuple(u.shape) for u in v]} for {[tuple(p.shape) for p in params]}")
    norm = torch.sqrt(_dot(v, v))
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("v0: the start vector must be finite and not all zero")
    return [u / norm for u in v]


def _power_iteration(closure: Callable[[], Tensor], replay: Replay, params: list[Tensor], v: list[Tensor],
                     iters: int, tol: float) -> TopEigen:
    """v_{k+1} = H v_k / ‖H v_k‖, λ_k = v_kᵀ H v_k, until abs(λ_k − λ_{k−1}) ≤ tol·abs(λ_k) or ``iters`` products."""
    value, previous, converged, k = math.nan, math.nan, False, 0
    for k in range(1, iters + 1):
        if k > 1:
            replay.begin_pass()  # replay.passes counts the iterations: error notes name the one that failed
        hv = hvp(closure, params, v)
        replay.end_pass()
        value = float(_dot(v, hv))
        norm = torch.sqrt(_dot(hv, hv))
        if not math.isfinite(value) or not torch.isfinite(norm):
            raise FloatingPointError(f"non-finite Hessian-vector product in power iteration {k}")
        if norm == 0:  # v is in the null space: H v = 0 and the eigenvalue found is 0
            return TopEigen(0.0, v, k, True)
        if abs(value - previous) <= tol * abs(value):
            converged = True
            break
        previous = value
        v = [h / norm for h in hv]
    return TopEigen(value, v, k, converged)
