"""Diagnostics used by Chapter 1, against closed forms."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gradreg.diagnostics import autograd_graph_size, fd_errors, loglog_slope, loss_of_flat


def test_loglog_slope_recovers_a_power_law():
    x = np.logspace(-5, -1, 9)
    assert abs(loglog_slope(x, 3.0 * x**1.5) - 1.5) < 1e-12


def test_graph_size_counts_distinct_nodes():
    a = torch.ones(3, requires_grad=True)
    b = a * 2  # MulBackward0 -> AccumulateGrad
    c = (b + b).sum()  # SumBackward0 -> AddBackward0 -> MulBackward0 (shared) -> AccumulateGrad
    assert autograd_graph_size(c) == 4


def test_fd_errors_on_a_quartic_match_the_closed_form():
    """L(θ) = θ⁴/4 in 1-D: g = θ³, H = 3θ², ∇L(θ + εg) = (θ + εθ³)³, so every error is known exactly."""
    theta = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    gamma, grid = 0.1, [1e-3, 1e-2, 1e-1]
    errors = fd_errors(lambda: (theta**4).sum() / 4, [theta], gamma=gamma, eps_grid=grid)
    t = 0.7
    g, hg = t**3, 3 * t**2 * t**3
    for eps, fwd, bwd, ctr in zip(grid, errors["forward"], errors["backward"], errors["central"]):
        plus, minus = (t + eps * g) ** 3, (t - eps * g) ** 3
        assert abs(fwd - abs((plus - g) / eps - hg) / hg) < 1e-9
        assert abs(bwd - abs((g - minus) / eps - hg) / hg) < 1e-9
        assert abs(ctr - abs((plus - minus) / (2 * eps) - hg) / hg) < 1e-9


def test_graph_size_agrees_with_an_identity_count_on_random_graphs():
    """Random DAGs with shared nodes, against a count that keeps every node wrapper alive and compares identity."""
    import random

    def by_identity(out):
        seen, stack = [], [out.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and not any(node is s for s in seen):
                seen.append(node)
                stack.extend(n for n, _ in node.next_functions)
        return len(seen)

    for trial in range(10):
        rng = random.Random(trial)
        nodes = [torch.randn(3, requires_grad=True)]
        for _ in range(40):
            a, b = rng.choice(nodes), rng.choice(nodes)
            nodes.append(rng.choice([lambda u, v: u * v, lambda u, v: u + v.sin(), lambda u, v: (u - v).tanh()])(a, b))
        out = sum(n.sum() for n in nodes[-4:])
        assert autograd_graph_size(out) == by_identity(out)


def test_loss_of_flat_is_the_model_loss_and_differentiates_like_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    loss = nn.functional.cross_entropy(model(x), y)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    loss_at = loss_of_flat(model, nn.functional.cross_entropy, x, y)
    assert torch.equal(loss_at(theta), loss.detach())
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    assert torch.allclose(torch.func.grad(loss_at)(theta), expected, rtol=0, atol=1e-15)
    assert not torch.equal(loss_at(theta + 0.1), loss.detach())  # it reads θ, not the module's parameters
