"""The FLOP model: matrix products per step of each row on a bias-free ReLU MLP, derived and then counted.

Take the perceptron u_l = W_l h_{l−1}, h_l = φ(u_l), l = 1, …, L, h_0 = x, with every layer n × n and a batch of
b examples. Every matrix product of a step then costs the same, 2bn² FLOPs: that is the unit. For ReLU, φ' is
piecewise constant and costs no product; elementwise work (the perturbation, the combination, the checks, the
optimizer step) is not counted, and ``FlopCounterMode`` does not count it either.

* **One gradient, 3L − 1** (:func:`one_gradient`): L products forward (u_l = W_l h_{l−1}), L − 1 for the
  backpropagated errors δ_{l−1} = φ'(u_{l−1}) ⊙ W_lᵀ δ_l (autograd computes none for the input x), and L for the
  weight gradients ∂L/∂W_l = δ_l h_{l−1}ᵀ. SGD costs one gradient.
* **Two gradients, 6L − 2** (:func:`two_gradients`): two plain passes, F-GR and B-GR.
* **Three gradients, 9L − 3** (:func:`three_gradients`): the central difference.
* **Double backprop, 9L − 5** (:func:`double_backprop`): the gradient is built as a graph (``create_graph=True``,
  the 3L − 1 products of one gradient), then ⟨∇L, g⟩ is backpropagated through that graph. A product of two
  factors that both depend on θ costs two products on the way back, one per factor; the two products that read
  the constant input x (u_1 = W_1 x and ∂L/∂W_1 = δ_1 xᵀ) cost one. That is 2(3L − 1) − 2 = 6L − 4 more, and
  (3L − 1) + (6L − 4) = 9L − 5 in all (:func:`mlp_phase_units` counts the phases: L, 2L − 1, 6L − 4).
* **torch.func's forward-over-reverse, 12L − 4** (:func:`forward_over_reverse`): g = grad(L) first (3L − 1),
  then ``jvp(grad(L), (θ,), (g,))`` evaluates every product AB of the gradient computation together with its
  tangent Ȧ B + A Ḃ: three products each, 3(3L − 1), the input x included (its tangent is zero, and it is
  multiplied anyway). (3L − 1) + 3(3L − 1) = 12L − 4.

DB / F-GR = (9L − 5) / (6L − 2) → 3/2 as L grows. The test suite checks every formula against ``FlopCounterMode``
at several depths, widths and batch sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradreg.bench.steppers import DEFAULT_STEP, StepConfig, Stepper
from gradreg.bench.workloads import make_workload


def one_gradient(L: int) -> int:
    """L forward + (L − 1) errors + L weight gradients."""
    return 3 * L - 1


def two_gradients(L: int) -> int:
    """2 (3L − 1): two plain passes, F-GR, B-GR, and the SAM family."""
    return 2 * one_gradient(L)


def three_gradients(L: int) -> int:
    """3 (3L − 1): the central difference."""
    return 3 * one_gradient(L)


def double_backprop(L: int) -> int:
    """(3L − 1) for the recorded gradient + 2 (3L − 1) − 2 for backpropagating through it = 9L − 5."""
    return one_gradient(L) + (2 * one_gradient(L) - 2)


def forward_over_reverse(L: int) -> int:
    """(3L − 1) for g + 3 (3L − 1) for the gradient with its tangent = 12L − 4."""
    return one_gradient(L) + 3 * one_gradient(L)


#: Matrix products per step of each row, in units of one (batch × width) @ (width × width) product.
FLOP_UNITS: dict[str, Callable[[int], int]] = {
    "sgd": one_gradient,
    "two-passes": two_gradients,
    "forward": two_gradients,
    "backward": two_gradients,
    "central": three_gradients,
    "usam": two_gradients,
    "sam": two_gradients,
    "plain-sam": two_gradients,
    "double": double_backprop,
    "func-db": forward_over_reverse,
}

#: The same formulas as text, for tables.
FLOP_FORMULAS: dict[str, str] = {
    "sgd": "3L−1", "two-passes": "6L−2", "forward": "6L−2", "backward": "6L−2", "central": "9L−3",
    "usam": "6L−2", "sam": "6L−2", "plain-sam": "6L−2", "double": "9L−5", "func-db": "12L−4",
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts while ``fn()`` runs (matrix products,
    convolutions and attention; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def mlp_flop_units(
    method: str, *, depth: int, width: int = 512, batch_size: int = 32, config: StepConfig = DEFAULT_STEP
) -> float:
    """FLOPs of one step of ``method`` on the bias-free ``depth``-layer MLP, counted, in units of one
    (batch × width) @ (width × width) matrix product (2·batch·width² FLOPs)."""
    workload = make_workload("mlp", depth=depth, width=width, batch_size=batch_size)
    stepper = Stepper(method, workload, config)
    stepper.step()  # the first step allocates the momentum buffers; count a later one
    return count_flops(stepper.step) / (2 * batch_size * width * width)


def mlp_phase_units(*, depth: int, width: int = 512, batch_size: int = 32) -> dict[str, float]:
    """Products in each phase of double backprop on the bias-free MLP, counted by ``FlopCounterMode``, in units
    of one (batch × width) @ (width × width) product: ``forward`` (L), ``backward`` — the gradient, built as a
    graph with ``create_graph=True`` (2L − 1) — and ``double backward``, the Hessian-vector product H·g back
    through that graph (6L − 4). Their sum is DB's 9L − 5."""
    import torch

    workload = make_workload("mlp", depth=depth, width=width, batch_size=batch_size)
    params = list(workload.model.parameters())
    unit = 2 * batch_size * width * width
    box: dict[str, Any] = {}

    def forward() -> None:
        box["loss"] = workload.loss_fn(workload.model(workload.inputs), workload.targets)

    def backward() -> None:
        box["grads"] = torch.autograd.grad(box["loss"], params, create_graph=True)

    def double_backward() -> None:
        torch.autograd.grad(box["grads"], params, grad_outputs=[g.detach() for g in box["grads"]])

    phases = {"forward": forward, "backward": backward, "double backward": double_backward}
    return {name: count_flops(fn) / unit for name, fn in phases.items()}
