"""Diagonal linear networks (DLNs): sparse regression, GR flows and their implicit bias, in numpy/scipy.

A DLN predicts ``x @ beta`` with ``beta = u*u - v*v`` (form ``"pm"``, initialized ``u = v = alpha``) or
``beta = u*v`` (form ``"uv"``, initialized ``u = alpha, v = 0``). The training loss is
``L(beta) = |X beta - y|^2 / (2n)``, and ``r(beta) = grad_beta L = X^T (X beta - y) / n``.

Gradient flow from ``alpha`` converges to ``argmin Q_alpha(beta) s.t. X beta = y`` (Woodworth et al. 2020). Under
gradient regularization (GR) it converges to ``argmin Q_{alpha_eff}`` with a smaller, coordinate-wise
``alpha_eff`` (our derivation, in Chapter 3):

* DB-GR (exact ``gamma H grad L``):        ``alpha_eff = a0 * exp(-k gamma int mean_j G_j^2 dt)``
* F-GR / B-GR (finite difference, ``s = +eps / -eps``): ``alpha_eff = a0 * exp(-k gamma int mean_j G_j Gt_j dt)``

where ``G_j`` is the gradient in beta of the j-th loss (one group: the full batch; or each example for the
per-sample variant), ``Gt_j`` the same at the finite-difference point, and ``(a0, k) = (alpha, 4)`` for form
``"pm"``, ``(alpha/2, 1)`` for form ``"uv"``.

Methods use the project's names: ``"gd"`` (plain GD/GF), ``"double"`` (DB-GR), ``"forward"`` (F-GR, ascent
first) and ``"backward"`` (B-GR, descent first), always with ``eps > 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.integrate import solve_ivp
from scipy.optimize import linprog

Method = Literal["gd", "double", "forward", "backward"]
Form = Literal["pm", "uv"]
#: The values ``method`` accepts, in the project's names (plain GD/GF, DB-GR, F-GR, B-GR).
METHODS: tuple[str, ...] = ("gd", "double", "forward", "backward")
#: The two parameterizations, ``beta = u*u - v*v`` (``"pm"``) and ``beta = u*v`` (``"uv"``).
FORMS: tuple[str, ...] = ("pm", "uv")

#: ``(a0 / alpha, k)`` per form: ``alpha_eff = (a0/alpha) * alpha * exp(-k * gamma * int h dt)``.
_ALPHA_SCALE: dict[str, tuple[float, float]] = {"pm": (1.0, 4.0), "uv": (0.5, 1.0)}


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SparseRegression:
    """Noiseless sparse regression ``y = X beta_star`` with a test set drawn the same way."""

    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    beta_star: np.ndarray

    def train_loss(self, beta: np.ndarray) -> float:
        """``|X beta - y|^2 / (2 n)``."""
        return loss(beta, self.X, self.y)

    def test_loss(self, beta: np.ndarray) -> float:
        """``|X_test beta - y_test|^2 / (2 n_test)``: the test error every figure of Chapter 3 shows."""
        return loss(beta, self.X_test, self.y_test)


def make_sparse_regression(n: int, d: int, k: int, seed: int = 0, n_test: int = 1000) -> SparseRegression:
    """Gaussian design ``X_ij ~ N(0, 1)``, ``beta_star`` with ``k`` nonzero entries ``|N(0,1)|`` on random
    coordinates scaled to unit norm, ``y = X beta_star`` (n < d: many interpolants)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    X_test = rng.standard_normal((n_test, d))
    beta_star = np.zeros(d)
    support = rng.choice(d, size=k, replace=False)
    beta_star[support] = np.abs(rng.standard_normal(k))
    beta_star /= np.linalg.norm(beta_star)
    return SparseRegression(X, X @ beta_star, X_test, X_test @ beta_star, beta_star)


def andriushchenko_flammarion_data(n: int = 20, d: int = 30, k: int = 3, n_test: int = 1000) -> SparseRegression:
    """The data of Andriushchenko & Flammarion's public DLN notebook (``np.random.seed(0)``, ``X ~ N(0, I)``,
    ``beta_star = |N(0,1)|`` on the first ``k`` coordinates, unit norm), drawn in the same order from the same
    legacy generator so that results can be compared with that code. The global NumPy state is untouched."""
    rs = np.random.RandomState(0)
    X = rs.multivariate_normal(np.zeros(d), np.eye(d), n)
    X_test = rs.multivariate_normal(np.zeros(d), np.eye(d), n_test)
    beta_star = rs.randn(d)
    beta_star[k:] = 0
    beta_star = np.abs(beta_star) / np.linalg.norm(beta_star)
    return SparseRegression(X, X @ beta_star, X_test, X_test @ beta_star, beta_star)


def loss(beta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    """Squared loss ``L(beta) = |X beta - y|^2 / (2 n)``."""
    e = X @ beta - y
    return float(e @ e) / (2 * len(y))


# ------------------------------------------------------------------------------------------ the model


def dln_beta(u: np.ndarray, v: np.ndarray, form: Form = "pm") -> np.ndarray:
    """The linear predictor of a DLN: ``u*u - v*v`` (form ``"pm"``) or ``u*v`` (form ``"uv"``)."""
    return u * u - v * v if form == "pm" else u * v


def dln_init(alpha: float | np.ndarray, d: int, form: Form = "pm") -> tuple[np.ndarray, np.ndarray]:
    """Initialization of scale ``alpha`` (scalar or one per coordinate) with ``beta(0) = 0``:
    ``u = v = alpha`` (form ``"pm"``) or ``u = alpha, v = 0`` (form ``"uv"``)."""
    a = np.broadcast_to(np.asarray(alpha, dtype=float), (d,)).copy()
    return a, (a.copy() if form == "pm" else np.zeros(d))


def _param_grad(u: np.ndarray, v: np.ndarray, G: np.ndarray, form: Form) -> tuple[np.ndarray, np.ndarray]:
    """Chain rule ``grad_(u,v) = J^T G`` for ``G = grad_beta``: ``(2uG, -2vG)`` (pm) or ``(vG, uG)`` (uv)."""
    return (2 * u * G, -2 * v * G) if form == "pm" else (v * G, u * G)


def _jvp(u: np.ndarray, v: np.ndarray, du: np.ndarray, dv: np.ndarray, form: Form) -> np.ndarray:
    """Change of beta along ``(du, dv)``: ``J (du, dv) = 2u du - 2v dv`` (pm) or ``v du + u dv`` (uv)."""
    return 2 * u * du - 2 * v * dv if form == "pm" else v * du + u * dv


def _curvature(G: np.ndarray, du: np.ndarray, dv: np.ndarray, form: Form) -> tuple[np.ndarray, np.ndarray]:
    """``sum_i G_i (Hessian of beta_i) (du, dv)``: ``(2G du, -2G dv)`` (pm) or ``(G dv, G du)`` (uv)."""
    return (2 * G * du, -2 * G * dv) if form == "pm" else (G * dv, G * du)


def _group_grads(X: np.ndarray, y: np.ndarray | float, beta: np.ndarray, per_sample: bool) -> np.ndarray:
    """``G_j = grad_beta L_j`` for the losses GR is applied to, along axis -2: the full batch,
    ``L = |X beta - y|^2 / (2n)`` (one group), or each example, ``L_j = (x_j . beta - y_j)^2 / 2`` (n groups).
    ``beta`` is ``(..., 1, d)`` (one point) or ``(..., m, d)`` (each group's own finite-difference point)."""
    if per_sample:
        return X * ((X * beta).sum(-1) - y)[..., None]
    return (beta @ X.T - y) @ X / len(X)


def _resolve(method: str, gamma: float, eps: float | None, form: str = "pm") -> tuple[str, float]:
    """Check the arguments; return the method with the signed finite-difference step (``+eps``, ``-eps`` or 0)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if method in ("forward", "backward"):
        if eps is None or eps <= 0:
            raise ValueError(f"{method} needs eps > 0 (the method name picks the direction), got {eps}")
        return method, (eps if method == "forward" else -eps)
    return ("gd" if gamma == 0 else method), 0.0


def gr_direction(
    u: np.ndarray,
    v: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    method: Method = "gd",
    gamma: float = 0.0,
    eps: float | None = None,
    *,
    per_sample: bool = False,
    form: Form = "pm",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GR update direction ``(d_u, d_v)`` (the flow is ``theta' = -d``) and the ``alpha_eff`` integrand ``h``.

    With ``g_j = grad_theta L_j`` for each group loss ``L_j`` (see ``per_sample``) and the mean over groups:

    * ``"gd"``:       ``d = mean_j g_j``,                                            ``h = 0``
    * ``"double"``:   ``d = mean_j (g_j + gamma H_j g_j)``,                            ``h = mean_j G_j^2``
    * ``"forward"``:  ``d = mean_j ((1 - gamma/eps) g_j + gamma/eps grad L_j(theta + eps g_j))``
    * ``"backward"``: ``d = mean_j ((1 + gamma/eps) g_j - gamma/eps grad L_j(theta - eps g_j))``,
      with ``h = mean_j G_j * Gt_j`` (``G`` = gradient in beta, ``Gt`` at the finite-difference point).

    ``per_sample=False`` penalizes the full-batch gradient, ``(gamma/2) |grad L|^2``; ``per_sample=True``
    penalizes each example's, ``(gamma/2n) sum_j |grad L_j|^2`` with ``L_j = (x_j beta - y_j)^2 / 2``.
    ``u`` and ``v`` are ``(d,)``, or ``(k, d)`` for ``k`` states at once (the flow's Jacobian uses this).
    """
    method, s = _resolve(method, gamma, eps, form)
    u, v = u[..., None, :], v[..., None, :]  # a group axis (-2); leading axes, if any, are a batch of states
    G = _group_grads(X, y, dln_beta(u, v, form), per_sample)
    gu, gv = _param_grad(u, v, G, form)
    mean = 1.0 / G.shape[-2]  # mean over groups as sum * mean (np.mean is slow on these small arrays)
    if method == "gd":
        return gu.sum(-2) * mean, gv.sum(-2) * mean, np.zeros(G.shape[:-2] + G.shape[-1:])
    if method == "double":  # H_j g_j = J^T A_j J g_j + sum_i G_ji Hess(beta_i) g_j, A_j = Hessian of L_j in beta
        AJg = _group_grads(X, 0.0, _jvp(u, v, gu, gv, form), per_sample)  # A_j z = grad L_j at z with y = 0
        hu, hv = _param_grad(u, v, AJg, form)
        cu, cv = _curvature(G, gu, gv, form)
        return ((gu + gamma * (hu + cu)).sum(-2) * mean, (gv + gamma * (hv + cv)).sum(-2) * mean,
                (G * G).sum(-2) * mean)
    ut, vt = u + s * gu, v + s * gv  # one finite-difference point per group
    Gt = _group_grads(X, y, dln_beta(ut, vt, form), per_sample)
    gut, gvt = _param_grad(ut, vt, Gt, form)
    c = gamma / s
    return (((1 - c) * gu + c * gut).sum(-2) * mean, ((1 - c) * gv + c * gvt).sum(-2) * mean,
            (G * Gt).sum(-2) * mean)


def gr_objective(
    u: np.ndarray, v: np.ndarray, X: np.ndarray, y: np.ndarray, gamma: float, *,
    per_sample: bool = False, form: Form = "pm",
) -> float:
    """The GR objective whose gradient DB-GR follows: ``mean_j [L_j + (gamma/2) |grad_theta L_j|^2]``."""
    beta = dln_beta(u, v, form)
    e = X @ beta - y
    losses = e * e / 2 if per_sample else np.array([e @ e / (2 * len(e))])
    gu, gv = _param_grad(u, v, _group_grads(X, y, beta[None], per_sample), form)
    return float(np.mean(losses + gamma / 2 * ((gu * gu).sum(-1) + (gv * gv).sum(-1))))


def alpha_from_balance(u: np.ndarray, v: np.ndarray, form: Form = "pm") -> np.ndarray:
    """The ``alpha`` that the current state encodes: ``sqrt(u v)`` (pm) or ``sqrt(u^2 - v^2) / 2`` (uv).

    Exact identity (pm): ``beta = u^2 - v^2 = 2 (sqrt(uv))^2 sinh(log(u/v))``. Gradient flow keeps ``u v``
    constant; GR shrinks it. When ``log(u/v)`` lies in ``span(X^T)`` (true along every flow here, not for
    discrete GD) this is exactly the ``alpha_eff`` of ``argmin Q``.
    """
    return np.sqrt(u * v) if form == "pm" else np.sqrt(u * u - v * v) / 2


# ------------------------------------------------------------------------------------------- theory


def q_potential(beta: np.ndarray, alpha: float | np.ndarray) -> float:
    """``Q_alpha(beta) = sum_i alpha_i^2 q(beta_i / alpha_i^2)``, ``q(z) = 2 - sqrt(4 + z^2) + z arcsinh(z/2)``."""
    a2 = np.broadcast_to(np.asarray(alpha, dtype=float) ** 2, np.shape(beta))
    z = beta / a2
    return float(np.sum(a2 * (z * np.arcsinh(z / 2) - z * z / (2 + np.sqrt(4 + z * z)))))  # no cancellation


def argmin_q(
    X: np.ndarray, y: np.ndarray, alpha: float | np.ndarray, *, tol: float = 1e-13, max_iter: int = 500
) -> np.ndarray:
    """``argmin Q_alpha(beta) s.t. X beta = y``, by damped Newton on the convex dual
    ``Phi(lam) = sum_i 2 alpha_i^2 (cosh((X^T lam)_i) - 1) - y^T lam``, whose gradient ``X beta(lam) - y`` vanishes
    at the solution, ``beta(lam) = 2 alpha^2 sinh(X^T lam)`` (the KKT form). ``X`` must have full row rank;
    tested for ``1e-10 <= alpha <= 1e3``."""
    log_a2 = 2 * np.log(np.broadcast_to(np.asarray(alpha, dtype=float), (X.shape[1],)))

    def parts(lam: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """Phi, beta = 2a^2 sinh z and 2a^2 cosh z, written with a^2 e^|z| and expm1(-|z|): no cancellation
        for large alpha, no overflow for small alpha (a too-long trial step gives Phi = inf: rejected)."""
        z = X.T @ lam
        m = np.expm1(-np.abs(z))  # e^-|z| - 1
        with np.errstate(over="ignore"):
            big = np.exp(np.abs(z) + log_a2)  # a^2 e^|z|
        return float(np.sum(big * m * m) - y @ lam), -np.sign(z) * big * m * (2 + m), big * (1 + (1 + m) ** 2)

    lam = np.zeros(X.shape[0])
    phi, beta, w = parts(lam)
    scale = 1.0 + np.abs(y).max()
    for _ in range(max_iter):
        grad = X @ beta - y
        if np.abs(grad).max() <= tol * scale:
            return beta
        try:
            step = np.linalg.solve((X * w) @ X.T, -grad)
        except np.linalg.LinAlgError:  # numerically singular (alpha ~ 1e-12 and below): least squares
            step = np.linalg.lstsq((X * w) @ X.T, -grad, rcond=None)[0]
        t, slope = 1.0, float(grad @ step)
        for _ in range(200):  # backtracking (Armijo) line search on the dual, until the decrease is round-off
            phi_new, beta_new, w_new = parts(lam + t * step)
            if np.isfinite(phi_new) and (phi_new <= phi + 0.25 * t * slope or -slope <= 1e-12 * (1 + abs(phi))):
                break
            t /= 2
        else:
            raise RuntimeError("argmin_q: the line search failed")
        lam, phi, beta, w = lam + t * step, phi_new, beta_new, w_new
    raise RuntimeError(f"argmin_q: no convergence in {max_iter} Newton steps (|X beta - y| = {np.abs(grad).max():.1e})")


def l1_interpolant(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``argmin |beta|_1 s.t. X beta = y`` (the small-alpha limit), as a linear program
    ``min 1^T (p + q)`` s.t. ``X (p - q) = y``, ``p, q >= 0``, solved by HiGHS."""
    d = X.shape[1]
    res = linprog(np.ones(2 * d), A_eq=np.hstack([X, -X]), b_eq=y, bounds=(0, None), method="highs")
    if not res.success:
        raise RuntimeError(f"l1_interpolant: linprog failed: {res.message}")
    return res.x[:d] - res.x[d:]


def min_l2_interpolant(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``argmin |beta|_2 s.t. X beta = y = pinv(X) y`` (the large-alpha, kernel-regime limit)."""
    return np.linalg.lstsq(X, y, rcond=None)[0]


# -------------------------------------------------------------------------------------- integrators


@dataclass
class DLNRun:
    """One training run: the endpoint, its effective initialization and the loss history.

    ``alpha_eff`` is the flows' accumulated integral (``a0 exp(-k gamma int h dt)``, see the module docstring);
    for discrete GD, which has no exact integral formula, it is ``alpha_from_balance(u, v)``.
    """

    beta: np.ndarray
    u: np.ndarray
    v: np.ndarray
    alpha_eff: np.ndarray
    times: np.ndarray  # time t (flows) or step index (GD) of each history entry
    train_loss: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def alpha_eff_gmean(self) -> float:
        """Geometric mean of ``alpha_eff`` over coordinates, one number to compare runs."""
        return float(np.exp(np.mean(np.log(self.alpha_eff))))


def gradient_flow(
    X: np.ndarray,
    y: np.ndarray,
    alpha: float | np.ndarray,
    method: Method = "gd",
    gamma: float = 0.0,
    eps: float | None = None,
    *,
    per_sample: bool = False,
    form: Form = "pm",
    t_max: float = 1e7,
    loss_tol: float = 1e-26,
    rtol: float = 1e-12,
    atol: float = 1e-15,
    solver: str = "LSODA",
) -> DLNRun:
    """Exact flow ``theta' = -d(theta)`` of ``gr_direction`` from ``dln_init(alpha)``, with ``H' = h`` integrated
    alongside; stops when the training loss falls below ``loss_tol`` (or at ``t_max``).

    The vector field is stiff (coordinates grow at rates from ~1 down to ~alpha^2), so the default is LSODA at
    tight tolerances. ``alpha_eff = a0 * exp(-k * gamma * H)`` (module docstring).
    """
    method, _ = _resolve(method, gamma, eps, form)
    d = X.shape[1]
    u0, v0 = dln_init(alpha, d, form)

    def rhs(_t: float, z: np.ndarray) -> np.ndarray:
        du, dv, h = gr_direction(z[:d], z[d:2 * d], X, y, method, gamma, eps, per_sample=per_sample, form=form)
        return np.concatenate([-du, -dv, h])

    def converged(_t: float, z: np.ndarray) -> float:
        return np.log(loss(dln_beta(z[:d], z[d:2 * d], form), X, y) + 1e-300) - np.log(loss_tol)

    def jac(t: float, z: np.ndarray) -> np.ndarray:
        """Forward-difference Jacobian, its 2d (u, v) columns in one batched call (H does not feed back)."""
        step = 1.5e-8 * np.maximum(np.abs(z[:2 * d]), 1e-6)
        Z = z[:2 * d] + np.diag(step)  # row k: the state with coordinate k moved
        du, dv, h = gr_direction(Z[:, :d], Z[:, d:], X, y, method, gamma, eps, per_sample=per_sample, form=form)
        J = np.zeros((3 * d, 3 * d))
        J[:, :2 * d] = ((np.hstack([-du, -dv, h]) - rhs(t, z)) / step[:, None]).T
        return J

    converged.terminal = True  # type: ignore[attr-defined]
    t_eval = np.concatenate([[0.0], np.geomspace(1e-2, t_max, 200)])
    implicit = {"jac": jac} if solver in ("LSODA", "Radau", "BDF") else {}
    sol = solve_ivp(rhs, (0.0, t_max), np.concatenate([u0, v0, np.zeros(d)]), method=solver, t_eval=t_eval,
                    events=converged, rtol=rtol, atol=atol, **implicit)
    if sol.status < 0:
        raise RuntimeError(f"gradient_flow: {sol.message}")
    z = sol.y_events[0][0] if sol.status == 1 else sol.y[:, -1]
    t_end = float(sol.t_events[0][0]) if sol.status == 1 else float(sol.t[-1])
    u, v, H = z[:d], z[d:2 * d], z[2 * d:]
    scale, k = _ALPHA_SCALE[form]
    alpha_eff = scale * np.broadcast_to(np.asarray(alpha, dtype=float), (d,)) * np.exp(-k * gamma * H)
    times = np.append(sol.t, t_end)
    history = [loss(dln_beta(zz[:d], zz[d:2 * d], form), X, y) for zz in sol.y.T] + [loss(dln_beta(u, v, form), X, y)]
    return DLNRun(dln_beta(u, v, form), u, v, alpha_eff, times, np.array(history),
                  {"t_end": t_end, "converged": sol.status == 1, "nfev": sol.nfev, "njev": sol.njev})


def gradient_descent(
    X: np.ndarray,
    y: np.ndarray,
    alpha: float | np.ndarray,
    method: Method = "gd",
    gamma: float = 0.0,
    eps: float | None = None,
    *,
    lr: float,
    steps: int,
    per_sample: bool = False,
    form: Form = "pm",
    record_every: int = 100,
) -> DLNRun:
    """Discrete GD ``theta <- theta - lr * d(theta)`` with the direction of ``gr_direction`` (``"gd"`` is plain
    GD). ``alpha_eff`` is ``alpha_from_balance`` of the endpoint."""
    method, _ = _resolve(method, gamma, eps, form)
    u, v = dln_init(alpha, X.shape[1], form)
    times, history = [], []
    for step in range(steps + 1):
        if step % record_every == 0 or step == steps:
            times.append(step)
            history.append(loss(dln_beta(u, v, form), X, y))
        if step == steps:
            break
        du, dv, _ = gr_direction(u, v, X, y, method, gamma, eps, per_sample=per_sample, form=form)
        u, v = u - lr * du, v - lr * dv
    return DLNRun(dln_beta(u, v, form), u, v, alpha_from_balance(u, v, form), np.array(times),
                  np.array(history), {"lr": lr, "steps": steps})


# ------------------------------------------------------------------------------------------- sweeps

#: Tolerances of the figure sweeps, enough for test losses to ~7 digits and endpoints within ~1e-7 of argmin Q.
SWEEP_TOL: dict[str, float] = {"rtol": 1e-8, "atol": 1e-11, "loss_tol": 1e-16}


@dataclass
class Sweep:
    """Endpoints of one method over a grid of one hyperparameter (``"alpha"``, ``"gamma"`` or ``"eps"``)."""

    name: str
    values: np.ndarray
    test_loss: np.ndarray
    alpha_eff: np.ndarray  # geometric mean over coordinates, per grid point
    theory_gap: np.ndarray  # max_i |beta_sim - argmin Q_{alpha_eff}|_i, per grid point
    runs: list[DLNRun]


def sweep(
    data: SparseRegression,
    method: Method = "gd",
    *,
    alpha: float | Sequence[float],
    gamma: float | Sequence[float] = 0.0,
    eps: float | Sequence[float] | None = None,
    per_sample: bool = False,
    form: Form = "pm",
    lr: float | None = None,
    steps: int | None = None,
    **flow_kwargs: float,
) -> Sweep:
    """Train over a grid: exactly one of ``alpha``, ``gamma``, ``eps`` is a sequence. Each point is an exact
    ``gradient_flow`` (tolerances ``SWEEP_TOL`` unless given), or discrete ``gradient_descent`` when ``lr`` and
    ``steps`` are given. Records the test loss, ``alpha_eff`` and the gap to ``argmin Q_{alpha_eff}``."""
    grid = {"alpha": alpha, "gamma": gamma, "eps": eps}
    swept = [name for name, value in grid.items() if isinstance(value, (Sequence, np.ndarray))]
    if len(swept) != 1:
        raise ValueError(f"exactly one of alpha, gamma, eps must be a sequence, got {swept or 'none'}")
    name = swept[0]
    runs = []
    for value in grid[name]:
        point = {**grid, name: float(value)}
        if lr is not None:
            run = gradient_descent(data.X, data.y, point["alpha"], method, point["gamma"], point["eps"], lr=lr,
                                   steps=int(steps or 0), per_sample=per_sample, form=form)
        else:
            run = gradient_flow(data.X, data.y, point["alpha"], method, point["gamma"], point["eps"],
                                per_sample=per_sample, form=form, **{**SWEEP_TOL, **flow_kwargs})
        runs.append(run)
    return Sweep(
        name,
        np.asarray(grid[name], dtype=float),
        np.array([data.test_loss(r.beta) for r in runs]),
        np.array([r.alpha_eff_gmean for r in runs]),
        np.array([np.abs(r.beta - argmin_q(data.X, data.y, r.alpha_eff)).max() for r in runs]),
        runs,
    )


def seed_study(
    n: int, d: int, k: int, seeds: Sequence[int], alpha: float, configs: dict[str, dict], n_test: int = 1000
) -> dict[str, np.ndarray]:
    """Test loss of each named configuration (keyword arguments of ``gradient_flow``: method, gamma, eps,
    per_sample) on ``make_sparse_regression(n, d, k, seed)`` for every seed: ``{name: array over seeds}``."""
    out: dict[str, list[float]] = {name: [] for name in configs}
    for seed in seeds:
        data = make_sparse_regression(n, d, k, seed=seed, n_test=n_test)
        for name, cfg in configs.items():
            run = gradient_flow(data.X, data.y, alpha, **{**SWEEP_TOL, **cfg})
            out[name].append(data.test_loss(run.beta))
    return {name: np.array(v) for name, v in out.items()}
