"""Hessian–vector products and the top Hessian eigenvalue ("sharpness"), without forming the Hessian.

    Hv = ∇(∇L(θ)·v)                          (double backpropagation, Pearlmutter 1994)
    λ_top = lim_k  v_kᵀ H v_k,  v_{k+1} = H v_k / ‖H v_k‖       (power iteration)

Both call ``closure()`` (the loss on a fixed batch, no ``backward()`` inside) and differentiate it twice.

The function whose Hessian is taken must be the same in every call. Put the model in the mode you want to
measure *before* calling: in training mode BatchNorm normalizes with the batch statistics and dropout draws
masks, in eval mode BatchNorm uses its running statistics and dropout is off — two different functions with two
different Hessians. :func:`top_eigenvalue` keeps a training-mode function fixed across its many calls: it
replays the same random numbers in every call (same dropout masks) and stops normalization layers from updating
their running statistics, so measuring leaves the model, its buffers and the RNG as they were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.module import register_module_forward_pre_hook


def _as_list(tensors: Sequence[Tensor] | Tensor) -> list[Tensor]:
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def hvp(closure: Callable[[], Tensor], params: Sequence[Tensor], v: Sequence[Tensor]) -> list[Tensor]:
    """The Hessian–vector product H v of ``closure()`` with respect to ``params``, by double backprop.

    H v = ∇_θ (∇_θ L(θ) · v). ``v`` has one tensor per parameter (same shapes); parameters that the loss does not
    depend on get zeros. Evaluate in the mode you want to measure (see the module docstring): each call runs the
    closure once, so in training mode dropout draws new masks and BatchNorm updates its running statistics.
    """
    params, v = _as_list(params), _as_list(v)
    if len(params) != len(v):
        raise ValueError(f"v must have one tensor per parameter: got {len(v)} for {len(params)} parameters")
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


@contextlib.contextmanager
def same_function() -> Iterator[Callable[[], None]]:
    """Inside: call ``replay()`` before each evaluation to get the same function every time.

    ``replay()`` restores the CPU and CUDA random-number state saved on entry (same dropout masks); while inside,
    normalization layers in training mode use their batch statistics but do not update their running ones. On
    exit the RNG state is put back as it was on entry.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
    frozen: list[torch.nn.Module] = []

    def pre_hook(module: torch.nn.Module, args: object) -> None:
        if isinstance(module, _NormBase) and module.training and module.track_running_stats:
            module.track_running_stats = False
            frozen.append(module)

    def replay() -> None:
        torch.set_rng_state(cpu_state)
        for d, state in zip(devices, cuda_states):
            torch.cuda.set_rng_state(state, d)

    handle = register_module_forward_pre_hook(pre_hook)
    try:
        yield replay
    finally:
        handle.remove()
        for module in frozen:
            module.track_running_stats = True
        replay()


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
    eigenvalue dominates the result is negative. It converges like (λ₂/λ₁)^{2k}; ``converged=False`` says the tolerance was not reached (e.g. when
    λ and −λ are both eigenvalues of the largest magnitude).

    The closure is evaluated once per iteration as the same function (same dropout masks, BatchNorm running
    statistics untouched; see :func:`same_function`), and the RNG is left as it was.
    """
    params = [p for p in _as_list(params) if p.requires_grad]
    if not params:
        raise ValueError("params: no parameter requires grad")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if v0 is None:
        generator = torch.Generator().manual_seed(seed)
        v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    else:
        v = [u.detach().clone() for u in _as_list(v0)]
    norm = torch.sqrt(_dot(v, v))
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the start vector must be finite and non-zero")
    v = [u / norm for u in v]
    value, previous, converged, k = math.nan, math.nan, False, 0
    with same_function() as replay:
        for k in range(1, iters + 1):
            replay()
            hv = hvp(closure, params, v)
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
