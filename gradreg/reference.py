"""The GR direction written the plain way: the oracle of the tests, shown in Chapter 1 beside the paper.

    d_k = (1 − c_k Σ_j w_j) g_k + c_k Σ_j w_j ∇_k L(θ + s_j δ),   c_k = γ_k/ε_k    (finite differences)
    d_k = g_k + γ_k (H g)_k                                                       (``method="double"``)

with g = ∇L(θ), the rows (s_j, w_j) of :data:`gradreg.methods.STENCILS`, k the parameter group, and δ spanning
every group: δ_k = ε_k g_k (raw), ε_k g_k/‖g‖ (normalized) or ε_k T_k²g_k/‖Tg‖ (adaptive, T = |θ| + η on
tensors of two or more dimensions, 1 elsewhere), ‖·‖ over all groups plus 10⁻¹².

Nothing here is fast: every gradient comes from ``torch.autograd.grad``, each point θ + s_jδ is built from θ,
and nothing is reused between rows. It uses the one semantics the fast engine (:mod:`gradreg.engine`) promises,
written out: a pass evaluates every closure (micro-batch) and adds their gradients; every pass after the first
draws the random numbers the first pass drew for each micro-batch and starts from the buffers (running
statistics, power-iteration vectors) of ``modules`` as they were before the step; afterwards the buffers and the
generator are as the first pass left them and θ is as before. A parameter without a gradient in any pass gets
``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gradreg._checks import ParamGroup
from gradreg.methods import STENCILS

Closures = Sequence[Callable[[], Tensor]]


def _grad(loss: Tensor, params: list[Tensor], **kwargs) -> list[Tensor | None]:
    return list(torch.autograd.grad(loss, params, allow_unused=True, **kwargs))


def _add(a: list[Tensor | None], b: list[Tensor | None], scale: float = 1.0) -> list[Tensor | None]:
    """a + scale·b, where None is a zero."""
    return [x if y is None else scale * y if x is None else x + scale * y for x, y in zip(a, b)]


class _Pass:
    """Evaluates the closures as the k-th pass of a step: replayed random numbers and buffers after the first."""

    def __init__(self, closures: Closures, modules: Sequence[torch.nn.Module]):
        self.closures, self.buffers = list(closures), [b for m in modules for b in m.buffers()]
        self.before = [b.clone() for b in self.buffers]
        self.rng: list[Tensor] = []
        self.after: list[Tensor] | None = None

    def losses(self) -> list[Tensor]:
        replay = bool(self.rng)
        if replay:
            for b, v in zip(self.buffers, self.before):
                b.data.copy_(v)
        out = []
        for i, closure in enumerate(self.closures):
            if replay:
                torch.set_rng_state(self.rng[i])
            else:
                self.rng.append(torch.get_rng_state())
            with torch.enable_grad():
                out.append(closure())
        if not replay:
            self.after, self.rng_after = [b.clone() for b in self.buffers], torch.get_rng_state()
        return out

    def finish(self) -> None:
        for b, v in zip(self.buffers, self.after):
            b.data.copy_(v)
        torch.set_rng_state(self.rng_after)


def _step(groups: Sequence[ParamGroup], g: list[Tensor | None], params: list[Tensor], perturbation: str,
          eta: float) -> list[Tensor]:
    """δ, one tensor per parameter."""
    g = [torch.zeros_like(p) if x is None else x for x, p in zip(g, params)]
    eps = [group.eps for group in groups for _ in group.params]
    if perturbation == "raw":
        return [e * x for e, x in zip(eps, g)]
    t = [p.detach().abs() + eta if p.ndim >= 2 and perturbation == "adaptive" else torch.ones_like(p) for p in params]
    norm = torch.sqrt(sum(((ti * x) ** 2).sum() for ti, x in zip(t, g))) + 1e-12
    return [e * ti**2 * x / norm for e, ti, x in zip(eps, t, g)]


def reference_direction(closures: Callable[[], Tensor] | Closures, groups: Sequence[ParamGroup], *, method: str,
                        perturbation: str = "raw", adaptive_eta: float = 0.01,
                        modules: Sequence[torch.nn.Module] = ()) -> list[Tensor | None]:
    """The GR direction d of ``groups`` (see the module docstring), one tensor (or None) per parameter, in order.

    ``closures``: one closure or a list, one per micro-batch, each returning its loss (the step's loss is their
    sum). ``modules``: the modules whose buffers every pass must start from (e.g. ``[model]``).
    """
    closures = list(closures) if isinstance(closures, (list, tuple)) else [closures]
    params = [p for group in groups for p in group.params]
    gammas = [group.gamma for group in groups for _ in group.params]
    run = _Pass(closures, modules)
    losses = run.losses()
    if method == "double":  # H g = ∇(g · stop_gradient(g)), summed over the micro-batches
        first = _grad(sum(losses), params, create_graph=True)
        g = [None if x is None else x.detach() for x in first]
        used = [(x, v) for x, v in zip(first, g) if x is not None and x.requires_grad]
        hg = _grad([x for x, _ in used], params, grad_outputs=[v for _, v in used]) if used else [None] * len(g)
        d = [x if h is None else gamma * h if x is None else x + gamma * h for x, h, gamma in zip(g, hg, gammas)]
    else:
        g = _grad(sum(losses), params)
        delta, theta = _step(groups, g, params, perturbation, adaptive_eta), [p.detach().clone() for p in params]
        c = [group.gamma / group.eps for group in groups for _ in group.params]
        rows = STENCILS[method]
        total = [None] * len(params)
        for s, w in rows:
            with torch.no_grad():
                for p, t, dp in zip(params, theta, delta):
                    p.copy_(t + s * dp)
            total = _add(total, _grad(sum(run.losses()), params), w)
            with torch.no_grad():
                for p, t in zip(params, theta):
                    p.copy_(t)
        a = [1 - ck * sum(w for _, w in rows) for ck in c]  # the weight of g
        d = [x if gamma == 0 else _add([None if x is None else ak * x], [y], ck)[0]
             for x, y, ak, ck, gamma in zip(g, total, a, c, gammas)]
    run.finish()
    return d
