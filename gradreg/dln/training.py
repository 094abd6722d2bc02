"""Training a DLN: the exact flow (scipy's stiff ODE solvers), discrete GD, and sweeps over a hyperparameter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradreg._optional import require
from gradreg.dln._checks import (
    SOLVERS,
    Form,
    Method,
    check_alpha,
    check_count,
    check_data,
    check_form,
    check_method,
    check_real,
)
from gradreg.dln.network import _balance, _beta, _direction, _init
from gradreg.dln.problem import SparseRegression, _check_sizes, _loss, make_sparse_regression
from gradreg.dln.theory import argmin_q

#: ``(a0 / alpha, k)`` per form: ``alpha_eff = (a0/alpha) * alpha * exp(-k * gamma * int h dt)``.
_ALPHA_SCALE: dict[str, tuple[float, float]] = {"pm": (1.0, 4.0), "uv": (0.5, 1.0)}


@dataclass
class DLNRun:
    """One training run: the endpoint, its effective initialization and the loss history.

    ``alpha_eff`` is the flows' accumulated integral (``a0 exp(-k gamma int h dt)``, see :mod:`gradreg.dln`);
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


def _check_run(
    X: object, y: object, alpha: object, method: object, gamma: object, eps: object, per_sample: object, form: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, float, float | None]:
    """The arguments every run shares, checked: ``(X, y, alpha as (d,), method, gamma, eps)``."""
    X, y = check_data(X, y)
    check_form(form, per_sample)
    return (X, y, check_alpha(alpha, X.shape[1]), *check_method(method, gamma, eps))


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
    """Exact flow ``theta' = -d(theta)`` of ``dln_direction`` from ``dln_init(alpha)``, with ``H' = h``
    integrated alongside; stops when the training loss falls below ``loss_tol`` (or at ``t_max``).

    The vector field is stiff (coordinates grow at rates from ~1 down to ~alpha^2), so the default is LSODA at
    tight tolerances. ``alpha_eff = a0 * exp(-k * gamma * H)`` (see :mod:`gradreg.dln`).
    """
    X, y, a, method, gamma, eps = _check_run(X, y, alpha, method, gamma, eps, per_sample, form)
    t_max, loss_tol = check_real("t_max", t_max), check_real("loss_tol", loss_tol)
    rtol, atol = check_real("rtol", rtol), check_real("atol", atol)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of scipy's solve_ivp methods {SOLVERS}, got {solver!r}")
    integrate = require("scipy.integrate", extra="book", purpose="gradreg.dln.gradient_flow")
    d = X.shape[1]
    u0, v0 = _init(a, form)

    def rhs(_t: float, z: np.ndarray) -> np.ndarray:
        du, dv, h = _direction(z[:d], z[d:2 * d], X, y, method, gamma, eps, per_sample, form)
        return np.concatenate([-du, -dv, h])

    def converged(_t: float, z: np.ndarray) -> float:
        return np.log(_loss(_beta(z[:d], z[d:2 * d], form), X, y) + 1e-300) - np.log(loss_tol)

    def jac(t: float, z: np.ndarray) -> np.ndarray:
        """Forward-difference Jacobian, its 2d (u, v) columns in one batched call (H does not feed back)."""
        step = 1.5e-8 * np.maximum(np.abs(z[:2 * d]), 1e-6)
        Z = z[:2 * d] + np.diag(step)  # row k: the state with coordinate k moved
        du, dv, h = _direction(Z[:, :d], Z[:, d:], X, y, method, gamma, eps, per_sample, form)
        J = np.zeros((3 * d, 3 * d))
        J[:, :2 * d] = ((np.hstack([-du, -dv, h]) - rhs(t, z)) / step[:, None]).T
        return J

    converged.terminal = True  # type: ignore[attr-defined]
    t_eval = np.concatenate([[0.0], np.geomspace(1e-2, t_max, 200)])
    implicit = {"jac": jac} if solver in ("LSODA", "Radau", "BDF") else {}
    sol = integrate.solve_ivp(rhs, (0.0, t_max), np.concatenate([u0, v0, np.zeros(d)]), method=solver,
                              t_eval=t_eval, events=converged, rtol=rtol, atol=atol, **implicit)
    if sol.status < 0:
        raise RuntimeError(f"gradient_flow: {sol.message}")
    return _flow_run(sol, X, y, a, gamma, form)


def _flow_run(sol: Any, X: np.ndarray, y: np.ndarray, alpha: np.ndarray, gamma: float, form: str) -> DLNRun:
    """The run from solve_ivp's solution: the endpoint (at the event, if it fired), the loss history and
    ``alpha_eff = a0 * exp(-k * gamma * H)``."""
    d = X.shape[1]
    z = sol.y_events[0][0] if sol.status == 1 else sol.y[:, -1]
    t_end = float(sol.t_events[0][0]) if sol.status == 1 else float(sol.t[-1])
    u, v, H = z[:d], z[d:2 * d], z[2 * d:]
    scale, k = _ALPHA_SCALE[form]
    history = [_loss(_beta(zz[:d], zz[d:2 * d], form), X, y) for zz in sol.y.T] + [_loss(_beta(u, v, form), X, y)]
    return DLNRun(_beta(u, v, form), u, v, scale * alpha * np.exp(-k * gamma * H), np.append(sol.t, t_end),
                  np.array(history), {"t_end": t_end, "converged": sol.status == 1, "nfev": sol.nfev,
                                      "njev": sol.njev})


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
    """Discrete GD ``theta <- theta - lr * d(theta)`` with the direction of ``dln_direction`` (``"gd"`` is plain
    GD). ``alpha_eff`` is ``alpha_from_balance`` of the endpoint."""
    X, y, a, method, gamma, eps = _check_run(X, y, alpha, method, gamma, eps, per_sample, form)
    lr, steps = check_real("lr", lr), check_count("steps", steps, 0)
    record_every = check_count("record_every", record_every, 1)
    u, v = _init(a, form)
    times, history = [], []
    for step in range(steps + 1):
        if step % record_every == 0 or step == steps:
            times.append(step)
            history.append(_loss(_beta(u, v, form), X, y))
        if step == steps:
            break
        du, dv, _ = _direction(u, v, X, y, method, gamma, eps, per_sample, form)
        u, v = u - lr * du, v - lr * dv
    return DLNRun(_beta(u, v, form), u, v, _balance(u, v, form), np.array(times),
                  np.array(history), {"lr": lr, "steps": steps})


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


def _grid_points(data: object, method: str, grid: dict, lr: object, steps: object) -> tuple[str, list[dict]]:
    """The swept name and every grid point of :func:`sweep`, each point checked before any run starts."""
    if not isinstance(data, SparseRegression):
        raise ValueError(f"data must be a SparseRegression (make_sparse_regression), got {type(data).__name__}")
    swept = [name for name, value in grid.items() if isinstance(value, (Sequence, np.ndarray))]
    if len(swept) != 1:
        raise ValueError(f"exactly one of alpha, gamma, eps must be a sequence, got {swept or 'none'}")
    name = swept[0]
    if len(grid[name]) == 0:
        raise ValueError(f"the grid of {name} is empty")
    if (lr is None) != (steps is None):
        raise ValueError("give both lr and steps (discrete GD) or neither (exact flows)")
    if lr is not None:
        check_real("lr", lr)
        check_count("steps", steps, 0)
    points = [{**grid, name: value} for value in grid[name]]
    for point in points:
        check_alpha(point["alpha"], data.X.shape[1])
        check_method(method, point["gamma"], point["eps"])
    return name, points


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
    check_form(form, per_sample)
    name, points = _grid_points(data, method, {"alpha": alpha, "gamma": gamma, "eps": eps}, lr, steps)
    runs = []
    for p in points:
        if lr is not None:
            run = gradient_descent(data.X, data.y, p["alpha"], method, p["gamma"], p["eps"], lr=lr, steps=steps,
                                   per_sample=per_sample, form=form)
        else:
            run = gradient_flow(data.X, data.y, p["alpha"], method, p["gamma"], p["eps"], per_sample=per_sample,
                                form=form, **{**SWEEP_TOL, **flow_kwargs})
        runs.append(run)
    return Sweep(
        name,
        np.asarray([p[name] for p in points], dtype=float),
        np.array([data.test_loss(r.beta) for r in runs]),
        np.array([r.alpha_eff_gmean for r in runs]),
        np.array([np.abs(r.beta - argmin_q(data.X, data.y, r.alpha_eff)).max() for r in runs]),
        runs,
    )


#: The keyword arguments a configuration of :func:`seed_study` may set.
_CONFIG_KEYS = ("method", "gamma", "eps", "per_sample")


def seed_study(
    n: int, d: int, k: int, seeds: Sequence[int], alpha: float, configs: dict[str, dict], n_test: int = 1000
) -> dict[str, np.ndarray]:
    """Test loss of each named configuration (keyword arguments of ``gradient_flow``: method, gamma, eps,
    per_sample) on ``make_sparse_regression(n, d, k, seed)`` for every seed: ``{name: array over seeds}``."""
    _check_sizes(n, d, k, n_test)
    check_alpha(alpha, d)
    seeds = [check_count("each seed", seed, 0) for seed in seeds]
    if not seeds or not configs:
        raise ValueError("seed_study needs at least one seed and one configuration")
    for name, cfg in configs.items():
        unknown = set(cfg) - set(_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"configuration {name!r}: unknown keys {sorted(unknown)}; allowed: {_CONFIG_KEYS}")
        check_method(cfg.get("method", "gd"), cfg.get("gamma", 0.0), cfg.get("eps"))
        check_form("pm", cfg.get("per_sample", False))
    out: dict[str, list[float]] = {name: [] for name in configs}
    for seed in seeds:
        data = make_sparse_regression(n, d, k, seed=seed, n_test=n_test)
        for name, cfg in configs.items():
            run = gradient_flow(data.X, data.y, alpha, **{**SWEEP_TOL, **cfg})
            out[name].append(data.test_loss(run.beta))
    return {name: np.array(v) for name, v in out.items()}
