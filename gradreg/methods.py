"""One vocabulary for the whole package: the GR methods, their finite-difference stencil, labels and colours.

Every finite-difference method is one row of a stencil. With c = γ/ε and δ the perturbation (ε g for the
paper's raw step, ε g/‖g‖ normalized, ε T²g/‖Tg‖ adaptive), the direction is

    d = (1 − c Σ_j w_j) g + c Σ_j w_j ∇L(θ + s_j δ)

    forward  (F-GR, ascent first):   (s, w) = (+1, +1)              d = (1 − c) g + c ∇L(θ + δ)
    backward (B-GR, descent first):  (s, w) = (−1, −1)              d = (1 + c) g − c ∇L(θ − δ)
    central:                         (+1, +½), (−1, −½)             d = g + c [∇L(θ + δ) − ∇L(θ − δ)] / 2

and ``double`` computes d = g + γ H g exactly by double backpropagation. The engine (torch) and the diagonal
linear network (:mod:`gradreg.dln`, numpy) both read :data:`STENCILS`; the chapters, the benchmark and the plots
read :data:`LABELS` and :data:`COLORS`.
"""

from __future__ import annotations

#: How H g is computed, exactly (``"double"``) or by one of the finite-difference stencils.
METHODS = ("forward", "backward", "central", "double")

#: The step δ that replaces ε g, the paper's raw step, SAM's normalized one or ASAM's adaptive one.
PERTURBATIONS: tuple[str, ...] = ("raw", "normalized", "adaptive")

#: The rows (s_j, w_j) of each finite-difference method, which evaluates ∇L at θ + s_j δ and weighs it by w_j.
STENCILS: dict[str, tuple[tuple[float, float], ...]] = {
    "forward": ((+1.0, +1.0),),
    "backward": ((-1.0, -1.0),),
    "central": ((+1.0, +0.5), (-1.0, -0.5)),
}

def coefficients(groups: list, method: str) -> tuple[list, list[float], list[float], bool, float]:
    """The stencil's coefficients for ``groups`` (objects with ``gamma`` and ``eps``): the groups with γ > 0, their
    c = γ/ε, the weight 1 − cΣw of g in d, whether one c serves every group (then the backward seeds carry all the
    weights), and the seed of pass 1 (1 − cΣw if so and non-zero, else 1)."""
    active = [group for group in groups if group.gamma != 0]
    c = [group.gamma / group.eps for group in active]
    weight_g = [1.0 - c_k * sum(w for _, w in STENCILS[method]) for c_k in c]
    shared = len(set(c)) == 1 and len(active) == len(groups)
    return active, c, weight_g, shared, weight_g[0] if shared and weight_g[0] != 0.0 else 1.0


#: Display names of every method and reference the book draws (GR methods, baselines, ascent–descent family).
LABELS: dict[str, str] = {
    "sgd": "SGD",
    "gd": "GD",
    "two-passes": "two passes",
    "double": "DB-GR",
    "func-db": "DB (torch.func)",
    "forward": "F-GR",
    "backward": "B-GR",
    "central": "C-GR",
    "sam": "SAM",
    "usam": "USAM",
    "plain-sam": "plain SAM",
    "flooding": "flooding",
    "theory": "theory",
}

#: One colour per method, the same in every chapter (colour-blind-safe Okabe–Ito palette).
COLORS: dict[str, str] = {
    "sgd": "#000000",
    "gd": "#000000",
    "two-passes": "#999999",
    "double": "#0072B2",
    "func-db": "#003F6B",
    "forward": "#D55E00",
    "backward": "#009E73",
    "central": "#CC79A7",
    "sam": "#E69F00",
    "usam": "#B07A00",
    "plain-sam": "#F0E442",
    "flooding": "#56B4E9",
    "theory": "#555555",
}
