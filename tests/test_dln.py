"""Tests of gradreg.dln against independent references: quadrature, scipy's constrained optimizers, linprog in a
second formulation, lstsq, torch double backprop in float64, and the identities derived in Chapter 3."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import linprog, minimize

from gradreg import dln

FD_METHODS = [("double", 0.1, None), ("forward", 0.1, 0.1), ("backward", 0.1, 0.1), ("central", 0.1, 0.1)]


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
    """The same directions by autograd (float64): losses L_j of theta, DB by double backprop, each finite
    difference by its defining formula with autograd gradients."""
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
        elif method == "forward":  # (1 - gamma/eps) g + gamma/eps grad L(theta + eps g)
            total += (1 - gamma / eps) * g + gamma / eps * grad(p + eps * g, Xj, yj)
        elif method == "backward":  # (1 + gamma/eps) g - gamma/eps grad L(theta - eps g)
            total += (1 + gamma / eps) * g - gamma / eps * grad(p - eps * g, Xj, yj)
        else:  # central: g + gamma/(2 eps) [grad L(theta + eps g) - grad L(theta - eps g)]
            total += g + gamma / (2 * eps) * (grad(p + eps * g, Xj, yj) - grad(p - eps * g, Xj, yj))
    total /= len(groups)
    return total[0].numpy(), total[1].numpy()


@pytest.mark.parametrize("form", ["pm", "uv"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize(("method", "gamma", "eps"), [("gd", 0.0, None), *FD_METHODS])
def test_directions_match_torch_autograd(data, method, gamma, eps, per_sample, form):
    rng = np.random.default_rng(7)
    u, v = rng.uniform(0.2, 1.0, 20), rng.uniform(0.2, 1.0, 20)
    du, dv, _ = dln.dln_direction(u, v, data.X, data.y, method, gamma, eps, per_sample=per_sample, form=form)
    tu, tv = _torch_directions(u, v, data.X, data.y, method, gamma, eps, per_sample, form)
    scale = np.abs(np.r_[tu, tv]).max()
    assert np.abs(np.r_[du - tu, dv - tv]).max() < 1e-12 * scale


@pytest.mark.parametrize("form", ["pm", "uv"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize(("method", "gamma", "eps"), [("gd", 0.0, None), *FD_METHODS])
def test_a_batch_of_states_gives_the_same_directions_as_one_at_a_time(data, method, gamma, eps, per_sample, form):
    rng = np.random.default_rng(10)
    U, V = rng.uniform(0.2, 1.0, (4, 20)), rng.uniform(0.2, 1.0, (4, 20))
    batch = dln.dln_direction(U, V, data.X, data.y, method, gamma, eps, per_sample=per_sample, form=form)
    for k in range(4):
        single = dln.dln_direction(U[k], V[k], data.X, data.y, method, gamma, eps, per_sample=per_sample, form=form)
        for got, want in zip(batch, single):
            np.testing.assert_allclose(got[k], want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("per_sample", [False, True])
def test_double_direction_is_the_gradient_of_the_gr_objective(data, per_sample):
    rng = np.random.default_rng(8)
    u, v = rng.uniform(0.2, 1.0, 20), rng.uniform(0.2, 1.0, 20)
    du, dv, _ = dln.dln_direction(u, v, data.X, data.y, "double", 0.3, per_sample=per_sample)
    h = 1e-6
    for i in (0, 7, 19):
        e = np.zeros(20)
        e[i] = h
        f = lambda uu, vv: dln.gr_objective(uu, vv, data.X, data.y, 0.3, per_sample=per_sample)  # noqa: E731
        assert (f(u + e, v) - f(u - e, v)) / (2 * h) == pytest.approx(du[i], rel=1e-6)
        assert (f(u, v + e) - f(u, v - e)) / (2 * h) == pytest.approx(dv[i], rel=1e-6)


@pytest.mark.parametrize("per_sample", [False, True])
def test_finite_differences_converge_to_double_backprop_at_their_order(data, per_sample):
    """|d_FD - d_DB| ~ C eps^p: fitted p = 1 for forward and backward (errors of opposite sign), 2 for central."""
    rng = np.random.default_rng(9)
    u, v = rng.uniform(0.2, 1.0, 20), rng.uniform(0.2, 1.0, 20)
    args = (u, v, data.X, data.y)
    db = np.r_[dln.dln_direction(*args, "double", 0.1, per_sample=per_sample)[:2]]
    epsilons = np.geomspace(1e-4, 1e-2, 5)
    diff = {m: [np.r_[dln.dln_direction(*args, m, 0.1, e, per_sample=per_sample)[:2]] - db for e in epsilons]
            for m in ("forward", "backward", "central")}
    slope = {m: np.polyfit(np.log(epsilons), np.log([np.abs(x).max() for x in diff[m]]), 1)[0] for m in diff}
    assert 0.95 < slope["forward"] < 1.05 and 0.95 < slope["backward"] < 1.05
    assert 1.9 < slope["central"] < 2.1
    for f, b in zip(diff["forward"], diff["backward"]):  # leading errors +-(eps/2) third-derivative term
        assert np.abs(f + b).max() < 0.05 * np.abs(f).max()


@pytest.mark.parametrize("method", ["forward", "backward", "central"])
def test_each_stencil_method_is_its_defining_formula_at_large_eps(data, method):
    """At eps = 0.5 (far from the limit) the stencil direction equals the method's own formula to ~1e-12."""
    rng = np.random.default_rng(11)
    u, v = rng.uniform(0.2, 1.0, 20), rng.uniform(0.2, 1.0, 20)
    du, dv, _ = dln.dln_direction(u, v, data.X, data.y, method, 0.3, 0.5, per_sample=True)
    tu, tv = _torch_directions(u, v, data.X, data.y, method, 0.3, 0.5, True, "pm")
    assert np.abs(np.r_[du - tu, dv - tv]).max() < 1e-12 * np.abs(np.r_[tu, tv]).max()


def test_gamma_zero_is_plain_gd_whatever_the_method(data):
    u, v = dln.dln_init(0.1, 20)
    gd = dln.dln_direction(u, v, data.X, data.y, "gd")
    for method, eps in (("double", None), ("forward", 0.1), ("central", 0.1)):
        for got, want in zip(dln.dln_direction(u, v, data.X, data.y, method, 0.0, eps), gd):
            np.testing.assert_array_equal(got, want)


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
@pytest.mark.parametrize("method", ["double", "forward", "backward", "central"])
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
    """F-GR < DB-GR < B-GR < alpha (geometric means) at gamma = eps = 0.1, alpha = 0.1; central next to DB."""
    f, db, b, c = (flows[m, per_sample].alpha_eff_gmean for m in ("forward", "double", "backward", "central"))
    assert f < db < b < 0.1
    assert abs(np.log(c / db)) < 0.3 * min(np.log(db / f), np.log(b / db))  # central: much nearer DB


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


# -------------------------------------------------------------------------------------- argument checks

_X = np.random.default_rng(0).standard_normal((4, 6))
_Y = _X @ np.r_[1.0, 0, 0, 0, 0, 0]
_U = np.full(6, 0.1)


def _with(array, index, value):
    out = np.array(array, dtype=float)
    out[index] = value
    return out


def _flow(**kw):
    return dln.gradient_flow(**{"X": _X, "y": _Y, "alpha": 0.1, **kw})


def _gd(**kw):
    return dln.gradient_descent(**{"X": _X, "y": _Y, "alpha": 0.1, "lr": 0.1, "steps": 3, **kw})


def _direction(**kw):
    return dln.dln_direction(**{"u": _U, "v": _U, "X": _X, "y": _Y, **kw})


def _sweep(**kw):
    return dln.sweep(dln.make_sparse_regression(4, 6, 1, n_test=5), **{"alpha": [0.1], **kw})


#: (call, the message it must raise): one row per check. The messages name the argument and what it accepts.
BAD_INPUT = {
    "alpha zero": (lambda: _flow(alpha=0.0), r"alpha \(the initialization scale\) must be > 0"),
    "alpha negative entry": (lambda: _gd(alpha=_with(_U, 2, -0.1)), r"alpha .* must be > 0"),
    "alpha NaN": (lambda: _flow(alpha=np.nan), "alpha must be finite"),
    "alpha inf entry": (lambda: dln.argmin_q(_X, _Y, _with(_U, 0, np.inf)), "alpha must be finite"),
    "alpha wrong shape": (lambda: _flow(alpha=np.ones(5)), r"alpha must be a number or an array of shape \(d,\)"),
    "alpha not a number": (lambda: dln.dln_init("big", 6), "alpha must be an array of real numbers"),
    "X NaN": (lambda: _flow(X=_with(_X, (1, 2), np.nan)), "X must be finite"),
    "X 1-D": (lambda: dln.l1_interpolant(_X[0], _Y[:1]), "X must be a 2-D array"),
    "X empty": (lambda: dln.min_l2_interpolant(np.zeros((0, 6)), np.zeros(0)), "X must be a 2-D array"),
    "y inf": (lambda: _gd(y=_with(_Y, 0, np.inf)), "y must be finite"),
    "y wrong length": (lambda: _direction(y=_Y[:3]), r"y must have shape \(n,\) = \(4,\)"),
    "y as a column": (lambda: dln.argmin_q(_X, _Y[:, None], 0.1), r"y must have shape \(n,\)"),
    "u, v shapes differ": (lambda: _direction(v=_U[:5]), "u and v must have the same shape"),
    "u, v not matching X": (lambda: _direction(u=_U[:5], v=_U[:5]), r"with d = 6 \(the columns of X\)"),
    "u NaN": (lambda: dln.dln_beta(_with(_U, 0, np.nan), _U), "u must be finite"),
    "beta wrong shape": (lambda: dln.loss(np.zeros(5), _X, _Y), r"beta must have shape \(d,\) = \(6,\)"),
    "beta 2-D": (lambda: dln.q_potential(np.zeros((2, 3)), 0.1), "beta must be a 1-D array"),
    "steps negative": (lambda: _gd(steps=-1), "steps must be an integer >= 0"),
    "steps float": (lambda: _gd(steps=10.0), "steps must be an integer >= 0"),
    "record_every zero": (lambda: _gd(record_every=0), "record_every must be an integer >= 1"),
    "lr zero": (lambda: _gd(lr=0.0), "lr must be > 0"),
    "lr NaN": (lambda: _gd(lr=float("nan")), "lr must be a finite real number"),
    "gamma negative": (lambda: _flow(method="double", gamma=-0.1), "gamma must be >= 0"),
    "gamma inf": (lambda: _direction(method="double", gamma=np.inf), "gamma must be a finite real number"),
    "gamma string": (lambda: _direction(method="double", gamma="0.1"), "gamma must be a finite real number"),
    "gamma with gd": (lambda: _flow(method="gd", gamma=0.1), "'gd' is plain gradient descent/flow, so gamma must"),
    "gamma in the objective": (lambda: dln.gr_objective(_U, _U, _X, _Y, -1.0), "gamma must be >= 0"),
    "eps missing": (lambda: _direction(method="central", gamma=0.1), "'central' needs eps > 0"),
    "eps zero": (lambda: _gd(method="forward", gamma=0.1, eps=0.0), "eps must be > 0"),
    "eps negative": (lambda: _flow(method="backward", gamma=0.1, eps=-0.1), "eps must be > 0"),
    "eps NaN, where not used": (lambda: _direction(method="double", gamma=0.1, eps=np.nan), "eps must be a finite"),
    "method unknown": (lambda: _flow(method="fgr", gamma=0.1), r"method must be 'gd' .* or one of gradreg.methods"),
    "method None": (lambda: _direction(method=None), "method must be 'gd'"),
    "form unknown": (lambda: dln.dln_init(0.1, 6, form="uu"), r"form must be one of \('pm', 'uv'\)"),
    "per_sample not a bool": (lambda: _gd(per_sample="yes"), "per_sample must be True or False"),
    "d zero": (lambda: dln.dln_init(0.1, 0), "d must be an integer >= 1"),
    "t_max zero": (lambda: _flow(t_max=0), "t_max must be > 0"),
    "loss_tol negative": (lambda: _flow(loss_tol=-1e-20), "loss_tol must be > 0"),
    "rtol zero": (lambda: _flow(rtol=0.0), "rtol must be > 0"),
    "solver unknown": (lambda: _flow(solver="Euler"), "solver must be one of scipy's solve_ivp methods"),
    "argmin_q tol": (lambda: dln.argmin_q(_X, _Y, 0.1, tol=0.0), "tol must be > 0"),
    "argmin_q max_iter": (lambda: dln.argmin_q(_X, _Y, 0.1, max_iter=0), "max_iter must be an integer >= 1"),
    "k larger than d": (lambda: dln.make_sparse_regression(4, 6, 7), "k .* must be between 1 and d = 6"),
    "n zero": (lambda: dln.andriushchenko_flammarion_data(n=0), "n must be an integer >= 1"),
    "seed negative": (lambda: dln.make_sparse_regression(4, 6, 1, seed=-1), "seed must be an integer >= 0"),
    "sweep data": (lambda: dln.sweep((_X, _Y), alpha=[0.1]), "data must be a SparseRegression"),
    "sweep two grids": (lambda: _sweep(gamma=[0.1], method="double"), "exactly one of alpha, gamma, eps"),
    "sweep empty grid": (lambda: _sweep(alpha=[]), "the grid of alpha is empty"),
    "sweep lr without steps": (lambda: _sweep(lr=0.1), "give both lr and steps"),
    "sweep bad point": (lambda: _sweep(alpha=[0.1, -0.1]), r"alpha .* must be > 0"),
    "seed_study key": (lambda: dln.seed_study(4, 6, 1, [0], 0.1, {"a": {"lr": 1}}), r"unknown keys \['lr'\]"),
    "seed_study seeds": (lambda: dln.seed_study(4, 6, 1, [0, 1.5], 0.1, {"GF": {}}), "each seed must be an integer"),
    "seed_study config": (lambda: dln.seed_study(4, 6, 1, [0], 0.1, {"F": {"method": "forward", "gamma": 0.1}}),
                          "'forward' needs eps > 0"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_is_rejected_with_a_message_that_names_it(case):
    call, message = BAD_INPUT[case]
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("call", [
    lambda: _sweep(alpha=[0.1, 0.2, -1.0]),
    lambda: dln.seed_study(4, 6, 1, [0, 1, 2], 0.1, {"GF": {}, "bad": {"method": "double", "gamma": -1}}),
], ids=["sweep", "seed_study"])
def test_grids_are_checked_before_the_first_run(monkeypatch, call):
    def no_work(*args, **kwargs):
        raise AssertionError("a run started before every argument was checked")

    monkeypatch.setattr(dln.training, "gradient_flow", no_work)
    with pytest.raises(ValueError):
        call()


def test_the_flows_without_scipy_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.integrate", None)  # import scipy.integrate now raises ImportError
    hint = r"gradreg.dln.gradient_flow needs .* pip install scipy.* \"gradreg\[book\] @ git\+https://"
    with pytest.raises(ImportError, match=hint):
        _flow()
    du, _, _ = _direction(method="central", gamma=0.1, eps=0.1)  # the direction is numpy only
    assert du.shape == (6,)


def test_runs_pickle_under_their_public_name(data):
    """runtime.cached stores runs with torch.save (pickle): the classes resolve as gradreg.dln.<name>."""
    run = dln.gradient_descent(data.X, data.y, 0.1, "central", 0.1, 0.1, lr=0.01, steps=2)
    again = pickle.loads(pickle.dumps(run))
    assert type(again) is dln.DLNRun and dln.DLNRun.__module__ == "gradreg.dln"
    np.testing.assert_array_equal(again.beta, run.beta)


# ------------------------------------------------------------------ types numpy would convert (issue 24)


@pytest.mark.parametrize(("call", "needle"), [
    (lambda: dln.dln_init("0.1", 4), "alpha must be an array of real numbers (ints or floats), got strings"),
    (lambda: dln.dln_init(True, 4), "alpha must be an array of real numbers (ints or floats), got booleans"),
    (lambda: dln.dln_direction(np.ones(2), np.ones(2), np.ones((3, 2), dtype=bool), np.zeros(3)),
     "X must be an array of real numbers (ints or floats), got booleans"),
    (lambda: dln.dln_direction(["1", "2"], np.ones(2), np.ones((3, 2)), np.zeros(3)),
     "u must be an array of real numbers (ints or floats), got strings"),
    (lambda: dln.dln_direction(np.ones(2), np.ones(2), np.ones((3, 2)), "123"), "y must be an array of real"),
])
def test_strings_and_booleans_are_not_numbers(call, needle):
    with pytest.raises(ValueError) as info:
        call()
    assert needle in str(info.value)


def test_integer_and_float_arrays_are_still_numbers():
    u, v = dln.dln_init(np.float32(0.5), 2)
    assert u.tolist() == [0.5, 0.5]
    d_u, d_v, _ = dln.dln_direction(u, v, np.eye(2, dtype=int), [1, 0])
    assert d_u.shape == (2,) and np.all(np.isfinite(d_u))
