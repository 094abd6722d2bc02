"""Flooding: the flooded losses, the step, the crossing finder and recorder, the two-step identity, against
references computed independently with torch.func; and every argument check."""

from __future__ import annotations

import pytest
import torch
from helpers import loss_of_flat, params_vector, relu_problem
from torch import nn
from torch.func import grad

import gradreg as gr
from gradreg.data import Dataset
from gradreg.experiments.full_batch import full_batch_run
from gradreg.flooding import (
    Crossing,
    CrossingRecorder,
    find_crossings,
    flat,
    flooded,
    flooding_step,
    load_flat,
    two_step_identity,
)

_problem = relu_problem


def _grad_at(model, x, y, flat: torch.Tensor, loss=nn.functional.cross_entropy) -> torch.Tensor:
    """∇L at the flattened parameters ``flat``, by torch.func (independent of gradreg)."""
    return grad(loss_of_flat(model, x, y, loss))(flat)


def _load(params, flat: torch.Tensor) -> None:
    """Copy ``flat`` into the parameters (vector_to_parameters would make them share its memory)."""
    torch.nn.utils.vector_to_parameters(flat.clone(), params)


# ------------------------------------------------------------------------------------------- flooded losses


def test_flooded_scalar_value_and_gradient():
    w = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    for b, sign in [(2.0, -1.0), (0.5, 1.0)]:  # L(w) = ‖w‖² = 1.25: below b = 2 (ascent), above b = 0.5
        out = flooded((w**2).sum(), b)
        assert float(out.detach()) == pytest.approx(abs(1.25 - b) + b, abs=1e-15)
        (gw,) = torch.autograd.grad(out, w)
        assert torch.equal(gw, sign * 2 * w.detach())


def test_iflood_is_the_mean_of_per_example_flooded_losses():
    """Per-example flooding differs from batch flooding when some losses are below b and some above."""
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    losses = (x @ w) ** 2  # 1, 4, 9
    b = 3.0
    out = flooded(losses, b)
    assert float(out.detach()) == pytest.approx(((2 + 3) + (1 + 3) + (6 + 3)) / 3, abs=1e-14)
    (gw,) = torch.autograd.grad(out, w)
    # d/dw of sign(ℓ_i − b) ℓ_i: ℓ_1 below b ascends, ℓ_2 and ℓ_3 above b descend
    signs = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    expected = (signs[:, None] * 2 * (x @ w.detach())[:, None] * x).mean(0)
    assert torch.allclose(gw, expected, rtol=0, atol=1e-14)
    assert float(flooded(losses.mean(), b).detach()) == pytest.approx(abs(14 / 3 - 3) + 3)


def test_flooded_rejects_a_loss_of_the_wrong_shape():
    with pytest.raises(ValueError, match="per-example"):
        flooded(torch.ones(2, 2), 0.1)


def test_flooded_loss_works_inside_gr():
    """GR's F-GR direction on the flooded loss is (1 − γ/ε)∇F(θ) + (γ/ε)∇F(θ + ε∇F(θ)) (torch.func)."""
    model, x, y = _problem()
    b, gamma, eps = 2.5, 0.05, 0.1

    def flood_loss(out, target):
        return flooded(nn.functional.cross_entropy(out, target), b)

    theta = params_vector(model)
    g = _grad_at(model, x, y, theta, flood_loss)
    expected = (1 - gamma / eps) * g + gamma / eps * _grad_at(model, x, y, theta + eps * g, flood_loss)
    opt = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=gamma, eps=eps)
    opt.direction(lambda: flood_loss(model(x), y))
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert float((got - expected).norm() / expected.norm()) <= 1e-12


# ------------------------------------------------------------------------------------------------ crossings


def test_find_crossings():
    losses = [0.5, 0.05, 0.2, 0.1, 0.08, 0.1, 0.3, 0.01, 0.3]
    found = find_crossings(losses, 0.1)
    assert found.up == [1, 7] and found.down == [0, 6]  # touching b exactly (t = 2 … 5) crosses nothing
    assert find_crossings([], 0.1).up == [] and find_crossings([0.2], 0.1).down == []


def test_flooding_step_ascends_below_and_descends_above_b():
    model, x, y = _problem()
    theta = params_vector(model)
    g = _grad_at(model, x, y, theta)
    loss0 = float(nn.functional.cross_entropy(model(x), y).detach())
    for b, sign in [(loss0 + 1, 1.0), (loss0 - 1, -1.0)]:
        _load(model.parameters(), theta)
        out = flooding_step(lambda: nn.functional.cross_entropy(model(x), y), list(model.parameters()), lr=0.3, b=b)
        assert float(out) == loss0
        assert torch.allclose(params_vector(model), theta + sign * 0.3 * g, rtol=0, atol=1e-14)


def test_recorder_keeps_a_bounded_number_of_crossings_and_the_right_snapshots():
    rec = CrossingRecorder(b=0.0, keep=2)
    losses = [1, -1, 1, -1, 1, -1, 1, -1, 1]  # alternating: a crossing at every step
    for t, loss in enumerate(losses):
        rec.observe(t, loss, torch.tensor([float(t)]))
    kinds = [(c.t, c.kind) for c in rec.crossings]
    assert kinds == [(0, "down"), (1, "up"), (2, "down"), (3, "up")]
    assert all(float(c.theta_t) == c.t and float(c.theta_t2) == c.t + 2 for c in rec.crossings)
    with pytest.raises(ValueError, match="every step"):
        rec.observe(20, 1.0, torch.tensor([0.0]))


def test_recorder_stride_samples_every_kth_crossing_of_each_kind():
    rec = CrossingRecorder(b=0.0, keep=3, stride=2)
    for t in range(12):
        rec.observe(t, (-1) ** t, torch.tensor([float(t)]))  # down at even t, up at odd t
    assert [(c.t, c.kind) for c in rec.crossings] == [(0, "down"), (1, "up"), (4, "down"), (5, "up"), (8, "down"),
                                                       (9, "up")]


# ------------------------------------------------------------------------------------- the two-step identity


@pytest.fixture(scope="module")
def flooding_run():
    """Flooding GD on a ReLU MLP in float64 until the loss oscillates around b (the full-batch trainer)."""
    model, x, y = _problem(n=128, width=32)
    closure = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    trajectory = full_batch_run(model, Dataset(x, y, x[:8], y[:8], 10), method="flooding", lr=0.5, b=1.0,
                                steps=400, measure_every=None, keep_crossings=3)
    return model, x, y, closure, trajectory


def test_flooding_run_oscillates_around_b_and_keeps_the_first_crossings(flooding_run):
    *_, trajectory = flooding_run
    found = find_crossings(trajectory.losses, trajectory.b)
    assert len(found.up) >= 3 and len(found.down) >= 3
    kept = {kind: [c.t for c in trajectory.crossings if c.kind == kind] for kind in ("up", "down")}
    assert kept["up"] == found.up[:3] and kept["down"] == found.down[:3]


def test_two_step_identity_holds_to_round_off(flooding_run):
    """θ_{t+2} − θ_t = −η[∇L(θ_t + ηg) − g] (up) or −η[g − ∇L(θ_t − ηg)] (down), checked with torch.func."""
    model, x, y, closure, trajectory = flooding_run
    lr = trajectory.lr
    saved = params_vector(model)
    grads = [p.grad for p in model.parameters()]
    for crossing in trajectory.crossings:
        err = two_step_identity(closure, list(model.parameters()), crossing, lr=lr)
        assert err.change <= 1e-12 and err.params <= 1e-15 and err.change <= 4 * err.floor
        assert torch.equal(params_vector(model), saved)  # parameters restored
        assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # and .grad as it was
        # independent reference for the prediction
        g = _grad_at(model, x, y, crossing.theta_t)
        if crossing.kind == "up":
            predicted = -lr * (_grad_at(model, x, y, crossing.theta_t + lr * g) - g)
        else:
            predicted = -lr * (g - _grad_at(model, x, y, crossing.theta_t - lr * g))
        change = crossing.theta_t2 - crossing.theta_t
        assert float((change - predicted).norm() / change.norm()) <= 1e-12


def test_two_step_identity_detects_the_wrong_order(flooding_run):
    """Read an up-crossing as a down-crossing (B-GR instead of F-GR): the error is O(1), not round-off."""
    model, _, _, closure, trajectory = flooding_run
    crossing = next(c for c in trajectory.crossings if c.kind == "up")
    wrong = Crossing(crossing.t, "down", crossing.theta_t, crossing.theta_t2)
    assert two_step_identity(closure, list(model.parameters()), wrong, lr=trajectory.lr).change > 1e-3


def test_two_step_identity_needs_the_same_batch(flooding_run):
    """With a different batch in the second step the identity fails: the mini-batch gradients do not cancel."""
    model, x, y, closure, trajectory = flooding_run
    crossing = next(c for c in trajectory.crossings if c.kind == "up")
    params = list(model.parameters())
    saved = params_vector(model)
    _load(params, crossing.theta_t)
    half = len(x) // 2
    first = lambda: nn.functional.cross_entropy(model(x[:half]), y[:half])  # noqa: E731
    second = lambda: nn.functional.cross_entropy(model(x[half:]), y[half:])  # noqa: E731
    flooding_step(first, params, lr=trajectory.lr, b=1e9)  # ascent on batch 1 (L < b)
    flooding_step(second, params, lr=trajectory.lr, b=0.0)  # descent on batch 2 (L > 0 = b)
    mixed = Crossing(crossing.t, "up", crossing.theta_t, params_vector(model))
    _load(params, saved)
    assert two_step_identity(first, params, mixed, lr=trajectory.lr).change > 1e-2




# ------------------------------------------------------------------------------------------ flat and load


def test_flat_and_load_flat_round_trip_in_place():
    model, _, _ = _problem()
    params = list(model.parameters())
    storage = [p.data_ptr() for p in params]
    theta = flat(params)
    assert not theta.requires_grad and torch.equal(theta, params_vector(model))
    load_flat(params, 2 * theta)
    assert torch.equal(params_vector(model), 2 * theta)
    assert [p.data_ptr() for p in params] == storage  # copied in place, no aliasing of the vector
    with pytest.raises(ValueError, match="entries"):
        load_flat(params, theta[:-1])


# --------------------------------------------------------------------------- every argument checked up front


def _counting_closure(model, x, y):
    calls = []

    def closure():
        calls.append(1)
        return nn.functional.cross_entropy(model(x), y)

    return closure, calls


@pytest.mark.parametrize("b, error, match", [
    (-0.1, ValueError, ">= 0"),
    (float("nan"), ValueError, "finite"),
    (float("inf"), ValueError, "finite"),
    ("0.1", TypeError, "real number"),
    (True, TypeError, "real number"),
    (None, TypeError, "real number"),
])
def test_flooded_rejects_a_bad_flood_level(b, error, match):
    with pytest.raises(error, match=match):
        flooded(torch.ones(()), b)


def test_flooded_accepts_any_real_number():
    import fractions

    import numpy as np

    for b in (0, 1, np.float32(0.5), fractions.Fraction(1, 4)):
        assert float(flooded(torch.tensor(0.0, dtype=torch.float64), b)) == pytest.approx(2 * float(b))
    with pytest.raises(TypeError, match="tensor"):
        flooded(0.3, 0.1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=0.0), ValueError, "lr must be a finite number > 0"),
    (dict(lr=-0.1), ValueError, "lr must be a finite number > 0"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number > 0"),
    (dict(lr=float("inf")), ValueError, "lr must be a finite number > 0"),
    (dict(lr="0.1"), TypeError, "lr must be a real number"),
    (dict(b=-1.0), ValueError, "flood level"),
    (dict(b=float("nan")), ValueError, "flood level"),
])
def test_flooding_step_rejects_bad_numbers_before_any_work(kwargs, error, match):
    model, x, y = _problem()
    closure, calls = _counting_closure(model, x, y)
    before = params_vector(model)
    with pytest.raises(error, match=match):
        flooding_step(closure, model.parameters(), **{"lr": 0.1, "b": 0.5, **kwargs})
    assert calls == [] and torch.equal(params_vector(model), before)


def test_flooding_step_rejects_bad_params_and_closures():
    model, x, y = _problem()
    closure, calls = _counting_closure(model, x, y)
    weight = next(model.parameters())
    with pytest.raises(TypeError, match=r"single Tensor: pass \[tensor\]"):
        flooding_step(closure, weight, lr=0.1, b=0.5)
    with pytest.raises(TypeError, match="named_parameters"):
        flooding_step(closure, model.named_parameters(), lr=0.1, b=0.5)
    with pytest.raises(ValueError, match="no tensor requires grad"):
        flooding_step(closure, [], lr=0.1, b=0.5)
    with pytest.raises(TypeError, match="iterable"):
        flooding_step(closure, 3, lr=0.1, b=0.5)
    frozen = torch.zeros(3)  # requires_grad=False
    with pytest.raises(ValueError, match="no tensor requires grad"):
        flooding_step(closure, [frozen], lr=0.1, b=0.5)
    with pytest.raises(TypeError, match="closure must be a callable"):
        flooding_step(None, model.parameters(), lr=0.1, b=0.5)
    assert calls == []
    before = params_vector(model)
    with pytest.raises(ValueError, match="scalar"):
        flooding_step(lambda: nn.functional.cross_entropy(model(x), y, reduction="none"), model.parameters(),
                      lr=0.1, b=0.5)
    assert torch.equal(params_vector(model), before)


def test_flooding_step_skips_frozen_parameters():
    model, x, y = _problem()
    first = next(model.parameters())
    first.requires_grad_(False)
    before = first.detach().clone()
    flooding_step(lambda: nn.functional.cross_entropy(model(x), y), model.parameters(), lr=0.1, b=0.0)
    assert torch.equal(first, before)


@pytest.mark.parametrize("b", [-0.1, float("nan"), "x"])
def test_find_crossings_rejects_a_bad_flood_level(b):
    with pytest.raises((ValueError, TypeError), match="flood level"):
        find_crossings([1.0, 0.0], b)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(keep=0), ValueError, "keep must be an integer >= 1"),
    (dict(keep=1.5), TypeError, "keep must be an integer >= 1"),
    (dict(stride=0), ValueError, "stride must be an integer >= 1"),
    (dict(stride=None), TypeError, "stride must be an integer >= 1"),
    (dict(b=-1.0), ValueError, "flood level"),
])
def test_recorder_rejects_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        CrossingRecorder(**{"b": 0.1, **kwargs})


def test_recorder_observe_rejects_bad_calls():
    rec = CrossingRecorder(b=0.0)
    with pytest.raises(ValueError, match="t must be an integer >= 0"):
        rec.observe(-1, 1.0, torch.zeros(1))
    with pytest.raises(TypeError, match="flattened parameters"):
        rec.observe(0, 1.0, [0.0])
    rec.observe(0, 1.0, torch.zeros(1))
    with pytest.raises(ValueError, match="got t = 2 after t = 0"):
        rec.observe(2, 1.0, torch.zeros(1))


def test_two_step_identity_rejects_bad_input_before_any_work(flooding_run):
    model, x, y, _, trajectory = flooding_run
    closure, calls = _counting_closure(model, x, y)
    crossing = trajectory.crossings[0]
    params = list(model.parameters())
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        two_step_identity(closure, params, crossing, lr=0.0)
    with pytest.raises(TypeError, match="Crossing"):
        two_step_identity(closure, params, (crossing.t, crossing.kind), lr=0.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        two_step_identity(closure, params, Crossing(0, "sideways", crossing.theta_t, crossing.theta_t2), lr=0.5)
    with pytest.raises(ValueError, match="vector of"):
        two_step_identity(closure, params, Crossing(0, "up", crossing.theta_t[:-1], crossing.theta_t2), lr=0.5)
    with pytest.raises(TypeError, match="closure"):
        two_step_identity("loss", params, crossing, lr=0.5)
    assert calls == []


def test_flooding_step_and_the_identity_refuse_a_parameter_listed_twice():
    """[w, w] would take a double step."""
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    closure = lambda: (w ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="appears twice"):
        flooding_step(closure, [w, w], lr=0.1, b=0.0)
    assert w.tolist() == [1.0, -2.0]
    crossing = gr.flooding.Crossing(0, "up", torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="appears twice"):
        gr.flooding.two_step_identity(closure, [w, w], crossing, lr=0.1)
