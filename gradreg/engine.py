"""The GR engine: the one place where gradient-regularization directions are computed.

GR minimizes L̃(θ) = L(θ) + (γ/2)‖∇L(θ)‖² and follows ∇L̃ = g + γHg (g = ∇L(θ), H = ∇²L(θ)). ``method``
chooses how Hg is obtained: ``"double"`` exactly, by double backpropagation, or one row of the finite-difference
stencil of :mod:`gradreg.methods` (c = γ/ε, δ the perturbation):

    d = (1 − c Σ_j w_j) g + c Σ_j w_j ∇L(θ + s_j δ)
    forward  (s, w) = (+1, +1):            d = (1 − c) g + c ∇L(θ + δ)               error O(ε)
    backward (s, w) = (−1, −1):            d = (1 + c) g − c ∇L(θ − δ)               error O(ε)
    central  (s, w) = (+1, ½), (−1, −½):   d = g + c [∇L(θ + δ) − ∇L(θ − δ)] / 2     error O(ε²)

δ = ε g (``perturbation="raw"``, the paper's step), ε g/‖g‖ (``"normalized"``: SAM, GNP) or ε T²g/‖Tg‖
(``"adaptive"``: ASAM). All passes of a step run in one :class:`gradreg._replay.Replay`: same dropout masks,
running statistics updated once, the closure's manners checked, and everything restored if a pass fails.

For speed: g lives in ``.grad``, scaled once to (1 − cΣw)·g (central: no scaling; F-GR with γ = ε: g is freed,
one buffer less); pass j back-propagates the seed c·w_j, so its gradient accumulates into ``.grad`` weighted;
the perturbed point is one buffer swapped in for θ, which is never written. Groups with different c: .grad ←
((1 − c_kΣw)/c_k)·g, seeds w_j, then ×c_k. Finiteness is checked once, on d, which every pass's non-finite
values reach; the failing pass is looked for only when that check fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.profiler import record_function

from gradreg._checks import as_params, check_config
from gradreg._replay import Replay
from gradreg.methods import METHODS, PERTURBATIONS, STENCILS

__all__ = ["METHODS", "PERTURBATIONS", "NonFiniteError", "ParamGroup", "gr_direction", "gr_grad", "pass_name"]

NORM_FLOOR = 1e-12  # added to ‖g‖ in normalized steps, as in SAM implementations


class NonFiniteError(FloatingPointError):
    """A pass produced a non-finite loss or gradient; the step was undone. ``pass_index`` is 1-based."""

    def __init__(self, message: str, *, method: str, pass_index: int, loss: Tensor | None = None):
        super().__init__(message)
        self.method, self.pass_index, self.loss = method, pass_index, loss


@dataclass
class ParamGroup:
    """Parameters sharing one GR strength ``gamma`` and one finite-difference step ``eps``."""

    params: list[Tensor]
    gamma: float
    eps: float | None = None


def pass_name(method: str, index: int) -> str:
    """What pass ``index`` (1-based) of ``method`` computes, for messages."""
    if index == 1:
        return "gradient at θ" + (" (with its graph)" if method == "double" else "")
    if method == "double":
        return "Hessian-vector product H·g (double backward)"
    return f"gradient at θ {'+' if STENCILS[method][index - 2][0] > 0 else '−'} δ"


def _checked(groups: Sequence[ParamGroup], method: str, perturbation: str, eta: object) -> list[ParamGroup]:
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


def _all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor, read without a sync: whether the sums are finite (so are their terms, unless a sum
    overflows — a false alarm that :func:`_exactly_finite` clears on the slow path)."""
    sums = [t.sum() for t in tensors]
    return torch.stack([s.to(sums[0].device) for s in sums]).isfinite().all() if sums else torch.tensor(True)


def _exactly_finite(tensors: Sequence[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _global_norm(tensors: list[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([n.to(tensors[0].device) for n in torch._foreach_norm(tensors)]))


def _adaptive_scale(param: Tensor, eta: float) -> Tensor:
    """ASAM's T_w = |w| + η for weight matrices and kernels (ndim ≥ 2); biases and norm scales get T = 1."""
    return param.abs().add_(eta) if param.ndim >= 2 else torch.ones_like(param)


def _perturbed_point(groups: list[ParamGroup], data: list[Tensor], grads: list[Tensor], sign: float,
                     perturbation: str, eta: float, out: list[Tensor] | None) -> list[Tensor]:
    """θ + sign·δ, δ = ε g, ε g/‖g‖ or ε T²g/‖Tg‖ (ε per group, norms over all groups), in ``out`` if given."""
    directions, denominator = grads, None
    if perturbation == "normalized":
        denominator = _global_norm(grads).add_(NORM_FLOOR)
    elif perturbation == "adaptive":
        scales = [_adaptive_scale(p, eta) for p in data]
        scaled = torch._foreach_mul(scales, grads)  # T g
        denominator = _global_norm(scaled).add_(NORM_FLOOR)
        directions = torch._foreach_mul(scaled, scales)  # T² g
    factors = [sign * group.eps if denominator is None else sign * group.eps / denominator
               for group in groups for _ in group.params]
    if out is None:
        if denominator is None and len({*factors}) == 1:
            return torch._foreach_add(data, directions, alpha=factors[0])
        out = [torch.empty_like(x) for x in data]
    for o, x, v, f in zip(out, data, directions, factors):
        torch.mul(v, f, out=o).add_(x) if isinstance(f, Tensor) else torch.add(x, v, alpha=f, out=o)
    return out


def _kept(buffer: dict[Tensor, Tensor], p: Tensor) -> Tensor:
    """The tensor ``buffer`` keeps for ``p`` between steps (made anew if ``p`` changed shape, dtype or device)."""
    b = buffer.get(p)
    if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
        b = buffer[p] = torch.empty_like(p, requires_grad=False)
    return b


def _materialize(params: list[Tensor]) -> list[Tensor]:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif p.grad.is_sparse:
            raise ValueError("sparse gradients (e.g. nn.Embedding(sparse=True)) are not supported: use sparse=False")
    return [p.grad for p in params]


def _finite_differences(closure: Callable[[], Tensor], groups: list[ParamGroup], replay: Replay,
                        perturbation: str, eta: float, method: str, buffer: list[Tensor] | None):
    """The stencil d = (1 − cΣw) g + c Σ_j w_j ∇L(θ + s_j δ) into ``.grad`` (see the module docstring)."""
    params, stencil = replay.params, STENCILS[method]
    with record_function("gradreg:pass1"):
        losses = [replay.evaluate(closure)]
        torch.autograd.backward(losses[0], inputs=params)
    grads = _materialize(params)
    active = [group for group in groups if group.gamma != 0]
    if not active:
        return losses, grads, [], None
    c = [group.gamma / group.eps for group in active]
    shared = len(set(c)) == 1
    inputs = [p for group in active for p in group.params]
    with record_function("gradreg:perturb"):
        out = None if buffer is None else [_kept(buffer, p) for p in params]
        point = _perturbed_point(groups, replay.data, grads, stencil[0][0], perturbation, eta, out)
        g_flags = []  # g's finiteness where d does not carry g
        for group, c_k in zip(active, c):
            factor = 1.0 - c_k * sum(w for _, w in stencil)  # the weight of g in d
            factor = factor if shared else factor / c_k
            if shared and factor == 0.0:  # d = Σ_j w_j ∇L(θ + s_j δ): free g before the perturbed pass
                g_flags.append(torch.stack([p.grad.isfinite().all() for p in group.params]).all())
                for p in group.params:
                    p.grad = None
            elif factor != 1.0:
                torch._foreach_mul_([p.grad for p in group.params], factor)
    for j, (sign, weight) in enumerate(stencil):
        if j:  # θ + s_j δ from θ + s_0 δ, through θ (central: the reflection θ − δ)
            torch._foreach_lerp_(point, replay.data, 1.0 - sign / stencil[0][0])
        with record_function(f"gradreg:pass{j + 2}"):
            replay.swap_in(point)
            losses.append(replay.evaluate(closure))
            seed = c[0] * weight if shared else weight
            torch.autograd.backward(losses[-1], None if seed == 1.0 else torch.full_like(losses[-1], seed),
                                    inputs=inputs)
            replay.end_pass()
    with record_function("gradreg:combine"):
        if not shared:
            for group, c_k in zip(active, c):
                torch._foreach_mul_([p.grad for p in group.params], c_k)
        grads = _materialize(params)
    return losses, grads, g_flags, point  # the point θ + s_1δ is finite exactly when g is


def _double_backprop(closure: Callable[[], Tensor], groups: list[ParamGroup], replay: Replay):
    """d = g + γ H g exactly: g with its graph, then H g = ∇(g · stop_gradient(g)) for the groups with γ > 0."""
    params = replay.params
    with record_function("gradreg:pass1"):
        losses = [replay.evaluate(closure)]
        grads = torch.autograd.grad(losses[0], params, create_graph=True, allow_unused=True)
    direction = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
    g_flags = [_all_finite(direction)]
    gammas = [group.gamma for group in groups for _ in group.params]
    active = [(p, d, gamma) for p, d, gamma in zip(params, direction, gammas) if gamma != 0]
    pairs = [(g, d) for g, d in zip(grads, direction) if g is not None and g.requires_grad]
    if active and pairs:  # without pairs the gradient does not depend on θ: H g = 0
        replay.passes += 1  # pass 2, the double backward (no closure call)
        with record_function("gradreg:pass2"):
            hvp = torch.autograd.grad([g for g, _ in pairs], [p for p, _, _ in active], [d for _, d in pairs],
                                      allow_unused=True)
        with record_function("gradreg:combine"):
            for (_, d, gamma), h in zip(active, hvp):
                if h is not None:
                    d.add_(h, alpha=gamma)
    for p, d in zip(params, direction):
        p.grad = d
    return losses, _materialize(params), g_flags, None


def _raise_if_nonfinite(method: str, losses: list[Tensor], direction: list[Tensor], g_flags: list[Tensor],
                        point: list[Tensor] | None) -> None:
    """One flag, read once; only if it is down, find the first pass whose loss or gradient is non-finite."""
    flag = torch.stack([*(loss.detach().isfinite() for loss in losses), _all_finite(direction), *g_flags]).all()
    if bool(flag):
        return
    loss_ok = [bool(loss.isfinite()) for loss in losses]
    g_ok = all(bool(f) for f in g_flags) and (point is None or _exactly_finite(point))
    if not loss_ok[0] or not g_ok:
        index, what = 1, "loss" if not loss_ok[0] else "gradient"
    elif not all(loss_ok):
        index, what = loss_ok.index(False) + 1, "loss"
    elif not _exactly_finite(direction):  # a perturbed pass's gradient (g is finite: the point showed it)
        index, what = len(losses), "gradient"
    else:
        return  # a false alarm: a sum overflowed, every element is finite
    where = f"pass {index} ({pass_name(method, index)})"
    if method == "central" and what == "gradient" and index > 1:
        index, where = 2, "pass 2 or 3 (gradients at θ ± δ)"
    raise NonFiniteError(f"non-finite {what} in {where} of method {method!r}; the step was undone (parameters, "
                         ".grad, running statistics and RNG are as before)", method=method, pass_index=index,
                         loss=losses[0].detach())


_NO_DOUBLE_BACKWARD = re.compile(r"derivative for .* is not implemented|double backward|does not support double")


def gr_direction(closure: Callable[[], Tensor], groups: Sequence[ParamGroup], *, method: str = "forward",
                 perturbation: str = "raw", adaptive_eta: float = 0.01, buffer: dict[Tensor, Tensor] | None = None,
                 ) -> Tensor:
    """Fill each parameter's ``.grad`` with the GR direction d ≈ g + γHg; return L(θ), detached.

    The engine behind :func:`gr_grad` and :class:`gradreg.GR`, for several parameter groups at once: the
    perturbation is one step of all groups together (each with its own ε), each group combines the gradients
    with its own c = γ/ε, and groups with γ = 0 keep d = g. ``buffer``, a dict kept by the caller between
    calls, holds the perturbed point (one tensor per parameter) instead of a fresh allocation in every call.
    """
    if not callable(closure):
        raise TypeError(f"closure must be a callable that returns the loss, got {type(closure).__name__}")
    groups = _checked(groups, method, perturbation, adaptive_eta)
    replay = Replay([p for group in groups for p in group.params])
    try:
        if method == "double":
            outcome = _double_backprop(closure, groups, replay)
        else:
            outcome = _finite_differences(closure, groups, replay, perturbation, float(adaptive_eta), method, buffer)
        with record_function("gradreg:check"):
            _raise_if_nonfinite(method, *outcome)
    except NonFiniteError:
        replay.rollback()
        raise
    except BaseException as exc:
        hint = ""
        if method == "double" and replay.passes == 2 and _NO_DOUBLE_BACKWARD.search(str(exc)):
            hint = (" An operation in the model has no double backward (fused attention kernels, cuDNN RNNs, ...): "
                    "method='forward' needs first-order gradients only.")
        index = max(replay.passes, 1)
        replay.rollback(exc, f"in pass {index} ({pass_name(method, index)}) of method {method!r}.{hint}")
        raise
    with record_function("gradreg:restore"):
        replay.close()
    return outcome[0][0].detach()


def gr_grad(closure: Callable[[], Tensor], params: Iterable[Tensor], *, gamma: float, eps: float | None = None,
            method: str = "forward", perturbation: str = "raw", adaptive_eta: float = 0.01) -> Tensor:
    """Set ``p.grad`` to the GR direction d ≈ ∇L + γ H∇L for every ``p`` in ``params``; return L(θ).

    ``closure()`` runs the forward pass on one fixed batch and returns the scalar loss; it must not call
    ``zero_grad()`` or ``backward()`` (the engine differentiates as each method needs). On return the parameters
    hold θ again, bit for bit.

    * ``method="double"``: d = g + γ H g exactly (double backprop); ``eps`` is not used.
    * ``method="forward"`` (F-GR): d = (1 − γ/ε) g + (γ/ε) ∇L(θ + ε g).
    * ``method="backward"`` (B-GR): d = (1 + γ/ε) g − (γ/ε) ∇L(θ − ε g).
    * ``method="central"``: d = g + γ [∇L(θ + ε g) − ∇L(θ − ε g)] / (2ε).

    ``perturbation="normalized"`` replaces ε g by ε g/‖g‖ (then d ≈ ∇(L + γ‖∇L‖)); ``"adaptive"`` by ASAM's
    ε T²g/‖Tg‖ with T = |θ| + ``adaptive_eta`` on weights of two or more dimensions. Parameters that do not
    require grad are left alone; a parameter listed twice is an error. Dropout masks are replayed identically in
    every pass; running statistics are updated once (in the first pass). On an exception or a non-finite value in
    any pass, everything is restored and the error (:class:`NonFiniteError` for non-finite values) names the pass.
    """
    return gr_direction(closure, [ParamGroup(as_params(params), gamma, eps)], method=method,
                        perturbation=perturbation, adaptive_eta=adaptive_eta)
