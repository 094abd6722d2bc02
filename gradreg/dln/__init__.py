"""Diagonal linear networks (DLNs): sparse regression, GR flows and their implicit bias, in numpy (and scipy).

A DLN predicts ``x @ beta`` with ``beta = u*u - v*v`` (form ``"pm"``, initialized ``u = v = alpha``) or
``beta = u*v`` (form ``"uv"``, initialized ``u = alpha, v = 0``). The training loss is
``L(beta) = |X beta - y|^2 / (2n)``, and ``r(beta) = grad_beta L = X^T (X beta - y) / n``.

Gradient flow from ``alpha`` converges to ``argmin Q_alpha(beta) s.t. X beta = y`` (Woodworth et al. 2020). Under
gradient regularization (GR) it converges to ``argmin Q_{alpha_eff}`` with a smaller, coordinate-wise
``alpha_eff`` (our derivation, in Chapter 3):

* DB-GR (exact ``gamma H grad L``): ``alpha_eff = a0 * exp(-k gamma int mean_j G_j^2 dt)``
* finite differences, the rows ``(s_k, w_k)`` of :data:`gradreg.methods.STENCILS` (F-GR, B-GR, central):
  ``alpha_eff = a0 * exp(-k gamma int mean_j sum_k w_k s_k G_j Gt_jk dt)``

where ``G_j`` is the gradient in beta of the j-th loss (one group: the full batch; or each example for the
per-sample variant), ``Gt_jk`` the same at the k-th finite-difference point ``theta + s_k eps g_j``, and
``(a0, k) = (alpha, 4)`` for form ``"pm"``, ``(alpha/2, 1)`` for form ``"uv"``.

Methods use the project's vocabulary (:mod:`gradreg.methods`): ``"gd"`` is plain gradient descent/flow (the
reference), and ``"double"``, ``"forward"``, ``"backward"``, ``"central"`` are the GR methods, the last three
always with ``eps > 0``. Every public function checks its arguments before doing any work. The direction needs
numpy only; the flows and the l1 interpolant need scipy (``pip install scipy``, or the ``[book]`` extra).

The package's modules, in reading order: ``problem`` (the data), ``network`` (the model and its directions),
``theory`` (``Q_alpha`` and its minimizer), ``training`` (flows, GD, sweeps); all names are exported here.
"""

from __future__ import annotations

from gradreg.dln import _checks, training
from gradreg.dln._checks import Form, Method
from gradreg.dln.network import alpha_from_balance, dln_beta, dln_direction, dln_init, gr_objective
from gradreg.dln.problem import SparseRegression, andriushchenko_flammarion_data, loss, make_sparse_regression
from gradreg.dln.theory import argmin_q, l1_interpolant, min_l2_interpolant, q_potential
from gradreg.dln.training import DLNRun, Sweep, gradient_descent, gradient_flow, seed_study, sweep

#: The two parameterizations, ``beta = u*u - v*v`` (``"pm"``) and ``beta = u*v`` (``"uv"``).
FORMS: tuple[str, ...] = _checks.FORMS
#: Tolerances of the figure sweeps, enough for test losses to ~7 digits and endpoints within ~1e-7 of argmin Q.
SWEEP_TOL: dict[str, float] = training.SWEEP_TOL

for _cls in (SparseRegression, DLNRun, Sweep):
    _cls.__module__ = __name__  # documented, referenced and pickled as gradreg.dln.<name>

__all__ = [  # noqa: RUF022 (reading order, which the API reference follows)
    "SparseRegression", "make_sparse_regression", "andriushchenko_flammarion_data", "loss",
    "FORMS", "Form", "Method", "dln_beta", "dln_init", "dln_direction", "gr_objective", "alpha_from_balance",
    "q_potential", "argmin_q", "l1_interpolant", "min_l2_interpolant",
    "DLNRun", "gradient_flow", "gradient_descent", "SWEEP_TOL", "Sweep", "sweep", "seed_study",
]
