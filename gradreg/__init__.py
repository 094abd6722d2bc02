"""gradreg: gradient regularization (double backprop, F-GR, B-GR) for PyTorch.

The GR objective L(θ) + (γ/2)‖∇L(θ)‖² has the gradient ∇L + γH∇L; :func:`gr_grad` computes it for one
closure, :class:`GR` wraps any torch optimizer with it.
"""

__version__ = "0.2.0"

from gradreg import bench, data, diagnostics, dln, experiments, flooding, hessian, models, plotting, runtime
from gradreg.engine import METHODS, PERTURBATIONS, NonFiniteError, gr_grad
from gradreg.optim import GR
from gradreg.runtime import Setup, setup

__all__ = [
    "GR", "METHODS", "PERTURBATIONS", "NonFiniteError", "Setup", "__version__", "bench", "data", "diagnostics",
    "dln", "experiments", "flooding", "gr_grad", "hessian", "models", "plotting", "runtime", "setup",
]
