"""Tests of gradreg.dln against independent references: quadrature, scipy's constrained optimizers, linprog in a
second formulation, lstsq, torch double backprop in float64, and the identities derived in Chapter 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import linprog, minimize

from gradreg import dln

FD_METHODS = [("double", 0.1, None), ("forward", 0.1, 0.1), ("backward", 0.1, 0.1)]


@pytest.fixture(scope="module")
def data() -> dln.SparseRegression:
    return dln.make_sparse_regression(n=10, d=20, k=2, seed=3, n_test=200)


# ------------------------------------------------------------------------------------------------- data


def test_sparse_regression_is_k_sparse_noiseless_and_seeded():
    a = dln.make_sparse_regression(n=8, d=15, k=3, seed=1, n_test=50)
    b = dln.make_sparse_regression(n=8, d=15, k=3, seed=1, n_test=50)
    c = dln.make_sparse_regression(n=8, d=15, k=3, seed=2, n_test=50)
    assert a.X.shape == (8, 15) and a.X_test.shape == (50, 15)
    assert np.count_nonzero(a.beta_star) == 3 and np.isclose(np.linalg.norm(a.beta_star), 1.0)
    np.testing.assert_allclose(a.y, a.X @ a.beta_star, rtol=0, atol=1e-14)
    assert a.test_loss(a.beta_star) < 1e-30 and a.train_loss(np.zeros(15)) > 0
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.allclose(a.X, c.X)


def test_andriushchenko_flammarion_data_leaves_the_global_rng_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    data = dln.andriushchenko_flammarion_data()
    assert np.random.rand() == expected
    assert data.X.shape == (20, 30) and data.X_test.shape == (1000, 30)
    assert np.all(data.beta_star[:3] > 0) and np.all(data.beta_star[3:] == 0)
    np.testing.assert_array_equal(data.X, dln.andriushchenko_flammarion_data().X)


# ----------------------------------------------------------------------------------------------- theory


def test_q_potential_is_the_integral_of_arcsinh():
    """Q_alpha(beta) = sum_i int_0^beta_i arcsinh(s / (2 alpha_i^2)) ds, since q(0) = 0, q'(z) = arcsinh(z/2)."""
    rng = np.random.default_rng(0)
    beta, alpha = 3 * rng.standard_normal(6), rng.uniform(0.1, 2.0, 6)
    expected = sum(quad(lambda s, a=a: np.arcsinh(s / (2 * a * a)), 0, b, epsabs=1e-13)[0] for b, a in zip(beta, alpha))
    assert dln.q_potential(beta, alpha) == pytest.approx(expected, rel=1e-10)
    assert dln.q_potential(beta, 1e3) == pytest.approx(beta @ beta / (4 * 1e6), rel=1e-6)  # kernel limit


def test_argmin_q_satisfies_kkt_and_matches_scipy(data):
    X, y = data.X, data.y
    alpha = np.random.default_rng(1).uniform(0.05, 0.5, X.shape[1])  # one alpha per coordinate
    beta = dln.argmin_q(X, y, alpha)
    assert np.abs(X @ beta - y).max() < 1e-12
    z = np.arcsinh(beta / (2 * alpha**2))  # stationarity: grad Q(beta) = X^T lam lies in the row space of X
    assert np.linalg.norm(z - np.linalg.pinv(X) @ (X @ z)) < 1e-9 * np.linalg.norm(z)
    res = minimize(lambda b: dln.q_potential(b, alpha), dln.min_l2_interpolant(X, y), method="SLSQP",
                   jac=lambda b: np.arcsinh(b / (2 * alpha**2)),
                   constraints={"type": "eq", "fun": lambda b: X @ b - y, "jac": lambda b: X},
                   options={"ftol": 1e-15, "maxiter": 2000})
    assert res.success
    assert np.abs(res.x - beta).max() < 1e-5
    assert dln.q_potential(beta, alpha) <= dln.q_potential(res.x, alpha) + 1e-12


def test_l1_interpolant_matches_a_second_linear_program(data):
    X, y = data.X, data.y
    d = X.shape[1]
    # min sum t  s.t.  -t <= beta <= t,  X beta = y   (variables [beta, t])
    eye = np.eye(d)
    res = linprog(np.r_[np.zeros(d), np.ones(d)], A_ub=np.block([[eye, -eye], [-eye, -eye]]), b_ub=np.zeros(2 * d),
                  A_eq=np.hstack([X, np.zeros_like(X)]), b_eq=y, bounds=[(None, None)] * d + [(0, None)] * d)
    np.testing.assert_allclose(dln.l1_interpolant(X, y), res.x[:d], atol=1e-7)


def test_small_alpha_gives_l1_and_large_alpha_gives_min_l2(data):
    X, y = data.X, data.y
    l1, l2 = dln.l1_interpolant(X, y), np.linalg.pinv(X) @ y
    assert np.abs(dln.argmin_q(X, y, 1e-10) - l1).max() < 1e-8
    assert np.abs(dln.argmin_q(X, y, 1e-2) - l1).max() > 1e-4  # the limit is approached, not already there
    assert np.abs(dln.argmin_q(X, y, 1e2) - l2).max() < 1e-8
    assert np.abs(dln.min_l2_interpolant(X, y) - l2).max() < 1e-12


# ----------------------------------------------------------------------------------- update directions


def _torch_directions(u, v, X, y, method, gamma, eps, per_sample, form):
    """The same directions by autograd (float64): losses L_j of theta, DB by double backprop, FD by two passes."""
    X, y = torch.tensor(X), torch.tensor(y)
    groups = [(X[j:j + 1], y[j:j + 1]) for j in range(len(y))] if per_sample else [(X, y)]

    def beta(p):
        return p[0] ** 2 - p[1] ** 2 if form == "pm" else p[0] * p[1]

    def group_loss(p, Xj, yj):
        return ((Xj @ beta(p) - yj) ** 2).sum() / (2 * len(yj))

    def grad(p, Xj, yj, create_graph=False):
        p = p.detach().requires_grad_(True) if not create_graph else p
        return torch.autograd.grad(group_loss(p, Xj, yj), p, create_graph=create_graph)[0]

    p = torch.tensor(np.stack([u, v]))
    total = torch.zeros_like(p)
    for Xj, yj in groups:
        g = grad(p, Xj, yj)
        if method == "gd":
            total += g
        elif method == "double":
            q = p.clone().requires_grad_(True)
            gq = grad(q, Xj, yj, create_graph=True)
            total += torch.autograd.grad(group_loss(q, Xj, yj) + gamma / 2 * (gq**2).sum(), q)[0]
        else:
            s = eps if method == "forward" else -eps
            total += (1 - gamma / s) * g + gamma / s * grad(p + s * g, Xj, yj)
    total /= len(groups)
    return total[0].numpy(), total[1].numpy()


@pytest.mark.parametrize("form", ["pm", "uv"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize(("method", "gamma", "eps"), [("gd", 0.0, None), *FD_METHODS])
def test_directions_match_torch_autograd(data, method, gamma, eps, per_sample, form):
    rng = np.random.default_rng(7)
    u, v = rng.uniform(0.2, 1.0, 20), rng.uniform(0.2, 1.0, 20)
    du, dv, _ = dln.gr_direction(u, v, data.X, data.y, method, gamma, eps, per_sample=per_sample, form=form)
    tu, tv = _torch_directions(u, v, data.X, data.y, method, gamma, eps, per_sample, form)
    scale = np.abs(np.r_[tu, tv]).max()
    assert np.abs(np.r_[du - tu, dv - tv]).max() < 1e-12 * scale


@pytest.mark.parametrize("form", ["pm", "uv"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize(("method", "gamma", "eps"), [("gd", 0.0, None), *FD_METHODS])
def test_a_batch_of_states_gives_the_same_directions_as_one_at_a_time(data, method, gamma, eps, per_sample, form):
    rng = np.random.default_rng(10)
    U, V = rng.uniform(0.2, 1.0, (4, 20)), rng.uniform(0.2, 1.0, (4, 20))
    batch = dln.gr_direction(U, V, data.X, data.y, method, gamma, eps, per_sample=per_sample, form=form)
    for k in range(4):
        single = dln.gr_direction(U[k], V[k], data.X, data.y, method, gamma, eps, per_sample=per_sample, form=form)
        for got, want in zip(batch, single):
            np.testing.assert_allclose(got[k], want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("per_sample", [False, True])
def test_double_direction_is_the_gradient_of_the_gr_objective(data, per_sample):
    rng = np.random.default_rng(8)
    u, v = rng.uniform(0.2, 1.0, 20), rng.uniform(0.2, 1.0, 20)
    du, dv, _ = dln.gr_direction(u, v, data.X, data.y, "double", 0.3, per_sample=per_sample)
    h = 1e-6
    for i in (0, 7, 19):
        e = np.zeros(20)
        e[i] = h
        f = lambda uu, vv: dln.gr_objective(uu, vv, data.X, data.y, 0.3, per_sample=per_sample)  # noqa: E731
        assert (f(u + e, v) - f(u - e, v)) / (2 * h) == pytest.approx(du[i], rel=1e-6)
        assert (f(u, v + e) - f(u, v - e)) / (2 * h) == pytest.approx(dv[i], rel=1e-6)


@pytest.mark.parametrize("per_sample", [False, True])
def test_finite_differences_converge_to_double_backprop(data, per_sample):
    """F-GR and B-GR differ from DB by O(eps) with opposite signs, so their mean (central) by O(eps^2)."""
    rng = np.random.default_rng(9)
    u, v = rng.uniform(0.2, 1.0, 20), rng.uniform(0.2, 1.0, 20)
    args = (u, v, data.X, data.y)
    db = np.r_[dln.gr_direction(*args, "double", 0.1, per_sample=per_sample)[:2]]
    errors, central = [], []
    for eps in (1e-3, 1e-4):
        f = np.r_[dln.gr_direction(*args, "forward", 0.1, eps, per_sample=per_sample)[:2]]
        b = np.r_[dln.gr_direction(*args, "backward", 0.1, eps, per_sample=per_sample)[:2]]
        errors.append(np.abs(f - db).max())
        central.append(np.abs((f + b) / 2 - db).max())
    assert 8 < errors[0] / errors[1] < 12  # first order
    assert central[0] / central[1] > 50  # second order (floor: round-off)


def test_method_arguments_are_checked(data):
    u, v = dln.dln_init(0.1, 20)
    with pytest.raises(ValueError, match="eps > 0"):
        dln.gr_direction(u, v, data.X, data.y, "backward", 0.1, -0.1)
    with pytest.raises(ValueError, match="method"):
        dln.gr_direction(u, v, data.X, data.y, "central", 0.1, 0.1)
    gd = dln.gr_direction(u, v, data.X, data.y, "gd")
    for got, want in zip(dln.gr_direction(u, v, data.X, data.y, "double", 0.0), gd):
        np.testing.assert_array_equal(got, want)  # gamma = 0 is plain GD


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize(("method", "gamma", "eps"), [("gd", 0.0, None), *FD_METHODS])
def test_uv_form_is_pm_form_with_halved_constants(data, method, gamma, eps, per_sample):
    """With a = (u+v)/2, b = (u-v)/2: u*v = a^2 - b^2, and GD on (u, v) with (alpha, gamma, eps, lr) is GD on
    (a, b) with (alpha/2, gamma/2, eps/2, lr/2) (derived in Chapter 3)."""
    kw = {"steps": 300, "per_sample": per_sample}
    uv = dln.gradient_descent(data.X, data.y, 0.3, method, gamma, eps, lr=0.02, form="uv", **kw)
    pm = dln.gradient_descent(data.X, data.y, 0.15, method, gamma / 2, None if eps is None else eps / 2, lr=0.01,
                              form="pm", **kw)
    assert np.abs(uv.beta - pm.beta).max() < 1e-12
    assert np.abs(uv.beta).max() > 0.1  # it moved
    np.testing.assert_allclose(uv.alpha_eff, pm.alpha_eff, rtol=1e-10)


# ---------------------------------------------------------------------------------------------- flows


@pytest.fixture(scope="module")
def flows(data) -> dict:
    """Exact flows at alpha = 0.1, full-batch and per-sample, computed once for the tests below."""
    runs = {("gd", False): dln.gradient_flow(data.X, data.y, 0.1)}
    for method, gamma, eps in FD_METHODS:
        for per_sample in (False, True):
            runs[method, per_sample] = dln.gradient_flow(data.X, data.y, 0.1, method, gamma, eps,
                                                         per_sample=per_sample)
    return runs


def test_gradient_flow_converges_to_argmin_q(data, flows):
    run = flows["gd", False]
    assert run.info["converged"] and run.train_loss[-1] < 1e-25
    assert np.abs(run.beta - dln.argmin_q(data.X, data.y, 0.1)).max() < 1e-8
    np.testing.assert_allclose(run.alpha_eff, 0.1)


def test_uv_gradient_flow_converges_to_argmin_q_at_half_alpha(data):
    run = dln.gradient_flow(data.X, data.y, 0.2, form="uv")
    assert np.abs(run.beta - dln.argmin_q(data.X, data.y, 0.1)).max() < 1e-8


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("method", ["double", "forward", "backward"])
def test_gr_flow_converges_to_argmin_q_of_alpha_eff(data, flows, method, per_sample):
    run = flows[method, per_sample]
    assert run.info["converged"]
    assert np.abs(run.beta - dln.argmin_q(data.X, data.y, run.alpha_eff)).max() < 1e-6
    assert not np.allclose(run.alpha_eff, 0.1, rtol=1e-3)  # GR did change the implicit bias
    # the accumulated integral agrees with the state: alpha_eff = sqrt(u v) (checks the constant 4)
    np.testing.assert_allclose(run.alpha_eff, dln.alpha_from_balance(run.u, run.v), rtol=1e-8)


@pytest.mark.parametrize("per_sample", [False, True])
def test_a_wrong_constant_in_alpha_eff_is_detected(data, flows, per_sample):
    run = flows["forward", per_sample]
    log_ratio = np.log(run.alpha_eff / 0.1)  # = -4 gamma H
    for factor in (0.5, 2.0):  # constants 2 and 8 instead of 4
        wrong = dln.argmin_q(data.X, data.y, 0.1 * np.exp(factor * log_ratio))
        assert np.abs(run.beta - wrong).max() > 1e-4


@pytest.mark.parametrize("per_sample", [False, True])
def test_alpha_eff_ordering(flows, per_sample):
    """F-GR < DB-GR < B-GR < alpha (geometric means) at gamma = eps = 0.1, alpha = 0.1."""
    f, db, b = (flows[m, per_sample].alpha_eff_gmean for m in ("forward", "double", "backward"))
    assert f < db < b < 0.1


def test_uv_gr_flow_alpha_eff(data):
    run = dln.gradient_flow(data.X, data.y, 0.2, "forward", 0.1, 0.1, per_sample=True, form="uv")
    assert np.abs(run.beta - dln.argmin_q(data.X, data.y, run.alpha_eff)).max() < 1e-6
    np.testing.assert_allclose(run.alpha_eff, dln.alpha_from_balance(run.u, run.v, "uv"), rtol=1e-8)


def test_sweep_reproduces_single_runs_and_checks_its_grid(data, flows):
    sw = dln.sweep(data, "forward", alpha=0.1, gamma=0.1, eps=[0.1], per_sample=True)
    single = flows["forward", True]
    assert sw.name == "eps" and sw.values.tolist() == [0.1]
    assert sw.test_loss[0] == pytest.approx(data.test_loss(single.beta), rel=1e-5)
    assert sw.alpha_eff[0] == pytest.approx(single.alpha_eff_gmean, rel=1e-6)
    assert sw.theory_gap[0] < 1e-6
    with pytest.raises(ValueError, match="exactly one"):
        dln.sweep(data, "forward", alpha=[0.1], gamma=[0.1], eps=0.1)
