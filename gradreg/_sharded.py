"""GR on FSDP2 (``torch.distributed.fsdp.fully_shard``): the perturbed point written into the local shards.

FSDP2 keeps each parameter as a DTensor sharded over the ranks (dim 0) and all-gathers a layer from the shards'
local storage just before it runs, so the single-process engine's trick of pointing ``p.data`` at a buffer that
holds θ + δ is never seen by the forward. Here a step instead

* keeps θ's local shard in one shard-sized buffer per parameter (``buffer``, as the single-process engine keeps the
  point), writes θ + s·δ into the local shards in place and copies θ back from the buffer after the last pass
  (bit for bit, also on rollback);
* computes δ = ε g, ε g/‖g‖ or ε T²g/‖Tg‖ from the local shards of the reduce-scattered gradient (the mean over the
  ranks, as under DDP), with the norms all-reduced over the mesh: the step is the single-process step on the
  ranks' batches together;
* back-propagates with a plain ``backward(seed)`` (``torch.autograd.backward(..., inputs=params)`` on sharded
  parameters silently computes nothing: the forward uses FSDP's unsharded copies, not the DTensors), and lets FSDP
  accumulate each pass into the sharded ``.grad``; groups with γ = 0 get their gradient at θ back afterwards;
* agrees on failure: each rank's finiteness flags (every pass's loss, g, d) are all-reduced once (MIN), so every
  rank rolls back, or none, and all name the same pass.

Refused, with the reason, before anything changes: ``method="double"`` (FSDP2 reduce-scatters gradients outside
autograd, so they carry no graph, and ``torch.autograd.grad`` on the sharded parameters returns None), local
perturbation (every rank all-gathers the same shards: a perturbation of its own would need a full copy of the
parameters on each rank), parameters that are not all sharded by ``fully_shard`` on one 1-D mesh (HSDP, tensor
parallelism, plain tensors beside DTensors), FSDP2 without gradient sync (``set_requires_gradient_sync(False)``,
seen after the first pass) and a module set to ``set_reshard_after_backward(False)`` (its next forward would reuse
the unsharded layers and never see θ + δ; refused before it runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from gradreg._checks import ParamGroup
from gradreg._perturb import NORM_FLOOR, kept
from gradreg.methods import STENCILS, coefficients
from gradreg.replay import Replay


def is_sharded(groups: Sequence[ParamGroup]) -> bool:
    """Whether any parameter is a DTensor (FSDP2 and other sharded parameters)."""
    return any(type(p).__name__ == "DTensor" for group in groups for p in group.params)


def _check(params: list[Tensor], method: str, local: bool) -> dist.ProcessGroup:
    """The mesh's process group, if the parameters are FSDP2's on one 1-D mesh and the step is possible."""
    if method == "double":
        raise NotImplementedError(
            "method='double' with FSDP2 (fully_shard) parameters: FSDP2 reduce-scatters the gradients outside "
            "autograd, so they carry no graph to differentiate again (torch.autograd.grad on the sharded "
            "parameters returns None). Use method='forward', 'backward' or 'central'")
    if local:
        raise NotImplementedError(
            "local_perturbation=True with FSDP2 (fully_shard) parameters: every rank all-gathers the same shards, "
            "so a perturbation of each rank's own would need a full copy of the parameters on every rank. Use the "
            "global perturbation (the default), or DistributedDataParallel for SAM's m-sharpness")
    from torch.distributed.tensor import DTensor, Shard

    sample = params[0]
    if not all(isinstance(p, DTensor) and p.device_mesh == sample.device_mesh and tuple(p.placements) == (Shard(0),)
               for p in params) or sample.device_mesh.ndim != 1:
        raise NotImplementedError(
            "params: sharded parameters are supported as FSDP2 makes them: every trainable parameter a DTensor "
            "sharded on dim 0 of one 1-D device mesh (fully_shard every layer and the root). HSDP, tensor "
            "parallelism and plain tensors beside DTensors are not supported")
    return sample.device_mesh.get_group()


class ShardedReplay(Replay):
    """:class:`Replay` for FSDP2 parameters: a plain backward per pass, θ restored into the local shards."""

    def __init__(self, params: Sequence[Tensor], *, closures: Sequence[Callable[[], Tensor]], loss_scale: float):
        super().__init__(params, closures=closures, loss_scale=loss_scale)
        self.kept_theta: list[tuple[Tensor, Tensor]] = []  # (local shard, θ's copy) while the shards hold θ + sδ

    def run_pass(self, inputs: Sequence[Tensor], seed: float = 1.0, *, sync: bool = True) -> Tensor:
        """``.grad += seed·∇L_i`` for every micro-batch, through FSDP's reduce-scatter (``inputs`` unused: every
        parameter receives the gradient); returns Σ_i L_i."""
        self.begin_pass()
        total, scale = None, seed * self.loss_scale
        for i, closure in enumerate(self.closures):
            loss = self.evaluate(closure, i)
            torch.autograd.backward(loss, None if scale == 1.0 else torch.full_like(loss, scale))
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def _pre_hook(self, module: torch.nn.Module, args: object) -> None:
        """Also refuse, before it runs, an FSDP module that keeps its layers unsharded after backward: its next
        forward would reuse them and never gather the perturbed shards."""
        state = getattr(module, "_get_fsdp_state", None)
        group = getattr(state(), "_fsdp_param_group", None) if state is not None else None
        if group is not None and not group.reshard_after_backward:
            raise RuntimeError(
                f"{type(module).__name__} was set to set_reshard_after_backward(False): its next forward reuses the "
                "unsharded parameters, so the perturbed point written into the shards would never be seen. Call "
                "model.set_reshard_after_backward(True) for GR steps"
            )
        super()._pre_hook(module, args)

    def keep_theta(self, buffer: dict[Tensor, Tensor]) -> list[Tensor]:
        """Copy θ's local shards into ``buffer`` (shard-sized); return the shards, now free to be written."""
        with torch.no_grad():
            shards = [p.to_local() for p in self.params]
            copies = [kept(buffer, p).to_local() for p in self.params]
            torch._foreach_copy_(copies, shards)
        self.kept_theta = list(zip(shards, copies))
        return shards

    def end_pass(self, theta: bool = True) -> None:
        """Running statistics as the first pass left them; with ``theta``, θ back into the shards (if they hold a
        perturbed point). Replay's ``p.data = θ`` is harmless here: θ's data is the shards' own storage."""
        if theta and self.kept_theta:
            with torch.no_grad():
                torch._foreach_copy_([s for s, _ in self.kept_theta], [c for _, c in self.kept_theta])
            self.kept_theta = []
        super().end_pass()


def _sum_squares(tensors: list[Tensor]) -> Tensor:
    if not tensors:
        return torch.zeros((), dtype=torch.float64)  # moved to the gradients' device by _global_norm
    return torch.stack([n.double().square() for n in torch._foreach_norm(tensors)]).sum()


def _global_norm(local_squares: Tensor, group: dist.ProcessGroup, like: Tensor) -> Tensor:
    """‖·‖ over every rank's shards: one all-reduce of the local sums of squares."""
    total = local_squares.to(like.device)
    dist.all_reduce(total, group=group)
    return total.sqrt().to(like.dtype)


def _adaptive_scale(shard: Tensor, ndim: int, eta: float) -> Tensor | None:
    """ASAM's T = |θ| + η on weights of two or more dimensions (``ndim``: the full parameter's), None for T = 1."""
    return shard.abs().add_(eta) if ndim >= 2 else None


def perturb(shards: list[Tensor], params: list[Tensor], groups: list[ParamGroup], grads: list[Tensor], sign: float,
            perturbation: str, eta: float, scale: float, group: dist.ProcessGroup) -> None:
    """Shards ← θ + sign·δ in place; ``grads`` are the local shards of scale·g (scale may be negative)."""
    eps = [g.eps for g in groups for _ in g.params]
    with torch.no_grad():
        if perturbation == "raw":
            for shard, grad, e in zip(shards, grads, eps):
                shard.add_(grad, alpha=sign * e / scale)
            return
        direction_sign = 1.0 if scale > 0 else -1.0  # ‖scale·g‖ = |scale|·‖g‖
        if perturbation == "normalized":
            norm = _global_norm(_sum_squares(grads), group, grads[0]).add_(NORM_FLOOR)
            for shard, grad, e in zip(shards, grads, eps):
                shard.addcdiv_(grad, norm, value=sign * direction_sign * e)
            return
        # adaptive: ‖T g‖, one parameter's T at a time
        squares = torch.zeros((), dtype=torch.float64, device=grads[0].device)
        for shard, p, grad in zip(shards, params, grads):
            t = _adaptive_scale(shard, p.ndim, eta)
            squares = squares + _sum_squares([grad if t is None else t * grad])
        norm = _global_norm(squares, group, grads[0]).add_(NORM_FLOOR)
        for shard, p, grad, e in zip(shards, params, grads, eps):
            t = _adaptive_scale(shard, p.ndim, eta)
            step = grad if t is None else t.square_().mul_(grad)
            shard.addcdiv_(step, norm, value=sign * direction_sign * e)


def _locals(tensors: list[Tensor]) -> list[Tensor]:
    return [t.to_local() for t in tensors]


def _stencil(groups: list[ParamGroup], replay: ShardedReplay, perturbation: str, eta: float, method: str,
             buffer: dict[Tensor, Tensor], group: dist.ProcessGroup) -> tuple[list[Tensor], list[Tensor]]:
    """d = (1 − cΣw) g + c Σ_j w_j ∇L(θ + s_j δ) into the sharded ``.grad``; the losses and g's finiteness."""
    from gradreg.engine import _collect
    params, stencil = replay.params, STENCILS[method]
    active, c, weight_g, shared, seed = coefficients(groups, method)  # pass 1 writes seed·g into .grad
    losses = [replay.run_pass(params, seed)]
    if all(p.grad is None for p in params):
        raise RuntimeError("FSDP2 reduce-scattered no gradient into the sharded parameters (was "
                           "set_requires_gradient_sync(False) called?): GR needs every pass's gradient reduced")
    had_grad = [p.grad is not None for p in params]
    with torch.no_grad():  # δ = 0 where no gradient reached a parameter
        grads = [torch.zeros_like(p.to_local()) if p.grad is None else p.grad.to_local() for p in params]
    g_flags = [torch.stack([g.isfinite().all() for g in grads]).all()]
    if not active:
        return losses, g_flags
    shards = replay.keep_theta(buffer)
    perturb(shards, params, groups, grads, stencil[0][0], perturbation, eta, replay.loss_scale * seed, group)
    del grads  # F-GR with γ = ε frees g below
    idle = [p for g in groups if g.gamma == 0 for p in g.params]
    at_theta = [p.grad for p in idle]  # γ = 0: d = g, kept out of the perturbed passes (FSDP would add to it)
    for p in idle:
        p.grad = None
    if shared and weight_g[0] == 0.0:  # d = Σ_j w_j ∇L(θ + s_j δ): g is not needed any more
        for p in params:
            p.grad = None
    elif not shared:  # .grad ← (a_k/c_k)·g per group; the perturbed passes add w_j ∇L_j; then ×c_k
        for g, c_k, a_k in zip(active, c, weight_g):
            torch._foreach_mul_(_locals([p.grad for p in g.params if p.grad is not None]), a_k / c_k)
    for j, (sign, weight) in enumerate(stencil):
        if j:  # θ + s_j δ from θ + s_{j−1} δ, through θ (central: the reflection θ − δ)
            with torch.no_grad():
                torch._foreach_lerp_(shards, [copy for _, copy in replay.kept_theta], 1.0 - sign / stencil[j - 1][0])
        losses.append(replay.run_pass(params, c[0] * weight if shared else weight))
        replay.end_pass(theta=j == len(stencil) - 1)  # θ back in the shards after the last pass
    if not shared:
        for g, c_k in zip(active, c):
            torch._foreach_mul_(_locals([p.grad for p in g.params if p.grad is not None]), c_k)
        for p, grad in zip(idle, at_theta):
            p.grad = grad
    _collect(params, had_grad)  # None only where no pass gave a gradient, as in the single-process engine
    return losses, g_flags


def _agree(method: str, losses: list[Tensor], grads: list[Tensor], g_flags: list[Tensor],
           group: dist.ProcessGroup) -> None:
    """Every rank's flags (each pass's loss, g, d) reduced by MIN in one all-reduce; a NonFiniteError naming the
    first failing pass on every rank if any rank saw a non-finite value."""
    from gradreg.engine import NonFiniteError, pass_name

    d_ok = torch.stack([g_flags[0].new_ones(()), *(g.isfinite().all() for g in _locals(grads))]).all()
    flags = torch.stack([*(loss.detach().isfinite() for loss in losses), *g_flags, d_ok]).to(d_ok.device, torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    ok = [bool(f) for f in flags]
    if all(ok):
        return
    loss_ok, g_ok = ok[:len(losses)], all(ok[len(losses):-1])
    if not loss_ok[0] or not g_ok:
        index, what = 1, "loss" if not loss_ok[0] else "gradient"
    elif not all(loss_ok):
        index, what = loss_ok.index(False) + 1, "loss"
    else:
        index, what = len(losses), "gradient"
    where = f"pass {index} ({pass_name(method, index)})"
    if method == "central" and what == "gradient" and index > 1:
        index, where = 2, "pass 2 or 3 (gradients at θ ± δ)"
    raise NonFiniteError(f"non-finite {what} in {where} of method {method!r} on some rank; the step was undone on "
                         "every rank (shards, .grad, running statistics and RNG are as before)", method=method,
                         pass_index=index, loss=losses[0].detach())


def sharded_direction(closures: list[Callable[[], Tensor]], groups: list[ParamGroup], *, method: str,
                      perturbation: str, eta: float, buffer: dict[Tensor, Tensor] | None, loss_scale: float,
                      local: bool) -> Tensor:
    """:func:`gradreg.engine.gr_direction` for FSDP2 parameters (see the module docstring); returns this rank's
    L(θ). ``.grad`` holds the direction of the ranks' batches together, sharded as FSDP leaves gradients."""
    from gradreg.engine import NonFiniteError, pass_name

    params = [p for g in groups for p in g.params]
    group = _check(params, method, local)
    replay = ShardedReplay(params, closures=closures, loss_scale=loss_scale)
    try:
        losses, g_flags = _stencil(groups, replay, perturbation, eta, method, {} if buffer is None else buffer,
                                   group)
        _agree(method, losses, [p.grad for p in params if p.grad is not None], g_flags, group)
    except NonFiniteError:
        replay.rollback()
        raise
    except BaseException as exc:
        index = max(replay.passes, 1)
        replay.rollback(exc, f"in pass {index} ({pass_name(method, index)}) of method {method!r}")
        raise
    replay.close()
    return losses[0].detach()
