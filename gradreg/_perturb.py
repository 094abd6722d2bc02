"""The perturbation δ of the finite-difference methods, and where the perturbed point θ + s·δ is written.

    raw         δ = ε g                 (the paper's step)
    normalized  δ = ε g/‖g‖             (SAM, GNP: then the stencil differentiates γ‖∇L‖)
    adaptive    δ = ε T²g/‖Tg‖          (ASAM, T = |θ| + η on weights of two or more dimensions)

ε is per parameter group; the norms run over all groups together.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NORM_FLOOR = 1e-12  # added to ‖g‖ in normalized steps, as in SAM implementations


def _global_norm(tensors: list[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([n.to(tensors[0].device) for n in torch._foreach_norm(tensors)]))


def _adaptive_scale(param: Tensor, eta: float) -> Tensor:
    """ASAM's T_w = |w| + η for weight matrices and kernels (ndim ≥ 2); biases and norm scales get T = 1."""
    return param.abs().add_(eta) if param.ndim >= 2 else torch.ones_like(param)


def perturbed_point(groups: list, data: list[Tensor], grads: list[Tensor], sign: float, perturbation: str,
                    eta: float, out: list[Tensor] | None, scale: float = 1.0) -> list[Tensor]:
    """θ + sign·δ, δ = ε g, ε g/‖g‖ or ε T²g/‖Tg‖ (ε per group, norms over all groups), in ``out`` if given.

    ``grads`` hold scale·g (a loss scale, or the engine's backward seed, which may be negative): the raw step
    divides by ``scale``; the normalized steps divide by ‖scale·g‖ + |scale|·floor and multiply by the sign of
    ``scale``, so that δ is the step of g itself whatever the scale.
    """
    directions, denominator = grads, scale  # raw: δ = ε (scale·g)/scale
    if perturbation == "normalized":
        denominator = _global_norm(grads).add_(abs(scale) * NORM_FLOOR).mul_(math.copysign(1.0, scale))
    elif perturbation == "adaptive":
        scales = [_adaptive_scale(p, eta) for p in data]
        scaled = torch._foreach_mul(scales, grads)  # T g
        denominator = _global_norm(scaled).add_(abs(scale) * NORM_FLOOR).mul_(math.copysign(1.0, scale))
        directions = torch._foreach_mul(scaled, scales)  # T² g
    factors = [sign * group.eps / denominator for group in groups for _ in group.params]  # floats if raw
    if out is None:
        if perturbation == "raw" and len({*factors}) == 1:
            return torch._foreach_add(data, directions, alpha=factors[0])
        out = [torch.empty_like(x) for x in data]
    for o, x, v, f in zip(out, data, directions, factors):
        torch.mul(v, f, out=o).add_(x) if isinstance(f, Tensor) else torch.add(x, v, alpha=f, out=o)
    return out


def kept(buffer: dict[Tensor, Tensor], p: Tensor) -> Tensor:
    """The tensor ``buffer`` keeps for ``p`` between steps (made anew if ``p`` changed shape, dtype or device)."""
    b = buffer.get(p)
    if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
        b = buffer[p] = torch.empty_like(p, requires_grad=False)
    return b
