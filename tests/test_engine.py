"""The engine against independent references: torch.func (jvp of grad), gradients at explicitly perturbed
points, and bitwise snapshots for the failure paths. Everything in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import (
    assert_same,
    grads_of,
    make,
    params_of,
    reference_g_hg,
    reference_gr_direction,
    reference_gradient,
    rel_err,
    snapshot,
    square_whose_double_backward_raises,
)

import gradreg as gr
from gradreg.engine import ParamGroup, gr_direction

GAMMA = 0.1
SEED = 5
KINDS = ["mlp", "cnn"]


def run(closure, model, **kwargs) -> torch.Tensor:
    torch.manual_seed(SEED)
    return gr.gr_grad(closure, model.parameters(), **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_double_equals_g_plus_gamma_hg(kind):
    model, closure, x, y = make(kind)
    before = params_of(model)
    expected = reference_gr_direction(model, x, y, GAMMA, SEED)
    loss = run(closure, model, gamma=GAMMA, method="double")
    assert rel_err(grads_of(model), expected) <= 1e-10
    assert_same(params_of(model), before)
    torch.manual_seed(SEED)
    assert torch.equal(loss, closure().detach())  # the loss at θ, with the same dropout masks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("method", "order"), [("forward", 1), ("backward", 1), ("central", 2)])
def test_finite_differences_converge_to_double_at_their_order(kind, method, order):
    """Fitted log-log slope of ‖d_FD − d_DB‖/‖d_DB‖ over ε ∈ [1e-5, 1e-2]: 1 for F/B-GR, 2 for central.
    The MLP has dropout active: without identical masks in every pass there would be no convergence at all."""
    model, closure, x, y = make(kind)
    expected = reference_gr_direction(model, x, y, GAMMA, SEED)
    eps_grid = np.logspace(-5, -2, 7)
    errors = []
    for eps in eps_grid:
        run(closure, model, gamma=GAMMA, eps=float(eps), method=method)
        errors.append(rel_err(grads_of(model), expected))
    slope = np.polyfit(np.log(eps_grid), np.log(errors), 1)[0]
    assert abs(slope - order) <= 0.1, (slope, errors)
    assert errors[0] < 1e-4


def _finite_eps_expected(model, x, y, method, gamma, eps):
    """The defining formula of each method at a finite ε, from gradients at explicitly built points."""
    theta = params_of(model)
    g = reference_gradient(model, x, y, theta, SEED)
    plus = reference_gradient(model, x, y, {k: theta[k] + eps * g[k] for k in theta}, SEED)
    minus = reference_gradient(model, x, y, {k: theta[k] - eps * g[k] for k in theta}, SEED)
    c = gamma / eps
    if method == "forward":
        return {k: (1 - c) * g[k] + c * plus[k] for k in g}
    if method == "backward":
        return {k: (1 + c) * g[k] - c * minus[k] for k in g}
    return {k: g[k] + gamma * (plus[k] - minus[k]) / (2 * eps) for k in g}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["forward", "backward", "central"])
@pytest.mark.parametrize(("gamma", "eps"), [(0.1, 0.05), (0.02, 0.3), (1.0, 0.01)])
def test_each_method_is_its_defining_formula_at_finite_eps(kind, method, gamma, eps):
    model, closure, x, y = make(kind)
    expected = _finite_eps_expected(model, x, y, method, gamma, eps)
    run(closure, model, gamma=gamma, eps=eps, method=method)
    assert rel_err(grads_of(model), expected) <= 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_forward_with_eps_equal_gamma_is_unnormalized_sam(kind):
    rho = 0.05
    model, closure, x, y = make(kind)
    theta = params_of(model)
    g = reference_gradient(model, x, y, theta, SEED)
    sam = reference_gradient(model, x, y, {k: theta[k] + rho * g[k] for k in theta}, SEED)
    run(closure, model, gamma=rho, eps=rho, method="forward")
    assert rel_err(grads_of(model), sam) <= 1e-12


@pytest.mark.parametrize("method", ["forward", "backward", "central", "double"])
def test_parameters_hold_theta_bit_for_bit_after_the_call(method):
    model, closure, _, _ = make("cnn")
    before = params_of(model)
    storages = [p.data_ptr() for p in model.parameters()]
    run(closure, model, gamma=GAMMA, eps=0.1, method=method)
    assert_same(params_of(model), before)
    assert storages == [p.data_ptr() for p in model.parameters()]


@pytest.mark.parametrize("method", ["forward", "backward", "central", "double"])
def test_batchnorm_running_stats_updated_once_as_in_a_plain_step(method):
    model, closure, x, _ = make("mlp")
    plain = make("mlp")[0]
    torch.manual_seed(SEED)
    plain(x)
    run(closure, model, gamma=GAMMA, eps=0.1, method=method)
    assert_same(dict(model.named_buffers()), dict(plain.named_buffers()))
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))


@pytest.mark.parametrize("method", ["forward", "backward", "central", "double"])
def test_rng_continues_as_after_one_plain_pass(method):
    model, closure, _, _ = make("mlp")
    torch.manual_seed(SEED)
    closure()
    expected = torch.rand(4)
    run(closure, model, gamma=GAMMA, eps=0.1, method=method)
    assert torch.equal(torch.rand(4), expected)


def test_gamma_zero_returns_the_plain_gradient_exactly_with_one_pass():
    model, closure, x, y = make("mlp")
    calls = []

    def counting():
        calls.append(1)
        return closure()

    torch.manual_seed(SEED)
    counting().backward()
    plain = grads_of(model)
    run(counting, model, gamma=0.0, eps=0.1, method="forward")
    assert_same(grads_of(model), plain)
    assert len(calls) == 2  # one for the plain gradient, one for GR


def test_per_group_gamma_matches_g_plus_gamma_k_hg_k():
    model, closure, x, y = make("mlp")
    g, hg = reference_g_hg(model, x, y, SEED)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    gammas = {n: (0.3 if i < 2 else (0.0 if i == 2 else 0.05)) for i, n in enumerate(names)}
    groups = [ParamGroup(params[:2], 0.3), ParamGroup(params[2:3], 0.0), ParamGroup(params[3:], 0.05)]
    expected = {n: g[n] + gammas[n] * hg[n] for n in names}
    torch.manual_seed(SEED)
    gr_direction(closure, groups, method="double")
    assert rel_err(grads_of(model), expected) <= 1e-10
    eps = 1e-6  # forward differences agree to O(ε) per group, the γ = 0 group exactly
    for group in groups:
        group.eps = eps
    torch.manual_seed(SEED)
    gr_direction(closure, groups, method="forward")
    assert rel_err(grads_of(model), expected) <= 1e-5
    assert torch.equal(params[2].grad, g[names[2]]) or torch.allclose(params[2].grad, g[names[2]], rtol=1e-13)


@pytest.mark.parametrize("method", ["forward", "backward", "central"])
def test_per_group_eps_uses_one_joint_step_and_per_group_coefficients(method):
    """With ε_k per group the engine evaluates ∇L(θ + s_j E g) once per stencil row and combines with
    c_k = γ_k/ε_k: d_k = (1 − c_kΣw) g_k + c_k Σ_j w_j ∇_k L(θ + s_j E g)."""
    model, closure, x, y = make("mlp")
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    split = 3
    eps = {n: (0.05 if i < split else 0.2) for i, n in enumerate(names)}
    gamma = {n: (0.1 if i < split else 0.04) for i, n in enumerate(names)}
    theta = params_of(model)
    g = reference_gradient(model, x, y, theta, SEED)
    at = {s: reference_gradient(model, x, y, {k: theta[k] + s * eps[k] * g[k] for k in theta}, SEED) for s in (1, -1)}
    stencil = {"forward": [(1, 1.0)], "backward": [(-1, -1.0)], "central": [(1, 0.5), (-1, -0.5)]}[method]
    expected = {k: (1 - gamma[k] / eps[k] * sum(w for _, w in stencil)) * g[k]
                + gamma[k] / eps[k] * sum(w * at[s][k] for s, w in stencil) for k in g}
    groups = [ParamGroup(params[:split], 0.1, 0.05), ParamGroup(params[split:], 0.04, 0.2)]
    torch.manual_seed(SEED)
    gr_direction(closure, groups, method=method)
    assert rel_err(grads_of(model), expected) <= 1e-12


def _adaptive_scale(name: str, value: torch.Tensor, eta: float) -> torch.Tensor:
    return value.abs() + eta if value.ndim >= 2 else torch.ones_like(value)


@pytest.mark.parametrize("perturbation", ["normalized", "adaptive"])
@pytest.mark.parametrize("method", ["forward", "backward"])
def test_normalized_and_adaptive_steps_match_their_formulas(perturbation, method):
    """normalized: θ ± ε g/‖g‖; adaptive (ASAM): θ ± ε T²g/‖Tg‖, T = |w| + η on tensors with ndim ≥ 2."""
    gamma, eps, eta = 0.03, 0.1, 0.01
    model, closure, x, y = make("mlp")
    theta = params_of(model)
    g = reference_gradient(model, x, y, theta, SEED)
    if perturbation == "normalized":
        norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
        step = {k: eps * g[k] / (norm + 1e-12) for k in g}
    else:
        t = {k: _adaptive_scale(k, theta[k], eta) for k in theta}
        norm = math.sqrt(sum(float(((t[k] * g[k]) ** 2).sum()) for k in g))
        step = {k: eps * t[k] ** 2 * g[k] / (norm + 1e-12) for k in g}
    sign = 1.0 if method == "forward" else -1.0
    other = reference_gradient(model, x, y, {k: theta[k] + sign * step[k] for k in theta}, SEED)
    c = gamma / eps
    expected = {k: (1 - sign * c) * g[k] + sign * c * other[k] for k in g}
    run(closure, model, gamma=gamma, eps=eps, method=method, perturbation=perturbation, adaptive_eta=eta)
    assert rel_err(grads_of(model), expected) <= 1e-12


# ---------------------------------------------------------------------------------------------- failures


class Faulty:
    """A closure that misbehaves on its ``on``-th call (1-based) in the way ``how`` says."""

    def __init__(self, closure, model, on: int, how: str):
        self.closure, self.model, self.on, self.how, self.calls = closure, model, on, how, 0

    def __call__(self):
        self.calls += 1
        loss = self.closure()
        if self.calls != self.on:
            return loss
        if self.how == "raise":
            raise RuntimeError("boom")
        if self.how == "nan-loss":
            return loss * float("nan")
        if self.how == "inf-loss":
            return loss + float("inf")
        if self.how == "nan-grad":  # finite loss, NaN gradient: d√u/du = ∞ at u = 0, times 0
            w = next(self.model.parameters())
            return loss + torch.sqrt((w * 0).abs().sum())
        if self.how == "non-scalar":
            return loss.expand(2)
        raise AssertionError(self.how)


PASSES = {"forward": 2, "backward": 2, "central": 3, "double": 1}
FAILURES = [(m, k, how) for m, n in PASSES.items() for k in range(1, n + 1)
            for how in ["raise", "nan-loss", "inf-loss", "nan-grad", "non-scalar"]]


@pytest.mark.parametrize("kind", ["mlp", "inorm"])
@pytest.mark.parametrize(("method", "on", "how"), FAILURES)
def test_a_failing_pass_leaves_everything_as_before(kind, method, on, how):
    """BatchNorm + dropout (mlp); InstanceNorm with running statistics + dropout + an unused parameter (inorm)."""
    model, closure, _, _ = make(kind)
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=GAMMA, eps=0.05,
                      method=method)
    optimizer.step(closure)  # momentum buffers and .grad exist now
    torch.manual_seed(SEED)
    before = snapshot(model, optimizer)
    expected = {"raise": RuntimeError, "non-scalar": ValueError}.get(how, gr.NonFiniteError)
    with pytest.raises(expected) as info:
        optimizer.step(Faulty(closure, model, on, how))
    assert_same(snapshot(model, optimizer), before)
    text = str(info.value) + " ".join(getattr(info.value, "__notes__", []))
    if method == "central" and how == "nan-grad" and on > 1:
        assert "pass 2 or 3" in text
    else:
        assert f"pass {on}" in text, text
    if expected is gr.NonFiniteError:
        assert info.value.pass_index == (min(on, 2) if method == "central" and how == "nan-grad" else on)


def test_double_backward_failure_is_explained():
    """An op without a double backward (like fused attention kernels): DB fails, the note points to F-GR."""
    model, closure, _, _ = make("mlp")

    square = square_whose_double_backward_raises("the derivative for 'not_twice' is not implemented")
    optimizer = gr.GR(torch.optim.Adam(model.parameters()), gamma=GAMMA, method="double")
    optimizer.step(closure)
    before = snapshot(model, optimizer)
    with pytest.raises(RuntimeError) as info:
        optimizer.step(lambda: square(closure()))
    notes = " ".join(info.value.__notes__)
    assert "pass 2 (Hessian-vector product" in notes and "method='forward'" in notes
    assert_same(snapshot(model, optimizer), before)
    gr.GR(torch.optim.Adam(model.parameters()), gamma=GAMMA, eps=0.01).step(lambda: square(closure()))


def test_closure_that_calls_backward_itself_is_explained():
    model, closure, _, _ = make("mlp")

    def bad():
        loss = closure()
        loss.backward()
        return loss

    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"closure changed \.grad .*remove .*loss\.backward\(\)") as info:
        gr.gr_grad(bad, model.parameters(), gamma=GAMMA, eps=0.1)
    assert "pass 1" in " ".join(info.value.__notes__)
    assert_same(snapshot(model), before)


# ---------------------------------------------------------------------------------------------- bad input

BAD = [
    (dict(gamma=-0.1, eps=0.1), ValueError, r"gamma must be a finite number >= 0, got -0.1"),
    (dict(gamma=float("nan"), eps=0.1), ValueError, r"gamma must be a finite number >= 0"),
    (dict(gamma=float("inf"), eps=0.1), ValueError, r"gamma must be a finite number >= 0"),
    (dict(gamma="0.1", eps=0.1), TypeError, r"gamma must be a finite number >= 0"),
    (dict(gamma=True, eps=0.1), TypeError, r"gamma must be a finite number >= 0"),
    (dict(gamma=0.1), ValueError, r"eps is required for method='forward'.*> 0"),
    (dict(gamma=0.1, eps=None, method="central"), ValueError, r"eps is required for method='central'"),
    (dict(gamma=0.1, eps=0.0), ValueError, r"eps must be a finite number > 0, got 0.0"),
    (dict(gamma=0.1, eps=-0.01), ValueError, r"eps must be a finite number > 0, got -0.01"),
    (dict(gamma=0.1, eps=float("inf")), ValueError, r"eps must be a finite number > 0"),
    (dict(gamma=0.1, eps=0.1, method="fwd"), ValueError,
     r"method must be one of 'forward', 'backward', 'central', 'double'; got 'fwd'"),
    (dict(gamma=0.1, eps=0.1, perturbation="l2"), ValueError,
     r"perturbation must be one of 'raw', 'normalized', 'adaptive'; got 'l2'"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_settings_are_refused_naming_the_argument(kwargs, error, match):
    model, closure, _, _ = make("mlp")
    with pytest.raises(error, match=match):
        gr.gr_grad(closure, model.parameters(), **kwargs)
    with pytest.raises(error, match=match):
        gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_double_ignores_eps():
    model, closure, _, _ = make("mlp")
    gr.gr_grad(closure, model.parameters(), gamma=GAMMA, method="double")


def test_no_trainable_parameter_is_refused():
    model, closure, _, _ = make("mlp")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="params: no parameter requires grad"):
        gr.gr_grad(closure, model.parameters(), gamma=GAMMA, eps=0.1)
    with pytest.raises(ValueError, match="base_optimizer: no parameter requires grad"):
        gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=GAMMA, eps=0.1)


def test_closure_must_return_a_differentiable_scalar_tensor():
    model, closure, _, _ = make("mlp")
    with pytest.raises(TypeError, match="closure must return the loss as a scalar tensor, got float") as info:
        gr.gr_grad(lambda: 1.0, model.parameters(), gamma=GAMMA, eps=0.1)
    assert "pass 1 (gradient at θ)" in " ".join(info.value.__notes__)
    with pytest.raises(ValueError, match="does not require grad") as info:
        gr.gr_grad(lambda: closure().detach(), model.parameters(), gamma=GAMMA, eps=0.1)
    assert "pass 1 (gradient at θ)" in " ".join(info.value.__notes__)
