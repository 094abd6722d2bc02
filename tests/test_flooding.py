"""Flooding: the flooded losses, the crossing finder, the two-step identity and the full-batch runner, against
references computed independently with torch.func."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import gradreg as gr
from gradreg.data import Dataset
from gradreg.flooding import (
    Crossing,
    CrossingRecorder,
    FullBatchHistory,
    at_loss,
    find_crossings,
    flooded,
    flooding_gd,
    flooding_step,
    full_batch_run,
    two_step_identity,
)


def _problem(seed: int = 0, n: int = 64, width: int = 16):
    """A ReLU MLP on random 10-class data, float64, full batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(seed)
    model = gr.models.mlp(8, width, 3, 10).double()
    return model, x, y


def _grad_at(model, x, y, flat: torch.Tensor, loss=nn.functional.cross_entropy) -> torch.Tensor:
    """∇L at the flattened parameters ``flat``, by torch.func (independent of gradreg)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    chunks = torch.split(flat, [math.prod(s) for s in shapes])
    params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
    out = grad(lambda p: loss(functional_call(model, p, (x,)), y))(params)
    return torch.cat([out[n].reshape(-1) for n in names])


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


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


def test_flooded_rejects_bad_input():
    with pytest.raises(ValueError, match="per-example"):
        flooded(torch.ones(2, 2), 0.1)
    with pytest.raises(TypeError, match="finite"):
        flooded(torch.ones(()), float("nan"))


def test_flooded_loss_works_inside_gr():
    """GR's F-GR direction on the flooded loss is (1 − γ/ε)∇F(θ) + (γ/ε)∇F(θ + ε∇F(θ)) (torch.func)."""
    model, x, y = _problem()
    b, gamma, eps = 2.5, 0.05, 0.1

    def flood_loss(out, target):
        return flooded(nn.functional.cross_entropy(out, target), b)

    theta = _flat(model)
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
    theta = _flat(model)
    g = _grad_at(model, x, y, theta)
    loss0 = float(nn.functional.cross_entropy(model(x), y).detach())
    for b, sign in [(loss0 + 1, 1.0), (loss0 - 1, -1.0)]:
        _load(model.parameters(), theta)
        out = flooding_step(lambda: nn.functional.cross_entropy(model(x), y), list(model.parameters()), lr=0.3, b=b)
        assert float(out) == loss0
        assert torch.allclose(_flat(model), theta + sign * 0.3 * g, rtol=0, atol=1e-14)


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
    """Flooding GD on a ReLU MLP in float64 until the loss oscillates around b."""
    model, x, y = _problem(n=128, width=32)
    closure = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    trajectory = flooding_gd(closure, list(model.parameters()), lr=0.5, b=1.0, steps=400, keep=3)
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
    saved = _flat(model)
    for crossing in trajectory.crossings:
        err = two_step_identity(closure, list(model.parameters()), crossing, lr=lr)
        assert err.change <= 1e-12 and err.params <= 1e-15 and err.change <= 4 * err.floor
        assert torch.equal(_flat(model), saved)  # parameters restored
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
    saved = _flat(model)
    _load(params, crossing.theta_t)
    half = len(x) // 2
    first = lambda: nn.functional.cross_entropy(model(x[:half]), y[:half])  # noqa: E731
    second = lambda: nn.functional.cross_entropy(model(x[half:]), y[half:])  # noqa: E731
    flooding_step(first, params, lr=trajectory.lr, b=1e9)  # ascent on batch 1 (L < b)
    flooding_step(second, params, lr=trajectory.lr, b=-1e9)  # descent on batch 2 (L > b)
    mixed = Crossing(crossing.t, "up", crossing.theta_t, _flat(model))
    _load(params, saved)
    assert two_step_identity(first, params, mixed, lr=trajectory.lr).change > 1e-2


# --------------------------------------------------------------------------------------- full-batch runner


def _data(x, y) -> Dataset:
    return Dataset(x, y, x[:16], y[:16], 10)


def test_full_batch_run_matches_its_definitions():
    """gd = the plain loop; flooding = flooding_gd; fgr with γ = ε = η = unnormalized SAM (GR.usam)."""
    lr, steps = 0.3, 12
    runs = {}
    for method in ("gd", "flooding", "fgr"):
        model, x, y = _problem()
        runs[method] = (model, full_batch_run(model, _data(x, y), method=method, lr=lr, steps=steps, b=2.2,
                                              gamma=lr, eps=lr, measure_every=5, sharpness_iters=3))
    model, x, y = _problem()
    params = list(model.parameters())
    for _ in range(steps):
        g = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(gi, alpha=-lr)
    assert torch.equal(_flat(model), _flat(runs["gd"][0]))

    model, x, y = _problem()
    traj = flooding_gd(lambda: nn.functional.cross_entropy(model(x), y), list(model.parameters()), lr=lr, b=2.2,
                       steps=steps, keep=0)
    assert traj.losses == runs["flooding"][1].losses
    assert torch.equal(_flat(model), _flat(runs["flooding"][0]))

    model, x, y = _problem()
    opt = gr.GR.usam(torch.optim.SGD(model.parameters(), lr=lr), rho=lr)
    for _ in range(steps):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    assert torch.equal(_flat(model), _flat(runs["fgr"][0]))

    history = runs["gd"][1]
    assert history.step == [0, 5, 10, 12] and len(history.losses) == len(history.grad_norms) == steps
    assert runs["flooding"][1].grad_norms == traj.grad_norms and runs["fgr"][1].grad_norms == []
    model, x, y = _problem()
    g0 = _grad_at(model, x, y, _flat(model))
    assert history.grad_norm[0] == pytest.approx(float(g0.norm()), rel=1e-12)
    assert history.loss[0] == history.losses[0]


def test_full_batch_run_rejects_missing_settings():
    model, x, y = _problem()
    with pytest.raises(ValueError, match="flood level"):
        full_batch_run(model, _data(x, y), method="flooding", lr=0.1, steps=1)
    with pytest.raises(ValueError, match="gamma and eps"):
        full_batch_run(model, _data(x, y), method="fgr", lr=0.1, steps=1)
    with pytest.raises(ValueError, match="method"):
        full_batch_run(model, _data(x, y), method="sam", lr=0.1, steps=1)


def test_at_loss_interpolates_log_log_at_the_last_fall_through_the_level():
    """On v = 3 L^1.5 the log-log interpolation is exact; an earlier fall through the level is ignored."""
    losses = [2.0, 0.05, 0.5, 0.2, 0.08, 0.01]  # falls through 0.1 at i = 0 and (last) at i = 3
    history = FullBatchHistory(method="gd", lr=1.0, loss=losses, grad_norm=[3 * v**1.5 for v in losses])
    assert at_loss(history, 0.1, "grad_norm") == pytest.approx(3 * 0.1**1.5, rel=1e-12)
    history.grad_norm[1] = 123.0  # the first fall (i = 0 → 1) must not be used
    assert at_loss(history, 0.1, "grad_norm") == pytest.approx(3 * 0.1**1.5, rel=1e-12)
    with pytest.raises(ValueError, match="never falls"):
        at_loss(history, 1e-4, "grad_norm")
