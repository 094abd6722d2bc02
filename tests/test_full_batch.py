"""The full-batch trainer against hand-written float64 references: GD, flooding (flooding_step), every GR method
(gr_grad + a manual update), the measurements (direct calls), crossings, argument checks and at_loss."""

from __future__ import annotations

import pytest
import torch
from helpers import loss_of_flat, params_vector, relu_problem
from torch import nn
from torch.func import grad

import gradreg as gr
from gradreg.data import Dataset
from gradreg.experiments import evaluate
from gradreg.experiments.full_batch import FullBatchHistory, Measurer, at_loss, full_batch_run
from gradreg.flooding import find_crossings, flooding_step
from gradreg.hessian import top_eigenvalue
from gradreg.methods import METHODS

LR, STEPS, B = 0.3, 12, 2.2


def _problem(seed: int = 0, n: int = 64, width: int = 16):
    """The full-batch problem of tests/helpers.py, with its first 16 examples as a small test set."""
    model, x, y = relu_problem(seed, n, width)
    return model, Dataset(x, y, x[:16], y[:16], 10)


def _run(method: str, **kwargs):
    model, data = _problem()
    defaults = dict(lr=LR, steps=STEPS, measure_every=None)
    if method == "flooding":
        defaults["b"] = B
    if method in METHODS:
        defaults.update(gamma=LR, eps=None if method == "double" else LR)
    return model, data, full_batch_run(model, data, method=method, **{**defaults, **kwargs})


# ---------------------------------------------------------------------------------- the steps, by definition


def test_gd_is_plain_gradient_descent_in_float64():
    """θ_{t+1} = θ_t − η ∇L(θ_t), written out with torch.func on one flat vector: equal to 1e-12."""
    model, data, history = _run("gd")
    reference, _ = _problem()
    loss = loss_of_flat(reference, data.x, data.y)
    theta = params_vector(reference)
    losses = []
    for _ in range(STEPS):
        losses.append(float(loss(theta)))
        theta = theta - LR * grad(loss)(theta)
    assert float((params_vector(model) - theta).norm() / theta.norm()) <= 1e-12
    assert history.losses == pytest.approx(losses, rel=1e-12, abs=0)
    assert len(history.grad_norms) == STEPS


def test_gd_equals_the_hand_written_loop_bit_for_bit():
    """The same arithmetic as θ.add_(∇L, alpha=−η), which is what SGD without momentum does."""
    model, data, _ = _run("gd")
    reference, _ = _problem()
    params = list(reference.parameters())
    for _ in range(STEPS):
        grads = torch.autograd.grad(nn.functional.cross_entropy(reference(data.x), data.y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=-LR)
    assert torch.equal(params_vector(model), params_vector(reference))


def test_flooding_run_equals_flooding_step_iterations():
    steps = 40
    model, data, history = _run("flooding", steps=steps)
    reference, _ = _problem()
    losses = [float(flooding_step(lambda: nn.functional.cross_entropy(reference(data.x), data.y),
                                  reference.parameters(), lr=LR, b=B)) for _ in range(steps)]
    crossings = find_crossings(losses, B)
    assert crossings.up and crossings.down  # the run does ascend and descend
    assert history.losses == losses
    assert torch.equal(params_vector(model), params_vector(reference))


@pytest.mark.parametrize("method", METHODS)
def test_gr_run_equals_gr_grad_and_a_manual_update(method):
    model, data, history = _run(method)
    reference, _ = _problem()
    params = list(reference.parameters())
    eps = None if method == "double" else LR
    losses = []
    for _ in range(STEPS):
        loss = gr.gr_grad(lambda: nn.functional.cross_entropy(reference(data.x), data.y), params, gamma=LR,
                          eps=eps, method=method)
        losses.append(float(loss))
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-LR)
    assert history.losses == losses and history.grad_norms == []
    assert torch.equal(params_vector(model), params_vector(reference))


def test_forward_run_is_f_gr_by_its_formula():
    """One F-GR step, θ − η[(1 − γ/ε) g + (γ/ε) ∇L(θ + ε g)] with γ ≠ ε, written out with torch.func."""
    gamma, eps = 0.1, 0.4
    model, data, _ = _run("forward", steps=1, gamma=gamma, eps=eps)
    reference, _ = _problem()
    loss = loss_of_flat(reference, data.x, data.y)
    theta = params_vector(reference)
    g = grad(loss)(theta)
    expected = theta - LR * ((1 - gamma / eps) * g + gamma / eps * grad(loss)(theta + eps * g))
    assert float((params_vector(model) - expected).norm() / (expected - theta).norm()) <= 1e-12


def test_grad_norms_are_the_norms_of_the_plain_gradient():
    for method in ("gd", "flooding"):
        _, data, history = _run(method, steps=4)
        reference, _ = _problem()
        loss = loss_of_flat(reference, data.x, data.y)
        theta = params_vector(reference)
        g = grad(loss)(theta)
        assert history.grad_norms[0] == pytest.approx(float(g.norm()), rel=1e-12)


# ------------------------------------------------------------------------------------------- measurements


def test_measurements_equal_direct_calls():
    """Loss, ‖∇L‖, the warm-started sharpness and the test accuracy at steps 0, 5, 10 and 12 (the end)."""
    _, data, history = _run("gd", measure_every=5, sharpness_iters=4, sharpness_tol=1e-3)
    assert history.step == [0, 5, 10, 12]
    reference, _ = _problem()
    params = list(reference.parameters())
    closure = lambda: nn.functional.cross_entropy(reference(data.x), data.y)  # noqa: E731
    vector = None
    for t in range(STEPS + 1):
        if t in history.step:
            i = history.step.index(t)
            grads = torch.autograd.grad(closure(), params)
            top = top_eigenvalue(closure, params, iters=4, tol=1e-3, seed=t, v0=vector)
            vector = top.vector
            assert history.loss[i] == float(closure().detach())
            assert history.grad_norm[i] == pytest.approx(float(torch.cat([g.flatten() for g in grads]).norm()),
                                                         rel=1e-14)
            assert history.sharpness[i] == top.value
            assert history.test_accuracy[i] == evaluate(reference, data.x_test, data.y_test)[1]
        if t < STEPS:
            grads = torch.autograd.grad(closure(), params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(g, alpha=-LR)
    assert history.loss[0] == history.losses[0]


def test_measured_sharpness_is_the_top_hessian_eigenvalue():
    """A converged measurement equals the largest eigenvalue of the Hessian formed by torch.func."""
    model, data = _problem(width=8)
    measure = Measurer(model, data, nn.functional.cross_entropy, iters=500, tol=1e-12)
    hessian = torch.func.hessian(loss_of_flat(model, data.x, data.y))(params_vector(model))
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert eigenvalues[-1] > abs(eigenvalues[0])  # the top eigenvalue is the largest in magnitude here
    assert measure(0)["sharpness"] == pytest.approx(float(eigenvalues[-1]), rel=1e-8)


def test_measure_every_none_measures_nothing_and_leaves_the_trajectory_alone():
    model_a, _, quiet = _run("gd")
    model_b, _, measured = _run("gd", measure_every=3)
    assert quiet.step == [] and quiet.sharpness == []
    assert torch.equal(params_vector(model_a), params_vector(model_b)) and quiet.losses == measured.losses


# ---------------------------------------------------------------------------------------------- crossings


def test_flooding_run_keeps_the_first_crossings_of_each_kind():
    model, data = _problem(n=128, width=32)
    history = full_batch_run(model, data, method="flooding", lr=0.5, b=1.0, steps=400, measure_every=None,
                             keep_crossings=3)
    found = find_crossings(history.losses, 1.0)
    assert len(found.up) >= 3 and len(found.down) >= 3
    kept = {kind: [c.t for c in history.crossings if c.kind == kind] for kind in ("up", "down")}
    assert kept["up"] == found.up[:3] and kept["down"] == found.down[:3]


# ---------------------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="sgd"), ValueError, "method must be one of 'gd', 'flooding', 'forward'"),
    (dict(method="fgr"), ValueError, "method must be one of"),
    (dict(lr=0.0), ValueError, "lr must be a finite number > 0"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number > 0"),
    (dict(steps=-1), ValueError, "steps must be an integer >= 0"),
    (dict(steps=2.0), TypeError, "steps must be an integer >= 0"),
    (dict(method="flooding"), ValueError, "needs the flood level b"),
    (dict(method="flooding", b=-0.1), ValueError, "flood level"),
    (dict(b=0.1), ValueError, "applies to method='flooding' only"),
    (dict(gamma=0.1, eps=0.1), ValueError, "gamma and eps apply to the GR methods"),
    (dict(method="forward"), ValueError, "needs gamma"),
    (dict(method="forward", gamma=0.1), ValueError, "eps"),
    (dict(method="forward", gamma=-0.1, eps=0.1), ValueError, "gamma"),
    (dict(measure_every=0), ValueError, "measure_every must be an integer >= 1"),
    (dict(sharpness_iters=0), ValueError, "sharpness_iters must be an integer >= 1"),
    (dict(sharpness_tol=0.0), ValueError, "sharpness_tol must be a finite number > 0"),
    (dict(method="flooding", b=1.0, keep_crossings=-1), ValueError, "keep_crossings must be an integer >= 0"),
    (dict(method="flooding", b=1.0, keep_crossings=2, crossing_stride=0), ValueError, "crossing_stride"),
    (dict(keep_crossings=2), ValueError, "keep_crossings applies to method='flooding' only"),
])
def test_full_batch_run_rejects_bad_arguments_before_training(kwargs, error, match):
    model, data = _problem()
    before = params_vector(model)
    with pytest.raises(error, match=match):
        full_batch_run(model, data, **{"method": "gd", "lr": 0.1, "steps": 2, **kwargs})
    assert torch.equal(params_vector(model), before)


def test_zero_steps_measure_once_and_change_nothing():
    model, data = _problem()
    before = params_vector(model)
    history = full_batch_run(model, data, method="flooding", lr=0.1, b=0.5, steps=0, keep_crossings=2,
                             sharpness_iters=2)
    assert history.step == [0] and history.losses == [] and history.crossings == []
    assert torch.equal(params_vector(model), before)


# ------------------------------------------------------------------------------------------------ at_loss


def test_at_loss_interpolates_log_log_at_the_last_fall_through_the_level():
    """On v = 3 L^1.5 the log-log interpolation is exact; an earlier fall through the level is ignored."""
    losses = [2.0, 0.05, 0.5, 0.2, 0.08, 0.01]  # falls through 0.1 at i = 0 and (last) at i = 3
    history = FullBatchHistory(method="gd", lr=1.0, loss=losses, grad_norm=[3 * v**1.5 for v in losses])
    assert at_loss(history, 0.1, "grad_norm") == pytest.approx(3 * 0.1**1.5, rel=1e-12)
    history.grad_norm[1] = 123.0  # the first fall (i = 0 → 1) must not be used
    assert at_loss(history, 0.1, "grad_norm") == pytest.approx(3 * 0.1**1.5, rel=1e-12)
    with pytest.raises(ValueError, match="never falls"):
        at_loss(history, 1e-4, "grad_norm")
    with pytest.raises(ValueError, match="level must be a finite number > 0"):
        at_loss(history, 0.0, "grad_norm")
    with pytest.raises(ValueError, match="key must be"):
        at_loss(history, 0.1, "losses")


def test_at_loss_reads_the_per_step_gradient_norms_against_the_per_step_losses():
    losses = [2.0, 0.5, 0.2, 0.08, 0.01]
    history = FullBatchHistory(method="gd", lr=1.0, losses=losses, grad_norms=[0.5 * v**0.5 for v in losses],
                               loss=[2.0, 0.01], grad_norm=[9.0, 9.0])
    assert at_loss(history, 0.1, "grad_norms") == pytest.approx(0.5 * 0.1**0.5, rel=1e-12)
    assert at_loss(history, 0.1, "grad_norm") == pytest.approx(9.0, rel=1e-12)  # the measured series
    with pytest.raises(ValueError, match="never falls"):
        at_loss(FullBatchHistory(method="forward", lr=1.0, losses=losses), 0.1, "grad_norms")  # no per-step norms
