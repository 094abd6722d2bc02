"""The regression problem: noiseless sparse targets ``y = X beta_star`` with fewer examples than features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradreg.dln._checks import check_count, check_data, check_vector


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


def _check_sizes(n: int, d: int, k: int, n_test: int) -> None:
    check_count("n", n, 1)
    check_count("d", d, 1)
    check_count("n_test", n_test, 1)
    if check_count("k", k, 1) > d:
        raise ValueError(f"k (the number of nonzero entries of beta_star) must be between 1 and d = {d}, got {k}")


def make_sparse_regression(n: int, d: int, k: int, seed: int = 0, n_test: int = 1000) -> SparseRegression:
    """Gaussian design ``X_ij ~ N(0, 1)``, ``beta_star`` with ``k`` nonzero entries ``|N(0,1)|`` on random
    coordinates scaled to unit norm, ``y = X beta_star`` (n < d: many interpolants)."""
    _check_sizes(n, d, k, n_test)
    rng = np.random.default_rng(check_count("seed", seed, 0))
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
    _check_sizes(n, d, k, n_test)
    rs = np.random.RandomState(0)
    X = rs.multivariate_normal(np.zeros(d), np.eye(d), n)
    X_test = rs.multivariate_normal(np.zeros(d), np.eye(d), n_test)
    beta_star = rs.randn(d)
    beta_star[k:] = 0
    beta_star = np.abs(beta_star) / np.linalg.norm(beta_star)
    return SparseRegression(X, X @ beta_star, X_test, X_test @ beta_star, beta_star)


def loss(beta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    """Squared loss ``L(beta) = |X beta - y|^2 / (2 n)``."""
    X, y = check_data(X, y)
    return _loss(check_vector("beta", beta, X.shape[1]), X, y)


def _loss(beta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    """:func:`loss` for checked arguments (the integrators call it at every recorded step)."""
    e = X @ beta - y
    return float(e @ e) / (2 * len(y))
