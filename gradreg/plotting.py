"""The book's one plot style, and one colour per method so every chapter draws them alike."""

from __future__ import annotations

import matplotlib as mpl

#: One colour per method, used by every chapter (colour-blind-safe Okabe-Ito palette).
METHOD_COLORS: dict[str, str] = {
    "sgd": "#000000",
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
    "axes.prop_cycle": mpl.cycler(color=list(METHOD_COLORS.values())[1:] + ["#000000"]),
}


def use_style() -> None:
    """Apply the book's matplotlib style (PNG figures: nbval does not compare them, SVG would differ per run)."""
    mpl.rcParams.update(STYLE)
