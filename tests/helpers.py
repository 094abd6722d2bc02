"""Small float64 models and independent references (torch.func) shared by the engine and optimizer tests."""

from __future__ import annotations

import copy
import importlib.util
import math
import pathlib
import sys
from types import ModuleType

import torch
from torch import nn
from torch.func import functional_call, grad, jvp


def mlp(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    """Smooth MLP (tanh, softplus) with BatchNorm and dropout: finite differences see no kinks."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(dropout),
        nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 3),
    ).double()


def cnn(seed: int = 0) -> nn.Module:
    """Small CNN with BatchNorm2d and average pooling (smooth)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).double()


def inorm(seed: int = 0) -> nn.Module:
    """1-D CNN with InstanceNorm tracking running statistics, dropout, and a parameter the loss never uses."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.InstanceNorm1d(4, affine=True, track_running_stats=True), nn.Tanh(),
        nn.Dropout(0.1), nn.Flatten(), nn.Linear(4 * 8, 3),
    ).double()
    model.register_parameter("unused", nn.Parameter(torch.ones(5, dtype=torch.float64)))
    return model


def batch(kind: str, seed: int = 1, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (n, 6), "cnn": (n, 2, 8, 8), "inorm": (n, 2, 8)}[kind]
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


MODELS = {"mlp": mlp, "cnn": cnn, "inorm": inorm}


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy: a large gradient makes the O(ε^k) truncation error dominate round-off, so the
    convergence orders are measurable down to ε = 1e-5 in float64."""
    return nn.functional.cross_entropy(output, target, reduction="sum")


def make(kind: str):
    model = MODELS[kind]()
    x, y = batch(kind)
    return model, (lambda: loss_fn(model(x), y)), x, y


def _functional_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """L(params) on a copy whose normalization layers use batch statistics without tracking them."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.track_running_stats = False
    buffers = {k: v.detach().clone() for k, v in ref.named_buffers()}

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(functional_call(ref, (params, buffers), (x,)), y)

    return loss


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def reference_gradient(model, x, y, params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """∇L at ``params`` by torch.func, with the dropout masks that ``torch.manual_seed(seed)`` draws."""
    loss = _functional_loss(model, x, y)
    torch.manual_seed(seed)
    return grad(loss)(params)


def reference_g_hg(model, x, y, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """g = ∇L and H g by forward-over-reverse (jvp of grad), independent of gradreg's code."""
    loss = _functional_loss(model, x, y)
    params = params_of(model)
    torch.manual_seed(seed)
    g = grad(loss)(params)
    torch.manual_seed(seed)
    _, hg = jvp(grad(loss), (params,), (g,))
    return g, hg


def reference_gr_direction(model, x, y, gamma: float, seed: int) -> dict[str, torch.Tensor]:
    """g + γ H g, independent of gradreg's code."""
    g, hg = reference_g_hg(model, x, y, seed)
    return {k: g[k] + gamma * hg[k] for k in g}


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.grad.detach().clone() for k, v in model.named_parameters()}


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float((flat(a) - flat(b)).norm() / flat(b).norm())


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Everything a failed step must leave untouched, cloned."""
    snap = {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "rng": torch.get_rng_state(),
    }
    if optimizer is not None:
        snap["opt"] = copy.deepcopy(optimizer.state_dict())
    return snap


def assert_same(a: object, b: object, path: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {path}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"keys differ at {path}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {path}"
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {path}"


def square_whose_double_backward_raises(message: str):
    """u ↦ u², whose first backward works and whose double backward raises RuntimeError(message): stands for a
    kernel without a double backward (fused attention) or for any other failure there."""

    class Raises(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u):
            return u.clone()

        @staticmethod
        def backward(ctx, grad_output):
            raise RuntimeError(message)

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u):
            ctx.save_for_backward(u)
            return u * u

        @staticmethod
        def backward(ctx, grad_output):
            return 2 * Raises.apply(ctx.saved_tensors[0]) * grad_output

    return Square.apply


def relu_problem(seed: int = 0, n: int = 64, width: int = 16):
    """A ReLU MLP (depth 3, float64) and random 10-class data of n examples: the full-batch tests' problem."""
    import gradreg as gr

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(seed)
    return gr.models.mlp(8, width, 3, 10).double(), x, y


def loss_of_flat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss=nn.functional.cross_entropy):
    """θ ↦ L(θ) on the flattened parameters, by torch.func (independent of gradreg)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def at(theta: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(theta, [math.prod(s) for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return loss(functional_call(model, params, (x,)), y)

    return at


def params_vector(model: nn.Module) -> torch.Tensor:
    """The parameters as one detached vector (torch's parameters_to_vector)."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """Import examples/<name>.py (examples/ is not a package; its scripts import each other by name)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"gradreg_examples_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module
