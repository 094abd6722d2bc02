"""The GR engine: the one place where gradient-regularization directions are computed.

GR minimizes L̃(θ) = L(θ) + (γ/2)‖∇L(θ)‖² and follows ∇L̃ = g + γHg (g = ∇L(θ), H = ∇²L(θ)). ``method``
chooses how Hg is obtained: ``"double"`` exactly, by double backpropagation, or one row of the finite-difference
stencil of :mod:`gradreg.methods` (c = γ/ε, δ the perturbation):

    d = (1 − c Σ_j w_j) g + c Σ_j w_j ∇L(θ + s_j δ)
    forward  (s, w) = (+1, +1):            d = (1 − c) g + c ∇L(θ + δ)               error O(ε)
    backward (s, w) = (−1, −1):            d = (1 + c) g − c ∇L(θ − δ)               error O(ε)
    central  (s, w) = (+1, ½), (−1, −½):   d = g + c [∇L(θ + δ) − ∇L(θ − δ)] / 2     error O(ε²)

δ = ε g (``perturbation="raw"``, the paper's step), ε g/‖g‖ (``"normalized"``: SAM, GNP) or ε T²g/‖Tg‖
(``"adaptive"``: ASAM). All passes of a step run in one :class:`gradreg.replay.Replay`: same dropout masks,
running statistics updated once, the closure's manners checked, and everything restored if a pass fails.

For speed, every coefficient rides on a backward seed: pass 1 back-propagates (1 − cΣw)·L, so ``.grad`` holds
(1 − cΣw)·g at once (F-GR with γ = ε: g is freed instead, one buffer less), and pass j back-propagates c·w_j·L,
so its gradient accumulates into ``.grad`` already weighted (each seed saves one sweep over the parameters,
measured 0.6 % of an F-GR step on the benchmark's depth-8 MLP). The seed may be negative (c > 1): the
perturbation divides by it, sign included (``gradreg._perturb.perturbed_point``). The perturbed point is one
buffer swapped in for θ, which is never written; row j's point is reached from row j − 1's. Groups with
different c: .grad ← ((1 − c_kΣw)/c_k)·g, seeds w_j, then ×c_k. Finiteness is checked once, on d, which every
pass's non-finite values reach; the failing pass is looked for only then. :mod:`gradreg.reference` computes the
same directions the plain way; the tests compare the two over every combination of options.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.autograd.profiler import record_function

from gradreg._checks import ParamGroup, as_params, checked_groups
from gradreg._perturb import kept, perturbed_point
from gradreg._sharded import is_sharded, sharded_direction  # issue 25: FSDP2
from gradreg.methods import METHODS, PERTURBATIONS, STENCILS, coefficients
from gradreg.replay import Replay

__all__ = ["METHODS", "PERTURBATIONS", "NonFiniteError", "ParamGroup", "gr_direction", "gr_grad", "pass_name"]


class NonFiniteError(FloatingPointError):
    """A pass produced a non-finite loss or gradient; the step was undone. ``pass_index`` is 1-based."""

    def __init__(self, message: str, *, method: str, pass_index: int, loss: Tensor | None = None):
        super().__init__(message)
        self.method, self.pass_index, self.loss = method, pass_index, loss


def pass_name(method: str, index: int) -> str:
    """What pass ``index`` (1-based) of ``method`` computes, for messages."""
    if index == 1:
        return "gradient at θ" + (" (with its graph)" if method == "double" else "")
    if method == "double":
        return "Hessian-vector product H·g (double backward)"
    return f"gradient at θ {'+' if STENCILS[method][index - 2][0] > 0 else '−'} δ"


def _all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor, read without a sync: whether the sums are finite (so are their terms, unless a sum
    overflows — a false alarm that :func:`_exactly_finite` clears on the slow path)."""
    sums = [t.sum() for t in tensors]
    return torch.stack([s.to(sums[0].device) for s in sums]).isfinite().all() if sums else torch.tensor(True)


def _exactly_finite(tensors: Sequence[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _finite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor, read without a sync: whether every element is finite (for g, which d may not carry)."""
    return torch.stack([t.isfinite().all() for t in tensors]).all()


def _collect(params: list[Tensor], had_grad: Sequence[bool] | None = None) -> list[Tensor]:
    """The ``.grad`` tensors the step produced. A parameter that no pass gave a gradient keeps ``.grad = None`` (as
    after a plain backward: the base optimizer skips it); one that had a gradient in some pass gets zeros."""
    for k, p in enumerate(params):
        if p.grad is None and had_grad is not None and had_grad[k]:
            p.grad = torch.zeros_like(p)
        elif p.grad is not None and p.grad.is_sparse:
            raise ValueError("sparse gradients (e.g. nn.Embedding(sparse=True)) are not supported: use sparse=False")
    return [p.grad for p in params if p.grad is not None]


def _scale(grads: list[Tensor | None], factor: float) -> None:
    present = [g for g in grads if g is not None]
    if present:
        torch._foreach_mul_(present, factor)


def _finite_differences(groups: list[ParamGroup], replay: Replay, perturbation: str, eta: float, method: str,
                        buffer: dict[Tensor, Tensor] | None, local: bool):
    """The stencil d = (1 − cΣw) g + c Σ_j w_j ∇L(θ + s_j δ) into ``.grad`` (see the module docstring)."""
    params, stencil = replay.params, STENCILS[method]
    active, c, weight_g, shared, seed = coefficients(groups, method)  # pass 1 writes seed·g into .grad
    with record_function("gradreg:pass1"):  # g, all-reduced unless each worker perturbs with its own
        losses = [replay.run_pass(params, seed, sync=not (local and active))]
    present = _collect(params)  # sparse gradients refused before any perturbation
    if not active:
        return losses, present, [], None
    if replay.ddp is not None and len(active) < len(groups):
        raise ValueError("with ddp, every parameter group needs gamma > 0 (DDP waits for every gradient)")
    inputs = [p for group in active for p in group.params]
    had_grad = [p.grad is not None for p in params]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]  # no gradient: δ = 0 there
    with record_function("gradreg:perturb"):
        out = None if buffer is None else [kept(buffer, p) for p in params]
        point = perturbed_point(groups, replay.data, grads, stencil[0][0], perturbation, eta, out,
                                replay.loss_scale * seed)  # a negative seed (c > 1) keeps its sign in δ
        g_flags = []  # g's finiteness where d does not carry g
        if shared and weight_g[0] == 0.0:  # d = Σ_j w_j ∇L(θ + s_j δ): free g before the perturbed pass
            g_flags.append(_all_finite(grads))  # a read-only sweep; a false alarm is cleared by the point below
            for p in params:
                p.grad = None
        if not shared:  # .grad ← (a_k/c_k)·g per group; the perturbed passes add w_j ∇L_j; then ×c_k
            for group, c_k, a_k in zip(active, c, weight_g):
                _scale([p.grad for p in group.params], a_k / c_k)
    for j, (sign, weight) in enumerate(stencil):
        if j:  # θ + s_j δ from θ + s_{j−1} δ, through θ (central: the reflection θ − δ)
            torch._foreach_lerp_(point, replay.data, 1.0 - sign / stencil[j - 1][0])
        with record_function(f"gradreg:pass{j + 2}"):
            replay.swap_in(point)
            losses.append(replay.run_pass(inputs, c[0] * weight if shared else weight, sync=j == len(stencil) - 1))
            replay.end_pass()
    with record_function("gradreg:combine"):
        if not shared:
            for group, c_k in zip(active, c):
                _scale([p.grad for p in group.params], c_k)
        grads = _collect(params, had_grad)
    return losses, grads, g_flags, point  # the point θ + s_1δ is finite exactly when g is


def _refuse_undeclared_ddp(replay: Replay) -> None:
    if replay.ddp is None and replay.ddp_seen is not None:
        raise ValueError(
            "the closure calls a DistributedDataParallel module, but the engine was not given it: DB-GR's double "
            "backward is not synchronised by DDP, so the direction would be each worker's own. Pass the module: "
            "GR(..., ddp=model) (or gr_direction(..., ddp=model))"
        )


def _double_backprop(groups: list[ParamGroup], replay: Replay, local: bool):
    """d = g + γ H g exactly, H g = ∇(g · stop_gradient(g)) for the groups with γ > 0. One closure: g with its
    graph, then the double backward. Micro-batches or DDP: a plain pass gives g (all-reduced unless ``local``),
    then a replayed pass per micro-batch adds γ ∇(g_i · g); DDP averages d at the end."""
    params, scale = replay.params, replay.loss_scale
    gammas = [group.gamma for group in groups for _ in group.params]
    active = [(p, gamma) for p, gamma in zip(params, gammas) if gamma != 0]
    one_graph = len(replay.closures) == 1 and replay.ddp is None
    with record_function("gradreg:pass1"):
        if one_graph:
            losses = [replay.evaluate(replay.closures[0])]
            _refuse_undeclared_ddp(replay)
            first = torch.autograd.grad(losses[0] * scale if scale != 1.0 else losses[0], params, create_graph=True,
                                        allow_unused=True)
            direction = [None if g is None else g.detach() for g in first]
        else:
            losses = [replay.run_pass(params, sync=not local)]
            _refuse_undeclared_ddp(replay)
            direction = [p.grad for p in params]
    present = [d for d in direction if d is not None]
    g_flags = [_finite_flag(present)] if present else []  # exact: d = g + γHg is written over g below
    v = [d if d is None or (one_graph and scale == 1.0) else d / scale if scale != 1.0 else d.clone()
         for d in direction]
    if active:
        replay.begin_pass()  # pass 2: the double backward
        with record_function("gradreg:pass2"):
            for i, closure in enumerate([] if one_graph else replay.closures):
                with replay.no_sync():
                    loss = replay.evaluate(closure, i)
                    loss = loss * scale if scale != 1.0 else loss
                    _add_hvp(direction, torch.autograd.grad(loss, params, create_graph=True, allow_unused=True),
                             v, active, params)
            if one_graph:
                _add_hvp(direction, first, v, active, params)
    if replay.ddp is not None:
        replay.all_reduce_mean([d for d in direction if d is not None])
    for p, d in zip(params, direction):
        p.grad = d
    return losses, _collect(params), g_flags, None


def _add_hvp(direction: list[Tensor | None], grads: Sequence[Tensor | None], v: list[Tensor | None],
             active: list[tuple[Tensor, float]], params: list[Tensor]) -> None:
    """direction_k += γ_k ∇_k(g · v) for the active parameters (H v; zero where g has no graph)."""
    pairs = [(g, u) for g, u in zip(grads, v) if g is not None and g.requires_grad]
    if not pairs:  # the gradient does not depend on θ: H v = 0
        return
    hvp = torch.autograd.grad([g for g, _ in pairs], [p for p, _ in active], [u for _, u in pairs], allow_unused=True)
    where = {id(p): k for k, p in enumerate(params)}
    for (p, gamma), h in zip(active, hvp):
        k = where[id(p)]
        if h is not None:
            direction[k] = h.mul(gamma) if direction[k] is None else direction[k].add_(h, alpha=gamma)


def _raise_if_nonfinite(method: str, losses: list[Tensor], direction: list[Tensor], g_flags: list[Tensor],
                        point: list[Tensor] | None) -> None:
    """One flag, read once; only if it is down, find the first pass whose loss or gradient is non-finite."""
    flag = torch.stack([*(loss.detach().isfinite() for loss in losses), _all_finite(direction), *g_flags]).all()
    if bool(flag):
        return
    loss_ok = [bool(loss.isfinite()) for loss in losses]
    g_ok = _exactly_finite(point) if point is not None else all(bool(f) for f in g_flags)  # DB's flag is exact
    if not loss_ok[0] or not g_ok:
        index, what = 1, "loss" if not loss_ok[0] else "gradient"
    elif not all(loss_ok):
        index, what = loss_ok.index(False) + 1, "loss"
    elif not _exactly_finite(direction):  # a later pass's gradient (g is finite: the point or g's flag showed it)
        index, what = 2 if method == "double" else len(losses), "gradient"
    else:
        return  # a false alarm: a sum overflowed, every element is finite
    where = f"pass {index} ({pass_name(method, index)})"
    if method == "central" and what == "gradient" and index > 1:
        index, where = 2, "pass 2 or 3 (gradients at θ ± δ)"
    raise NonFiniteError(f"non-finite {what} in {where} of method {method!r}; the step was undone (parameters, "
                         ".grad, running statistics and RNG are as before)", method=method, pass_index=index,
                         loss=losses[0].detach())


_NO_DOUBLE_BACKWARD = re.compile(r"derivative for .* is not implemented|double backward|does not support double")


def _closures(closure: object) -> list[Callable[[], Tensor]]:
    closures = list(closure) if isinstance(closure, (list, tuple)) else [closure]
    if not closures or not all(callable(c) for c in closures):
        raise TypeError(f"closure must be a callable that returns the loss (or a non-empty list of them), got "
                        f"{closure!r:.60}")
    return closures


def _hint(exc: BaseException, method: str, index: int) -> str:
    """What the user can do, when the cause is known: a double backward that some kernel lacks."""
    if method == "double" and index == 2 and _NO_DOUBLE_BACKWARD.search(str(exc)):
        return (" An operation in the model has no double backward (fused attention kernels, cuDNN RNNs, ...): "
                "method='forward' needs first-order gradients only.")
    return ""


def _eager_if_compiled(method: str) -> contextlib.AbstractContextManager:
    """DB-GR differentiates the gradient's graph again, which torch.compile's graphs cannot (AOTAutograd has no
    double backward): with ``method="double"``, compiled modules run eagerly."""
    if method == "double" and "torch._dynamo" in sys.modules:
        if hasattr(torch.compiler, "set_stance"):
            return torch.compiler.set_stance("force_eager")
        return sys.modules["torch._dynamo"].config.patch(disable=True)  # torch < 2.6 has no set_stance
    return contextlib.nullcontext()


def gr_direction(closure: Callable[[], Tensor] | Sequence[Callable[[], Tensor]], groups: Sequence[ParamGroup], *,
                 method: str = "forward", perturbation: str = "raw", adaptive_eta: float = 0.01,
                 buffer: dict[Tensor, Tensor] | None = None, loss_scale: float = 1.0,
                 ddp: torch.nn.Module | None = None, local_perturbation: bool = False) -> Tensor:
    """Fill each parameter's ``.grad`` with the GR direction d ≈ g + γHg; return L(θ), detached.

    The engine behind :func:`gr_grad` and :class:`gradreg.GR`, for several parameter groups (each with its own
    γ and ε; one joint perturbation; γ = 0 keeps d = g). ``closure`` may be a list of closures, one per
    micro-batch, whose losses add up to the step's loss: g is accumulated over all of them, then each
    perturbed pass runs over all of them again. ``buffer`` (a dict the caller keeps) holds the perturbed point
    between calls. ``loss_scale`` multiplies every back-propagated loss (``.grad`` then holds loss_scale·d).
    ``ddp``: the DistributedDataParallel module, synchronised only where needed; ``local_perturbation`` perturbs
    each worker with its own gradient instead of the all-reduced one.
    """
    groups = checked_groups(groups, method, perturbation, adaptive_eta)
    if is_sharded(groups):  # issue 25: FSDP2 (fully_shard) parameters, perturbed in their local shards
        return sharded_direction(_closures(closure), groups, method=method, perturbation=perturbation,
                                 eta=adaptive_eta, buffer=buffer, loss_scale=loss_scale, local=local_perturbation)
    replay = Replay([p for group in groups for p in group.params], closures=_closures(closure),
                    loss_scale=loss_scale, ddp=ddp)
    try:
        with _eager_if_compiled(method):
            outcome = (_double_backprop(groups, replay, local_perturbation) if method == "double" else
                       _finite_differences(groups, replay, perturbation, adaptive_eta, method, buffer,
                                           local_perturbation))
        with record_function("gradreg:check"):
            _raise_if_nonfinite(method, *outcome)
    except NonFiniteError:
        replay.rollback()
        raise
    except BaseException as exc:
        index = max(replay.passes, 1)
        where = f"in pass {index} ({pass_name(method, index)}) of method {method!r}"
        replay.rollback(exc, where, _hint(exc, method, index))
        raise
    with record_function("gradreg:restore"):
        replay.close()
    return outcome[0][0].detach()


def gr_grad(closure: Callable[[], Tensor] | Sequence[Callable[[], Tensor]], params: Iterable[Tensor], *,
            gamma: float, eps: float | None = None, method: str = "forward", perturbation: str = "raw",
            adaptive_eta: float = 0.01) -> Tensor:
    """Set ``p.grad`` to the GR direction d ≈ ∇L + γ H∇L for every ``p`` in ``params``; return L(θ).

    ``closure()`` runs the forward pass on one fixed batch and returns the scalar loss; it must not call
    ``zero_grad()`` or ``backward()`` (the engine differentiates as each method needs). For gradient accumulation,
    pass a list of closures, one per micro-batch, whose losses add up to the batch loss. On return the parameters
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
