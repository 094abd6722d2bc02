"""The GR engine: the one place where gradient-regularization directions are computed.

Gradient regularization (GR) minimizes the penalized loss and follows its gradient

    L̃(θ) = L(θ) + (γ/2)‖∇L(θ)‖²,        ∇L̃(θ) = g + γ H g,        g = ∇L(θ),  H = ∇²L(θ).

``method`` chooses how ``H g`` is obtained:

* ``"double"``   exact, by double backpropagation (differentiate through the gradient);
* ``"forward"``  F-GR, ascent step first:  d = (1 − γ/ε) g + (γ/ε) ∇L(θ + ε g)          (error O(ε));
* ``"backward"`` B-GR, descent step first: d = (1 + γ/ε) g − (γ/ε) ∇L(θ − ε g)          (error O(ε));
* ``"central"``  both:                     d = g + γ [∇L(θ + ε g) − ∇L(θ − ε g)] / (2ε)   (error O(ε²)).

ε > 0 always: the method, not the sign of ε, picks the direction. ``perturbation`` chooses the step that
replaces ε g: ``"raw"`` (ε g, the paper's form), ``"normalized"`` (ε g/‖g‖, the SAM/GNP family, for which the
same combination is the gradient of the penalty γ‖∇L‖) or ``"adaptive"`` (ASAM's ε T²g/‖Tg‖).

How the finite-difference passes are kept honest:

* **Same function in every pass.** The RNG state is saved before the first pass and restored before every
  perturbed pass, so dropout draws the same masks; afterwards the RNG continues from where a single plain
  pass would have left it. BatchNorm (any ``_NormBase`` module in training mode that tracks running stats)
  updates its running statistics in the first pass only: the perturbed passes normalize with batch statistics
  without touching the running ones — exactly one update per step, as in a plain step on θ.
* **Nothing lost.** If the closure raises, returns a non-scalar loss, or any pass yields a non-finite loss or
  gradient, the parameters (bit for bit), their ``.grad``, BatchNorm buffers and the RNG are put back as they
  were before the call and the error names the pass that failed.
* **Lean.** The first gradient lives in ``.grad``; the perturbed parameters are one parameter-sized buffer that
  is swapped in (no copy of θ is made or restored); later passes accumulate into ``.grad`` already scaled so
  that one multiplication completes the combination. Arithmetic is done with ``torch._foreach_*``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.module import register_module_forward_pre_hook

METHODS = ("forward", "backward", "central", "double")
PERTURBATIONS = ("raw", "normalized", "adaptive")
NORM_FLOOR = 1e-12  # added to ‖g‖ in normalized steps, as in SAM implementations

#: What each pass of each method computes, for error messages.
PASS_NAMES: dict[str, tuple[str, ...]] = {
    "forward": ("gradient at θ", "gradient at the ascent point θ + ε·g"),
    "backward": ("gradient at θ", "gradient at the descent point θ − ε·g"),
    "central": ("gradient at θ", "gradient at the ascent point θ + ε·g", "gradient at the descent point θ − ε·g"),
    "double": ("gradient at θ (with its graph)", "Hessian-vector product H·g (double backward)"),
}

# d = post · (pre · g + Σ_j weight_j ∇L(θ_j)),  c = γ/ε, with the perturbed points θ_j = θ + sign_j·step.
# forward:  (1−c) g + c g₊          backward: (1+c) g − c g₋          central: g + (c/2)(g₊ − g₋)
_SIGNS = {"forward": (1.0,), "backward": (-1.0,), "central": (1.0, -1.0)}
_WEIGHTS = {"forward": (1.0,), "backward": (1.0,), "central": (1.0, -1.0)}


def _pre_post(method: str, c: float) -> tuple[float, float]:
    if method == "forward":
        return (1.0 - c) / c, c
    if method == "backward":
        return -(1.0 + c) / c, -c
    return 2.0 / c, c / 2.0  # central


def _scale_seed(method: str, c: float) -> tuple[float, float]:
    """The same d as a·g + b·Σ_j weight_j ∇L(θ_j): .grad ← a·g, then pass j back-propagates the seed b·weight_j.

    Used when every active group has the same c (one seed serves them all): it saves the second multiplication
    over all parameters; a = 1 (central) needs none, and a = 0 (F-GR with γ = ε, unnormalized SAM) lets the
    perturbed pass write its gradient into a fresh .grad instead of accumulating into zeros.
    """
    if method == "forward":
        return 1.0 - c, c
    if method == "backward":
        return 1.0 + c, -c
    return 1.0, c / 2.0  # central


class NonFiniteError(FloatingPointError):
    """A pass produced a non-finite loss or gradient; the step was undone. ``pass_index`` is 1-based."""

    def __init__(self, message: str, *, method: str, pass_index: int, loss: Tensor | None = None):
        super().__init__(message)
        self.method = method
        self.pass_index = pass_index
        self.loss = loss


@dataclass
class ParamGroup:
    """Parameters sharing one GR strength ``gamma`` and one finite-difference step ``eps``."""

    params: list[Tensor]
    gamma: float
    eps: float | None = None


def _check_real(name: str, value: object, *, positive: bool) -> float:
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite number {bound}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def check_config(
    gamma: object, eps: object, method: object, perturbation: object = "raw", *, where: str = ""
) -> None:
    """Raise a clear error, naming the argument and its allowed values, for any bad GR setting."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if perturbation not in PERTURBATIONS:
        raise ValueError(
            f"perturbation must be one of {', '.join(map(repr, PERTURBATIONS))}; got {perturbation!r}"
        )
    _check_real(f"gamma{where}", gamma, positive=False)
    if method != "double":
        if eps is None:
            raise ValueError(
                f"eps{where} is required for method={method!r}: the finite-difference step, a finite number > 0"
            )
        _check_real(f"eps{where}", eps, positive=True)


def _rng_state(devices: Sequence[torch.device]) -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple[Tensor, list[Tensor]], devices: Sequence[torch.device]) -> None:
    torch.set_rng_state(state[0])
    for device, cuda_state in zip(devices, state[1]):
        torch.cuda.set_rng_state(cuda_state, device)


class _StepGuard:
    """Everything one GR step may change, saved so that a failure puts it back exactly.

    While alive it also watches every module call (a global forward pre-hook): in the first pass it snapshots
    the buffers of normalization layers that update running statistics; in replayed (perturbed) passes it
    switches their ``track_running_stats`` off for the pass, so they use batch statistics and update nothing.
    """

    def __init__(self, params: list[Tensor]):
        self.params = params
        self.data = [p.data for p in params]
        self.grads = [p.grad for p in params]
        self.devices = sorted({p.device for p in params if p.device.type == "cuda"}, key=str)
        self.rng_start = _rng_state(self.devices)
        self.rng_after_first: tuple[Tensor, list[Tensor]] | None = None
        self.norm_buffers: dict[torch.nn.Module, list[tuple[Tensor, Tensor]]] = {}
        self.frozen: list[torch.nn.Module] = []
        self.replaying = False
        self.handle = register_module_forward_pre_hook(self._pre_hook)

    def _pre_hook(self, module: torch.nn.Module, args: object) -> None:
        if not (isinstance(module, _NormBase) and module.training and module.track_running_stats):
            return
        if self.replaying:
            module.track_running_stats = False
            self.frozen.append(module)
        elif module not in self.norm_buffers:
            self.norm_buffers[module] = [(b, b.clone()) for b in module.buffers(recurse=False)]

    def start_replay(self) -> None:
        """Before a perturbed pass: same random numbers as the first pass, running statistics frozen."""
        if self.rng_after_first is None:
            self.rng_after_first = _rng_state(self.devices)
        self.replaying = True
        _set_rng_state(self.rng_start, self.devices)

    def end_replay(self) -> None:
        for module in self.frozen:
            module.track_running_stats = True
        self.frozen.clear()

    def restore_data(self) -> None:
        for p, data in zip(self.params, self.data):  # (p.data is a new object on each access: no identity test)
            p.data = data

    def commit(self) -> None:
        """Success: keep the new .grad and the first pass's statistics; the RNG continues as after one pass."""
        self.end_replay()
        if self.rng_after_first is not None:
            _set_rng_state(self.rng_after_first, self.devices)
        self.handle.remove()

    def rollback(self) -> None:
        """Failure: parameters, .grad, normalization buffers and RNG exactly as before the step."""
        self.end_replay()
        self.restore_data()
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        with torch.no_grad():
            for pairs in self.norm_buffers.values():
                for buffer, saved in pairs:
                    buffer.copy_(saved)
        _set_rng_state(self.rng_start, self.devices)
        self.handle.remove()


def _evaluate(closure: Callable[[], Tensor], pass_index: int, method: str) -> Tensor:
    with torch.enable_grad():
        loss = closure()
    where = f"in pass {pass_index} ({PASS_NAMES[method][pass_index - 1]})"
    if not isinstance(loss, Tensor):
        raise TypeError(f"closure must return the loss as a scalar tensor, got {type(loss).__name__} {where}")
    if loss.ndim != 0:
        raise ValueError(f"closure must return a scalar loss, got shape {tuple(loss.shape)} {where}")
    if not loss.requires_grad:
        raise ValueError(
            f"closure returned a loss that does not require grad {where}: it must not detach the loss or "
            "run under torch.no_grad()"
        )
    return loss


def _all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-dim bool tensor (no host sync): every element of every tensor is finite."""
    if not tensors:
        return torch.tensor(True)
    device = tensors[0].device
    if all(t.device.type == "cpu" and not t.is_complex() for t in tensors):
        # On the CPU the max-norm is a slow per-tensor reduction (about 25× slower than aminmax for a
        # 512×512 tensor). min and max in one pass show ±inf, and NaN propagates into both.
        extremes = [e for t in tensors if t.numel() for e in torch.aminmax(t)]
        return torch.stack(extremes).isfinite().all() if extremes else torch.tensor(True)
    maxima = torch._foreach_norm(tensors, math.inf)  # NaN propagates, inf stays inf
    return torch.stack([m.to(device) for m in maxima]).isfinite().all()


def _global_norm(tensors: list[Tensor]) -> Tensor:
    device = tensors[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in torch._foreach_norm(tensors)]))


def _adaptive_scale(param: Tensor, eta: float) -> Tensor:
    """ASAM's T_w = |w| + η for weight matrices and kernels (ndim ≥ 2); biases and norm scales get T = 1."""
    return param.abs().add_(eta) if param.ndim >= 2 else torch.ones_like(param)


def _perturbed_points(
    groups: list[ParamGroup], slices: list[slice], data: list[Tensor], grads: list[Tensor],
    sign: float, perturbation: str, eta: float,
) -> list[Tensor]:
    """New tensors θ + sign·step, with step ε g, ε g/‖g‖ or ε T²g/‖Tg‖ (ε per group, norms over all groups)."""
    points: list[Tensor] = []
    if perturbation == "raw":
        for group, sl in zip(groups, slices):
            points += torch._foreach_add(data[sl], grads[sl], alpha=sign * group.eps)
        return points
    if perturbation == "normalized":
        directions = grads
        denominator = _global_norm(grads).add_(NORM_FLOOR)
    else:  # adaptive
        scales = [_adaptive_scale(p, eta) for p in data]
        scaled = torch._foreach_mul(scales, grads)  # T g
        denominator = _global_norm(scaled).add_(NORM_FLOOR)
        directions = torch._foreach_mul(scaled, scales)  # T² g
    for group, sl in zip(groups, slices):
        step = torch._foreach_mul(directions[sl], sign * group.eps / denominator)
        torch._foreach_add_(step, data[sl])
        points += step
    return points


def _materialize(params: list[Tensor]) -> list[Tensor]:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _note(exc: BaseException, message: str) -> None:
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(message)


def gr_direction(
    closure: Callable[[], Tensor],
    groups: list[ParamGroup],
    *,
    method: str = "forward",
    perturbation: str = "raw",
    adaptive_eta: float = 0.01,
) -> Tensor:
    """Fill each parameter's ``.grad`` with the GR direction d ≈ g + γ H g; return the loss at θ (detached).

    The engine behind :func:`gr_grad` and :class:`gradreg.GR`, for several parameter groups at once. The
    perturbation is one step of all groups together (each with its own ε); each group combines the gradients
    with its own c = γ/ε. Groups with γ = 0 keep d = g, and when every group has γ = 0 no perturbed pass runs.
    """
    for i, group in enumerate(groups):
        check_config(group.gamma, group.eps, method, perturbation, where=f" (param group {i})" * (len(groups) > 1))
    slices, params, start = [], [], 0
    for group in groups:
        slices.append(slice(start, start + len(group.params)))
        params += group.params
        start += len(group.params)
    if not params:
        raise ValueError("params: no parameter requires grad; nothing to regularize")

    guard = _StepGuard(params)
    flags: list[Tensor] = []
    pass_index = 1
    try:
        loss = _evaluate(closure, 1, method)
        if method == "double":
            grads = list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            direction = [g.detach() for g in grads]
            flags.append(loss.isfinite() & _all_finite(direction))
            pass_index = 2
            hvp = list(torch.autograd.grad(grads, params, grad_outputs=direction, allow_unused=True))
            hvp = [torch.zeros_like(p) if h is None else h for h, p in zip(hvp, params)]
            for group, sl in zip(groups, slices):
                torch._foreach_add_(direction[sl], hvp[sl], alpha=group.gamma)
            flags.append(_all_finite(direction))
            for p, d in zip(params, direction):
                p.grad = d
        else:
            for p in params:
                p.grad = None
            torch.autograd.backward(loss, inputs=params)
            grads = _materialize(params)
            flags.append(loss.isfinite() & _all_finite(grads))
            active = [i for i, group in enumerate(groups) if group.gamma != 0]
            if active:
                coefficients = {i: groups[i].gamma / groups[i].eps for i in active}
                active_params = [p for i in active for p in params[slices[i]]]
                # One c for all active groups: scale g once and let the seeds of the perturbed passes apply b.
                # Otherwise: .grad ← pre·g per group, accumulate, then .grad ← post·.grad per group.
                shared = len({coefficients[i] for i in active}) == 1
                scale, seed_scale = _scale_seed(method, coefficients[active[0]]) if shared else (None, 1.0)
                points = None
                for j, (sign, weight) in enumerate(zip(_SIGNS[method], _WEIGHTS[method])):
                    if j == 0:
                        points = _perturbed_points(
                            groups, slices, guard.data, grads, sign, perturbation, adaptive_eta
                        )
                        if not shared:  # .grad ← pre·g, so the later passes accumulate into the combination
                            for i in active:
                                torch._foreach_mul_(grads[slices[i]], _pre_post(method, coefficients[i])[0])
                        elif scale == 0.0:  # d = ∇L(θ₊): the perturbed pass fills a fresh .grad (g is freed)
                            for p in active_params:
                                p.grad = None
                            grads = []
                        elif scale != 1.0:
                            torch._foreach_mul_([g for i in active for g in grads[slices[i]]], scale)
                    else:  # reflect θ + δ into θ − δ through θ (central differences)
                        torch._foreach_lerp_(points, guard.data, 2.0)
                    pass_index = j + 2
                    guard.start_replay()
                    for p, point in zip(params, points):
                        p.data = point
                    perturbed_loss = _evaluate(closure, pass_index, method)
                    seed_value = weight * seed_scale
                    seed = None if seed_value == 1.0 else torch.full_like(perturbed_loss, seed_value)
                    torch.autograd.backward(perturbed_loss, seed, inputs=active_params)
                    guard.restore_data()
                    guard.end_replay()
                    flags.append(perturbed_loss.isfinite())
                if not shared:
                    for i in active:
                        torch._foreach_mul_(grads[slices[i]], _pre_post(method, coefficients[i])[1])
                elif scale == 0.0:
                    grads = _materialize(params)  # zeros where the perturbed pass reached no parameter
                flags.append(_all_finite(grads))
        if not bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
            failed = next(k for k, f in enumerate(flags) if not bool(f))
            pass_index = min(failed + 1, len(PASS_NAMES[method]))
            what = "loss or gradient" if failed == 0 else ("loss" if failed < len(flags) - 1 else "gradient")
            if method == "central" and failed == len(flags) - 1:
                pass_index = 2
                where = "pass 2 or 3 (gradients at θ ± ε·g)"
            else:
                where = f"pass {pass_index} ({PASS_NAMES[method][pass_index - 1]})"
            raise NonFiniteError(
                f"non-finite {what} in {where} of method {method!r}; the step was undone "
                "(parameters, .grad, normalization buffers and RNG are as before)",
                method=method, pass_index=pass_index, loss=loss.detach(),
            )
    except NonFiniteError:
        guard.rollback()
        raise
    except BaseException as exc:
        first_pass_bad = bool(flags) and not bool(flags[0])
        guard.rollback()
        message = (
            f"gradreg: raised in pass {pass_index} ({PASS_NAMES[method][pass_index - 1]}) of method "
            f"{method!r}; parameters, .grad, normalization buffers and RNG were restored."
        )
        if first_pass_bad:
            message += " The gradient at θ (pass 1) was already non-finite."
        if method == "double" and pass_index == 2 and isinstance(exc, RuntimeError):
            message += (
                " Some operations (fused attention kernels, cuDNN RNNs, ...) have no double backward: "
                "method='forward' needs first-order gradients only."
            )
        if isinstance(exc, RuntimeError) and "backward through the graph a second time" in str(exc):
            message += " The closure must return the loss without calling backward() itself."
        _note(exc, message)
        raise
    guard.commit()
    return loss.detach()


def gr_grad(
    closure: Callable[[], Tensor],
    params: Iterable[Tensor],
    *,
    gamma: float,
    eps: float | None = None,
    method: str = "forward",
    perturbation: str = "raw",
    adaptive_eta: float = 0.01,
) -> Tensor:
    """Set ``p.grad`` to the GR direction d ≈ ∇L + γ H∇L for every ``p`` in ``params``; return L(θ).

    ``closure()`` runs the forward pass on one fixed batch and returns the scalar loss; it must not call
    ``backward()`` (the engine differentiates as each method needs). On return the parameters hold θ again.

    * ``method="double"``: d = g + γ H g exactly (double backprop); ``eps`` is unused.
    * ``method="forward"`` (F-GR): d = (1 − γ/ε) g + (γ/ε) ∇L(θ + ε g).
    * ``method="backward"`` (B-GR): d = (1 + γ/ε) g − (γ/ε) ∇L(θ − ε g).
    * ``method="central"``: d = g + γ [∇L(θ + ε g) − ∇L(θ − ε g)] / (2ε).

    ``perturbation="normalized"`` replaces ε g by ε g/‖g‖ (then d ≈ ∇(L + γ‖∇L‖)); ``"adaptive"`` by ASAM's
    ε T²g/‖Tg‖ with T = |θ| + ``adaptive_eta`` on weights of two or more dimensions.
    Dropout masks are replayed identically in every pass; BatchNorm running statistics are updated once (in
    the first pass). On an exception or a non-finite value in any pass, everything is restored and the error
    (:class:`NonFiniteError` for non-finite values) names the pass.
    """
    params = [p for p in params if p.requires_grad]
    return gr_direction(
        closure, [ParamGroup(params, gamma, eps)], method=method, perturbation=perturbation,
        adaptive_eta=adaptive_eta,
    )
