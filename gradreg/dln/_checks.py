"""Argument checks for :mod:`gradreg.dln`: every public function rejects bad input before doing any work.

Each check names the argument, says what it accepts and returns the value in the form the code uses (float arrays,
ints, floats). The integrators call the private direction directly, so the checks run once per run, not per step.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import numpy as np

from gradreg.methods import METHODS

Method = Literal["gd", "double", "forward", "backward", "central"]
Form = Literal["pm", "uv"]
#: The two parameterizations, ``beta = u*u - v*v`` (``"pm"``) and ``beta = u*v`` (``"uv"``).
FORMS: tuple[str, ...] = ("pm", "uv")
#: solve_ivp's methods (``gradient_flow(solver=...)``).
SOLVERS: tuple[str, ...] = ("LSODA", "Radau", "BDF", "RK45", "RK23", "DOP853")


def real_array(name: str, value: object) -> np.ndarray:
    """``value`` as a float array, or a ValueError naming ``name``. Only integers and floats are taken: numpy would
    also turn strings (``"0.1"``) and booleans into floats."""
    try:
        raw = np.asarray(value)
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an array of real numbers, got {type(value).__name__}") from exc
    if raw.dtype.kind not in "iuf":
        kind = {"b": "booleans", "U": "strings", "S": "bytes", "O": "objects", "c": "complex numbers"}
        raise ValueError(f"{name} must be an array of real numbers (ints or floats), got "
                         f"{kind.get(raw.dtype.kind, str(raw.dtype))} ({type(value).__name__} {value!r:.60})")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite (no NaN or inf); it has {np.size(array) - np.isfinite(array).sum()} "
                         "non-finite entries")
    return array


def check_data(X: object, y: object) -> tuple[np.ndarray, np.ndarray]:
    """Finite ``X`` of shape ``(n, d)`` and ``y`` of shape ``(n,)``, with ``n, d >= 1``."""
    X, y = real_array("X", X), real_array("y", y)
    if X.ndim != 2 or 0 in X.shape:
        raise ValueError(f"X must be a 2-D array (n examples, d features) with n, d >= 1, got shape {X.shape}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"y must have shape (n,) = ({X.shape[0]},) to match X of shape {X.shape}, got {y.shape}")
    return X, y


def check_vector(name: str, value: object, d: int) -> np.ndarray:
    """A finite array of shape ``(d,)``."""
    array = real_array(name, value)
    if array.shape != (d,):
        raise ValueError(f"{name} must have shape (d,) = ({d},), one entry per feature, got {array.shape}")
    return array


def check_weights(u: object, v: object, d: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Finite weights ``u``, ``v`` of the same shape, ``(d,)`` or ``(k, d)`` (``k`` states at once)."""
    u, v = real_array("u", u), real_array("v", v)
    if u.shape != v.shape or u.ndim not in (1, 2) or (d is not None and u.shape[-1] != d):
        want = "(d,) or (k, d)" if d is None else f"(d,) or (k, d) with d = {d} (the columns of X)"
        raise ValueError(f"u and v must have the same shape, {want}; got {u.shape} and {v.shape}")
    return u, v


def check_alpha(alpha: object, d: int) -> np.ndarray:
    """The initialization scale: a finite number > 0 or one per coordinate (shape ``(d,)``), as a ``(d,)`` array."""
    a = real_array("alpha", alpha)
    if a.shape not in ((), (d,)):
        raise ValueError(f"alpha must be a number or an array of shape (d,) = ({d},), got shape {a.shape}")
    if not np.all(a > 0):
        raise ValueError(f"alpha (the initialization scale) must be > 0, got {alpha!r}")
    return np.broadcast_to(a, (d,)).copy()


def check_real(name: str, value: object, *, strict: bool = True) -> float:
    """A finite real number ``> 0`` (``>= 0`` when ``strict=False``), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if float(value) < 0 or (strict and float(value) == 0):
        raise ValueError(f"{name} must be {'>' if strict else '>='} 0, got {value!r}")
    return float(value)


def check_count(name: str, value: object, minimum: int) -> int:
    """An integer ``>= minimum`` (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_form(form: object, per_sample: object = False) -> None:
    """``form`` in :data:`FORMS` and ``per_sample`` a bool."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} (beta = u*u - v*v or u*v), got {form!r}")
    if not isinstance(per_sample, (bool, np.bool_)):
        raise ValueError(f"per_sample must be True or False, got {per_sample!r}")


def check_method(method: object, gamma: object, eps: object) -> tuple[str, float, float | None]:
    """``method`` is ``"gd"`` or one of :data:`gradreg.methods.METHODS`; ``gamma >= 0`` (0 with ``"gd"``);
    ``eps > 0`` required by the finite-difference methods and checked wherever given. ``gamma = 0`` is plain
    gradient descent/flow whatever the method (returned as ``"gd"``)."""
    if method != "gd" and method not in METHODS:
        raise ValueError(f"method must be 'gd' (plain gradient descent/flow) or one of gradreg.methods.METHODS "
                         f"{METHODS}, got {method!r}")
    gamma = check_real("gamma", gamma, strict=False)
    if method == "gd" and gamma != 0:
        raise ValueError(f"method 'gd' is plain gradient descent/flow, so gamma must be 0 (got {gamma}); "
                         f"for GR pick one of {METHODS}")
    if eps is None and method not in ("gd", "double"):
        raise ValueError(f"method {method!r} needs eps > 0, the finite-difference step (the method, not the sign "
                         "of eps, picks the direction)")
    eps = None if eps is None else check_real("eps", eps)
    return ("gd" if gamma == 0 else str(method)), gamma, eps
