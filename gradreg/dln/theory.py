"""Where gradient flow ends: the potential ``Q_alpha``, its constrained minimizer, and the two limits (l1, l2)."""

from __future__ import annotations

import numpy as np

from gradreg._optional import require
from gradreg.dln._checks import check_alpha, check_count, check_data, check_real, real_array


def q_potential(beta: np.ndarray, alpha: float | np.ndarray) -> float:
    """``Q_alpha(beta) = sum_i alpha_i^2 q(beta_i / alpha_i^2)``, ``q(z) = 2 - sqrt(4 + z^2) + z arcsinh(z/2)``."""
    beta = real_array("beta", beta)
    if beta.ndim != 1:
        raise ValueError(f"beta must be a 1-D array (one entry per feature), got shape {beta.shape}")
    a2 = check_alpha(alpha, beta.size) ** 2
    z = beta / a2
    return float(np.sum(a2 * (z * np.arcsinh(z / 2) - z * z / (2 + np.sqrt(4 + z * z)))))  # no cancellation


def argmin_q(
    X: np.ndarray, y: np.ndarray, alpha: float | np.ndarray, *, tol: float = 1e-13, max_iter: int = 500
) -> np.ndarray:
    """``argmin Q_alpha(beta) s.t. X beta = y``, by damped Newton on the convex dual
    ``Phi(lam) = sum_i 2 alpha_i^2 (cosh((X^T lam)_i) - 1) - y^T lam``, whose gradient ``X beta(lam) - y`` vanishes
    at the solution, ``beta(lam) = 2 alpha^2 sinh(X^T lam)`` (the KKT form). ``X`` must have full row rank;
    tested for ``1e-10 <= alpha <= 1e3``."""
    X, y = check_data(X, y)
    log_a2 = 2 * np.log(check_alpha(alpha, X.shape[1]))
    tol, max_iter = check_real("tol", tol), check_count("max_iter", max_iter, 1)

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
    X, y = check_data(X, y)
    optimize = require("scipy.optimize", extra="book", purpose="gradreg.dln.l1_interpolant")
    d = X.shape[1]
    res = optimize.linprog(np.ones(2 * d), A_eq=np.hstack([X, -X]), b_eq=y, bounds=(0, None), method="highs")
    if not res.success:
        raise RuntimeError(f"l1_interpolant: linprog failed: {res.message}")
    return res.x[:d] - res.x[d:]


def min_l2_interpolant(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``argmin |beta|_2 s.t. X beta = y = pinv(X) y`` (the large-alpha, kernel-regime limit)."""
    X, y = check_data(X, y)
    return np.linalg.lstsq(X, y, rcond=None)[0]
