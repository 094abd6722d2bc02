"""The ascent–descent presets of GR against their defining formulas, computed independently (torch.func)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import grads_of, make, params_of, reference_gradient, rel_err

import gradreg as gr

SEED = 5


def _norm(d: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((v**2).sum()) for v in d.values()))


def _at(model, x, y, theta, step, scale=1.0):
    return reference_gradient(model, x, y, {k: theta[k] + scale * step[k] for k in theta}, SEED)


def expected_direction(name: str, model, x, y) -> dict[str, torch.Tensor]:
    theta = params_of(model)
    g = reference_gradient(model, x, y, theta, SEED)
    if name == "sam":  # ∇L(θ + ρ g/‖g‖)
        return _at(model, x, y, theta, g, 0.05 / (_norm(g) + 1e-12))
    if name == "usam":  # ∇L(θ + ρ g)
        return _at(model, x, y, theta, g, 0.05)
    if name == "gnp":  # (1 − λ/r) g + (λ/r) ∇L(θ + r g/‖g‖)
        other = _at(model, x, y, theta, g, 0.1 / (_norm(g) + 1e-12))
        return {k: (1 - 0.02 / 0.1) * g[k] + 0.02 / 0.1 * other[k] for k in g}
    # asam: ∇L(θ + ρ T²g/‖Tg‖), T = |w| + η for ndim ≥ 2
    t = {k: theta[k].abs() + 0.01 if theta[k].ndim >= 2 else torch.ones_like(theta[k]) for k in theta}
    tg_norm = _norm({k: t[k] * g[k] for k in g})
    return _at(model, x, y, theta, {k: t[k] ** 2 * g[k] for k in g}, 0.5 / (tg_norm + 1e-12))


PRESETS = {
    "sam": lambda base: gr.GR.sam(base, rho=0.05),
    "usam": lambda base: gr.GR.usam(base, rho=0.05),
    "gnp": lambda base: gr.GR.gnp(base, lam=0.02, r=0.1),
    "asam": lambda base: gr.GR.asam(base, rho=0.5, eta=0.01),
}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_direction_is_its_defining_formula(kind, name):
    model, closure, x, y = make(kind)
    expected = expected_direction(name, model, x, y)
    optimizer = PRESETS[name](torch.optim.SGD(model.parameters(), lr=0.1))
    torch.manual_seed(SEED)
    optimizer.direction(closure)
    assert rel_err(grads_of(model), expected) <= 1e-12


def test_usam_is_forward_gr_with_eps_equal_gamma():
    model, closure, *_ = make("mlp")
    a = gr.GR.usam(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    b = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.05, eps=0.05, method="forward")
    torch.manual_seed(SEED)
    a.direction(closure)
    first = grads_of(model)
    torch.manual_seed(SEED)
    b.direction(closure)
    assert all(torch.equal(first[k], v) for k, v in grads_of(model).items())
