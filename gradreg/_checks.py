"""Argument checks shared by the engine, the optimizer and the Hessian tools: clear errors before any work.

Every message names the argument, the values it may take and, where a habit from other code is the likely cause,
what to do instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor

from gradreg.methods import METHODS, PERTURBATIONS


def _real(name: str, value: object, *, positive: bool) -> float:
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite number {bound}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def check_config(gamma: object, eps: object, method: object, perturbation: object = "raw",
                 adaptive_eta: object = 0.01, *, where: str = "") -> tuple[float, float | None]:
    """Validate one GR setting; return (γ, ε) as floats. Errors name the argument and its allowed values."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {', '.join(map(repr, PERTURBATIONS))}; got {perturbation!r}")
    _real("adaptive_eta", adaptive_eta, positive=False)
    gamma = _real(f"gamma{where}", gamma, positive=False)
    if method == "double":
        if perturbation != "raw":
            raise ValueError(f"perturbation={perturbation!r} does not apply to method='double' (exact Hg): use 'raw'")
        return gamma, None if eps is None else _real(f"eps{where}", eps, positive=True)
    if eps is None:
        raise ValueError(f"eps{where} is required for method={method!r}: the finite-difference step, a number > 0")
    eps = _real(f"eps{where}", eps, positive=True)
    if not math.isfinite(gamma / eps):
        raise ValueError(f"gamma/eps{where} = {gamma!r}/{eps!r} overflows: c = γ/ε must be finite")
    return gamma, eps


def as_params(params: object, name: str = "params") -> list[Tensor]:
    """``params`` as a list of tensors, refusing what torch.optim refuses (a tensor, a dict, a module, pairs)."""
    if isinstance(params, (Tensor, dict, torch.nn.Module, str)) or not isinstance(params, Iterable):
        hint = (" (use model.parameters())" if isinstance(params, torch.nn.Module) else
                ": a single Tensor: pass [tensor] or model.parameters()" if isinstance(params, Tensor) else "")
        raise TypeError(f"{name} must be an iterable of Tensors, e.g. [w] or model.parameters(), got "
                        f"{type(params).__name__}{hint}")
    params = list(params)
    for p in params:
        if not isinstance(p, Tensor):
            hint = ": pass model.parameters(), not named_parameters()" if isinstance(p, tuple) else ""
            raise TypeError(f"{name} must contain Tensors only, got a {type(p).__name__}{hint}")
    return params


def trainable(params: object, name: str = "params") -> list[Tensor]:
    """:func:`as_params` without the frozen tensors; a ValueError if none is left."""
    kept = [p for p in as_params(params, name) if p.requires_grad]
    if not kept:
        raise ValueError(f"{name}: no tensor requires grad (an empty list, or every parameter frozen)")
    return kept


def check_real(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a float if it is a finite real number ≥ 0 (> 0 with ``positive``); else a clear error."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return _real(name, value, positive=positive)


def check_int(name: str, value: object, *, minimum: int) -> int:
    """``value`` if it is an integer ≥ ``minimum``; else a clear error."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass
class ParamGroup:
    """Parameters sharing one GR strength ``gamma`` and one finite-difference step ``eps``."""

    params: list[Tensor]
    gamma: float
    eps: float | None = None


def checked_groups(groups: Sequence[ParamGroup], method: str, perturbation: str, eta: object) -> list[ParamGroup]:
    """Groups validated, with frozen parameters and then empty groups dropped; a parameter may appear once."""
    checked, seen = [], set()
    for i, group in enumerate(groups):
        where = f" (param group {i})" * (len(groups) > 1)
        gamma, eps = check_config(group.gamma, group.eps, method, perturbation, eta, where=where)
        params = [p for p in as_params(group.params, f"params{where}") if p.requires_grad]
        for p in params:
            if id(p) in seen:
                raise ValueError(f"params{where}: a parameter appears twice; list every parameter once, in one group")
            seen.add(id(p))
        if params:
            checked.append(ParamGroup(params, gamma, eps))
    if not checked:
        raise ValueError("params: no parameter requires grad; nothing to regularize")
    return checked


# ------------------------------------------------------------------ generic checks added for issue 24 (one block)


def check_unique(params: Sequence[Tensor], name: str = "params") -> list[Tensor]:
    """``params`` (a list) if no tensor appears twice in it; else a ValueError (a listed-twice parameter would be
    updated twice, or count twice in a sum over parameters)."""
    seen: set[int] = set()
    for i, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(f"{name}: the tensor at position {i} appears twice (shape {tuple(p.shape)}); list every "
                             "parameter once, e.g. [p for p in model.parameters()]")
        seen.add(id(p))
    return list(params)
