"""Measurements the chapters make on the engine: finite-difference errors against double backprop, fitted
orders of convergence, and the size of autograd graphs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from gradreg.engine import gr_grad


def loss_of_flat(model: torch.nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor,
                 y: Tensor) -> Callable[[Tensor], Tensor]:
    """θ ↦ L(θ) = loss_fn(model(x; θ), y) on one flat parameter vector θ (in ``model.parameters()`` order), by
    ``torch.func.functional_call``: the reference, independent of the engine, that ``torch.func.grad`` and ``jvp``
    differentiate to any order."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss_at(theta: Tensor) -> Tensor:
        chunks = theta.split([math.prod(shape) for shape in shapes])
        weights = {name: c.view(shape) for name, c, shape in zip(names, chunks, shapes)}
        return loss_fn(torch.func.functional_call(model, weights, (x,)), y)

    return loss_at


def gr_vector(closure: Callable[[], Tensor], params: Sequence[Tensor], *, seed: int = 0, **kwargs) -> Tensor:
    """The GR direction of :func:`gradreg.gr_grad` as one flat vector (RNG seeded, so dropout masks repeat)."""
    torch.manual_seed(seed)
    gr_grad(closure, params, **kwargs)
    return torch.cat([p.grad.reshape(-1) for p in params]).detach().clone()


def fd_errors(
    closure: Callable[[], Tensor], params: Sequence[Tensor], *, gamma: float, eps_grid: Iterable[float],
    methods: Sequence[str] = ("forward", "backward", "central"), seed: int = 0,
) -> dict[str, np.ndarray]:
    """Relative error ‖d_method(ε) − d_double‖ / ‖d_double − g‖ of each finite-difference method, per ε.

    The denominator is the exact GR term ‖γ H g‖, so the number says how well the method computes the part
    of the direction that GR adds (the part ``g`` is exact in every method).
    """
    params = list(params)
    exact = gr_vector(closure, params, seed=seed, gamma=gamma, method="double")
    plain = gr_vector(closure, params, seed=seed, gamma=0.0, method="double")
    scale = float((exact - plain).norm())
    eps_grid = [float(e) for e in eps_grid]
    return {
        method: np.array([
            float((gr_vector(closure, params, seed=seed, gamma=gamma, eps=e, method=method) - exact).norm()) / scale
            for e in eps_grid
        ])
        for method in methods
    }


def loglog_slope(x: Iterable[float], y: Iterable[float]) -> float:
    """Least-squares slope of log y against log x: the order p in y ≈ C x^p."""
    return float(np.polyfit(np.log(np.asarray(list(x), float)), np.log(np.asarray(list(y), float)), 1)[0])


def autograd_graph_size(output: Tensor) -> int:
    """Number of distinct autograd nodes reachable from ``output.grad_fn`` (the work one backward pass visits).

    Python wrappers of autograd nodes are made on access and die with their last reference, and Python reuses the
    ``id`` of a dead object; so every wrapper visited is kept alive (in ``visited``) while ids are compared.
    """
    visited: list[object] = []  # keeps each wrapper alive, so the same node keeps its wrapper and its id
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        visited.append(node)
        seen.add(id(node))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)
