"""The network and its training directions: ``beta(u, v)``, the chain rule, and the GR direction of every method.

The finite-difference methods are the rows of :data:`gradreg.methods.STENCILS`, read exactly as the torch engine
reads them: with ``c = gamma/eps`` and the step ``delta_j = eps g_j`` of each group loss ``L_j``,

    d = mean_j [(1 - c sum_k w_k) g_j + c sum_k w_k grad L_j(theta + s_k delta_j)].
"""

from __future__ import annotations

import numpy as np

from gradreg.dln._checks import (
    Form,
    Method,
    check_alpha,
    check_count,
    check_data,
    check_form,
    check_method,
    check_real,
    check_vector,
    check_weights,
)
from gradreg.methods import STENCILS


def dln_beta(u: np.ndarray, v: np.ndarray, form: Form = "pm") -> np.ndarray:
    """The linear predictor of a DLN: ``u*u - v*v`` (form ``"pm"``) or ``u*v`` (form ``"uv"``)."""
    check_form(form)
    u, v = check_weights(u, v)
    return _beta(u, v, form)


def _beta(u: np.ndarray, v: np.ndarray, form: str) -> np.ndarray:
    return u * u - v * v if form == "pm" else u * v


def dln_init(alpha: float | np.ndarray, d: int, form: Form = "pm") -> tuple[np.ndarray, np.ndarray]:
    """Initialization of scale ``alpha`` (scalar or one per coordinate) with ``beta(0) = 0``:
    ``u = v = alpha`` (form ``"pm"``) or ``u = alpha, v = 0`` (form ``"uv"``)."""
    check_form(form)
    return _init(check_alpha(alpha, check_count("d", d, 1)), form)


def _init(a: np.ndarray, form: str) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) = (alpha, alpha) for ``"pm"``, (alpha, 0) for ``"uv"``, from a checked ``alpha`` vector."""
    return a, (a.copy() if form == "pm" else np.zeros_like(a))


def _param_grad(u: np.ndarray, v: np.ndarray, G: np.ndarray, form: str) -> tuple[np.ndarray, np.ndarray]:
    """Chain rule ``grad_(u,v) = J^T G`` for ``G = grad_beta``: ``(2uG, -2vG)`` (pm) or ``(vG, uG)`` (uv)."""
    return (2 * u * G, -2 * v * G) if form == "pm" else (v * G, u * G)


def _jvp(u: np.ndarray, v: np.ndarray, du: np.ndarray, dv: np.ndarray, form: str) -> np.ndarray:
    """Change of beta along ``(du, dv)``: ``J (du, dv) = 2u du - 2v dv`` (pm) or ``v du + u dv`` (uv)."""
    return 2 * u * du - 2 * v * dv if form == "pm" else v * du + u * dv


def _curvature(G: np.ndarray, du: np.ndarray, dv: np.ndarray, form: str) -> tuple[np.ndarray, np.ndarray]:
    """``sum_i G_i (Hessian of beta_i) (du, dv)``: ``(2G du, -2G dv)`` (pm) or ``(G dv, G du)`` (uv)."""
    return (2 * G * du, -2 * G * dv) if form == "pm" else (G * dv, G * du)


def _group_grads(X: np.ndarray, y: np.ndarray | float, beta: np.ndarray, per_sample: bool) -> np.ndarray:
    """``G_j = grad_beta L_j`` for the losses GR is applied to, along axis -2: the full batch,
    ``L = |X beta - y|^2 / (2n)`` (one group), or each example, ``L_j = (x_j . beta - y_j)^2 / 2`` (n groups).
    ``beta`` is ``(..., 1, d)`` (one point) or ``(..., m, d)`` (each group's own finite-difference point)."""
    if per_sample:
        return X * ((X * beta).sum(-1) - y)[..., None]
    return (beta @ X.T - y) @ X / len(X)


def dln_direction(
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
    """The update direction ``(d_u, d_v)`` of a DLN (the flow is ``theta' = -d``) and the ``alpha_eff``
    integrand ``h``.

    With ``g_j = grad_theta L_j`` for each group loss ``L_j`` (see ``per_sample``) and the mean over groups:

    * ``"gd"``:     ``d = mean_j g_j``, ``h = 0`` (plain gradient descent/flow, the reference);
    * ``"double"``: ``d = mean_j (g_j + gamma H_j g_j)`` exactly, ``h = mean_j G_j^2``;
    * ``"forward"``, ``"backward"``, ``"central"``: the stencil of :data:`gradreg.methods.STENCILS`,
      ``d = mean_j [(1 - c sum_k w_k) g_j + c sum_k w_k grad L_j(theta + s_k eps g_j)]`` with ``c = gamma/eps``,
      and ``h = mean_j sum_k w_k s_k G_j * Gt_jk`` (``G`` = gradient in beta, ``Gt_jk`` at the k-th point).

    ``per_sample=False`` penalizes the full-batch gradient, ``(gamma/2) |grad L|^2``; ``per_sample=True``
    penalizes each example's, ``(gamma/2n) sum_j |grad L_j|^2`` with ``L_j = (x_j beta - y_j)^2 / 2``.
    ``u`` and ``v`` are ``(d,)``, or ``(k, d)`` for ``k`` states at once (the flow's Jacobian uses this).
    ``gamma = 0`` is plain GD whatever the method; ``eps > 0`` is required by the finite differences.
    """
    X, y = check_data(X, y)
    u, v = check_weights(u, v, X.shape[1])
    method, gamma, eps = check_method(method, gamma, eps)
    check_form(form, per_sample)
    return _direction(u, v, X, y, method, gamma, eps, bool(per_sample), form)


def _direction(
    u: np.ndarray, v: np.ndarray, X: np.ndarray, y: np.ndarray, method: str, gamma: float, eps: float | None,
    per_sample: bool, form: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`dln_direction` for checked arguments (the integrators call it thousands of times)."""
    u, v = u[..., None, :], v[..., None, :]  # a group axis (-2); leading axes, if any, are a batch of states
    G = _group_grads(X, y, _beta(u, v, form), per_sample)
    gu, gv = _param_grad(u, v, G, form)
    if method == "gd":
        du, dv, h = gu, gv, np.zeros_like(G)
    elif method == "double":
        du, dv, h = _double(u, v, X, G, gu, gv, gamma, per_sample, form)
    else:
        du, dv, h = _stencil(u, v, X, y, G, gu, gv, method, gamma, float(eps), per_sample, form)
    mean = 1.0 / G.shape[-2]  # mean over groups as sum * mean (np.mean is slow on these small arrays)
    return du.sum(-2) * mean, dv.sum(-2) * mean, h.sum(-2) * mean


def _double(
    u: np.ndarray, v: np.ndarray, X: np.ndarray, G: np.ndarray, gu: np.ndarray, gv: np.ndarray, gamma: float,
    per_sample: bool, form: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DB-GR, per group: ``d_j = g_j + gamma H_j g_j`` with ``H_j g_j = J^T A_j J g_j + sum_i G_ji Hess(beta_i) g_j``
    (``A_j`` the Hessian of ``L_j`` in beta), and ``h_j = G_j^2``."""
    AJg = _group_grads(X, 0.0, _jvp(u, v, gu, gv, form), per_sample)  # A_j z = grad L_j at z with y = 0
    hu, hv = _param_grad(u, v, AJg, form)
    cu, cv = _curvature(G, gu, gv, form)
    return gu + gamma * (hu + cu), gv + gamma * (hv + cv), G * G


def _stencil(
    u: np.ndarray, v: np.ndarray, X: np.ndarray, y: np.ndarray, G: np.ndarray, gu: np.ndarray, gv: np.ndarray,
    method: str, gamma: float, eps: float, per_sample: bool, form: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A finite-difference method, per group ``j``, from its rows ``(s_k, w_k)`` of ``STENCILS``:
    ``d_j = (1 - c sum_k w_k) g_j + c sum_k w_k grad L_j(theta + s_k eps g_j)`` with ``c = gamma/eps``,
    and the ``alpha_eff`` integrand ``h_j = sum_k w_k s_k G_j * Gt_jk``."""
    rows = STENCILS[method]
    c = gamma / eps
    keep = 1 - c * sum(w for _, w in rows)
    du, dv, h = keep * gu, keep * gv, np.zeros_like(G)
    for s, w in rows:
        ut, vt = u + s * eps * gu, v + s * eps * gv  # theta + s delta, one point per group
        Gt = _group_grads(X, y, _beta(ut, vt, form), per_sample)
        gut, gvt = _param_grad(ut, vt, Gt, form)
        du, dv, h = du + c * w * gut, dv + c * w * gvt, h + w * s * G * Gt
    return du, dv, h


def gr_objective(
    u: np.ndarray, v: np.ndarray, X: np.ndarray, y: np.ndarray, gamma: float, *,
    per_sample: bool = False, form: Form = "pm",
) -> float:
    """The GR objective whose gradient DB-GR follows: ``mean_j [L_j + (gamma/2) |grad_theta L_j|^2]``."""
    X, y = check_data(X, y)
    u, v = check_vector("u", u, X.shape[1]), check_vector("v", v, X.shape[1])
    gamma = check_real("gamma", gamma, strict=False)
    check_form(form, per_sample)
    beta = _beta(u, v, form)
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
    check_form(form)
    u, v = check_weights(u, v)
    return _balance(u, v, form)


def _balance(u: np.ndarray, v: np.ndarray, form: str) -> np.ndarray:
    return np.sqrt(u * v) if form == "pm" else np.sqrt(u * u - v * v) / 2
