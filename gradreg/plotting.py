"""The book's one plot style, and one colour per method so every chapter draws them alike."""

from __future__ import annotations

import matplotlib as mpl

#: One colour per method, used by every chapter (colour-blind-safe Okabe-Ito palette).
METHOD_COLORS: dict[str, str] = {
    "sgd": "#000000",
    "gd": "#000000",
    "double": "#0072B2",
    "forward": "#D55E00",
    "backward": "#009E73",
    "central": "#CC79A7",
    "sam": "#E69F00",
    "flooding": "#56B4E9",
    "theory": "#7F7F7F",
}

#: Display names for the methods, as the book writes them.
METHOD_LABELS: dict[str, str] = {
    "sgd": "SGD",
    "gd": "GD",
    "double": "DB-GR",
    "forward": "F-GR",
    "backward": "B-GR",
    "central": "C-GR",
    "sam": "SAM",
    "flooding": "flooding",
    "theory": "theory",
}

STYLE: dict[str, object] = {
    "figure.figsize": (6.0, 3.6),
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.8,
    "axes.prop_cycle": mpl.cycler(color=list(METHOD_COLORS.values())[2:] + ["#000000"]),
}


def use_style() -> None:
    """Apply the book's matplotlib style (PNG figures: nbval does not compare them, SVG would differ per run)."""
    mpl.rcParams.update(STYLE)


def draw_double_backprop_graph(ax, depth: int = 3) -> int:
    """Draw the computational graph of one gradient of a ``depth``-layer MLP and what double backprop adds.

    Rows: the forward pass u_l = W_l h_{l-1} (top), the backward pass δ_l = φ'(u_l) ⊙ W_{l+1}ᵀ δ_{l+1}
    (middle) and the weight gradients ∂L/∂W_l = δ_l h_{l-1}ᵀ (bottom), all feeding the penalty ½‖∇L‖².
    Solid arrows are matrix products; returns their number, 3·depth − 1 (one gradient). Double backprop
    differentiates ½‖∇L‖² back through every node drawn, which is why it costs about three gradients.
    """
    from matplotlib.patches import FancyArrowPatch

    pos: dict[str, tuple[float, float]] = {"h0": (0, 3)}
    for layer in range(1, depth + 1):
        pos[f"u{layer}"] = (layer, 3)
        pos[f"d{layer}"] = (layer, 2)
        pos[f"W{layer}"] = (layer, 1)
    pos["L"] = (depth + 1, 3)
    pos["P"] = ((depth + 1) / 2, 0)
    labels = {"h0": "$x$", "L": "$L$", "P": r"$\frac{1}{2}\|\nabla L\|^2$"}
    for layer in range(1, depth + 1):
        labels[f"u{layer}"] = f"$u_{layer}$"
        labels[f"d{layer}"] = rf"$\delta_{layer}$"
        labels[f"W{layer}"] = rf"$\partial W_{layer}$"

    products = 0

    def arrow(a: str, b: str, product: bool, color: str = "black") -> None:
        nonlocal products
        products += product
        ax.add_patch(FancyArrowPatch(
            pos[a], pos[b], arrowstyle="-|>", mutation_scale=12, shrinkA=13, shrinkB=13, color=color,
            linestyle="-" if product else (0, (3, 3)), linewidth=1.4 if product else 1.0,
        ))

    for layer in range(1, depth + 1):
        arrow("h0" if layer == 1 else f"u{layer - 1}", f"u{layer}", True)  # u_l = W_l φ(u_{l-1})
    arrow(f"u{depth}", "L", False)
    arrow("L", f"d{depth}", False)
    for layer in range(depth, 1, -1):
        arrow(f"d{layer}", f"d{layer - 1}", True)  # δ_{l-1} = φ'(u_{l-1}) ⊙ W_lᵀ δ_l
    for layer in range(1, depth + 1):
        arrow(f"d{layer}", f"W{layer}", True)  # ∂W_l = δ_l h_{l-1}ᵀ
        arrow("h0" if layer == 1 else f"u{layer - 1}", f"W{layer}", False, "0.65")  # ... reads h_{l-1}
        arrow(f"W{layer}", "P", False, METHOD_COLORS["double"])
    for name, (x, y) in pos.items():
        ax.text(x, y, labels[name], ha="center", va="center", fontsize=11,
                bbox={"boxstyle": "round,pad=0.35", "fc": "white", "ec": METHOD_COLORS["double"] if name == "P"
                      else "0.3"})
    for y, text in [(3, "forward"), (2, "backward"), (1, "weight gradients")]:
        ax.text(-0.6, y, text, ha="right", va="center", fontsize=9, color="0.35")
    ax.set_xlim(-2.2, depth + 1.5)
    ax.set_ylim(-0.6, 3.6)
    ax.set_axis_off()
    return products
