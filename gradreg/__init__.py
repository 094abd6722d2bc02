"""gradreg: gradient regularization (double backprop, F-GR, B-GR) for PyTorch.

The GR objective L(θ) + (γ/2)‖∇L(θ)‖² has the gradient ∇L + γH∇L; :func:`gr_grad` computes it for one
closure, :class:`GR` wraps any torch optimizer with it.

``import gradreg`` loads only what a training loop needs (the engine, the optimizer, the method vocabulary and
the chapter runtime: torch and numpy). Every other submodule loads on first use, ``gradreg.dln`` or
``from gradreg import plotting`` alike (PEP 562); the book's extra dependencies (scipy, matplotlib, tqdm, mnist1d)
come with the ``book`` extra (``pip install "gradreg[book] @ git+https://github.com/gradreg/gradreg.git@main"``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

from gradreg import methods, runtime
from gradreg.engine import NonFiniteError, gr_grad
from gradreg.methods import METHODS, PERTURBATIONS
from gradreg.optim import GR
from gradreg.runtime import Setup, setup

#: Submodules that load on first attribute access: they need more than torch, or are not needed to train.
_LAZY = ("bench", "data", "diagnostics", "dln", "experiments", "flooding", "hessian", "models", "plotting")

if TYPE_CHECKING:  # type checkers and IDEs see them as plain imports
    from gradreg import bench, data, diagnostics, dln, experiments, flooding, hessian, models, plotting

__all__ = [
    "GR", "METHODS", "PERTURBATIONS", "NonFiniteError", "Setup", "__version__", "bench", "data", "diagnostics",
    "dln", "experiments", "flooding", "gr_grad", "hessian", "methods", "models", "plotting", "runtime", "setup",
]


def __getattr__(name: str) -> object:
    """Import a lazy submodule on first access (PEP 562); ``import gradreg.x`` sets the attribute after that."""
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
