"""The book's one plot style, plain tick labels on log axes, and the computational graph of double backprop.

Which colour and which name a method gets is not decided here: ``gradreg.methods.COLORS`` and
``gradreg.methods.LABELS`` are the one vocabulary, and the colour cycle below is built from them. This module
imports matplotlib (the ``book`` extra); ``import gradreg`` does not import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gradreg._optional import require
from gradreg.methods import COLORS

mpl = require("matplotlib", extra="book", purpose="gradreg.plotting (the book's figures)")

#: The colour cycle for curves drawn without an explicit colour (the GR methods first, black last).
CYCLE: tuple[str, ...] = tuple(
    COLORS[name] for name in ("double", "forward", "backward", "central", "sam", "flooding", "theory", "gd")
)

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
    "axes.prop_cycle": mpl.cycler(color=list(CYCLE)),
}



#: PNG text keys written into every figure the book's kernel displays (``figure_png``); the browser test reads them.
PNG_KEYS = {"smallest": "gradreg:smallest-font-pt", "dpi": "gradreg:dpi", "which": "gradreg:smallest-text"}


def use_style() -> None:
    """Apply the book's matplotlib style (PNG figures: nbval does not compare them, SVG would differ per run).

    In an IPython kernel with the inline backend, figures are also displayed through :func:`figure_png`, which
    records the smallest font of each figure in its PNG, so that a test can compute the size text has on the page.
    """
    mpl.rcParams.update(STYLE)
    _display_figures_with_font_metadata()


def smallest_text(fig) -> tuple[float, str]:
    """The smallest font size (points) of any text that drawing ``fig`` puts on the canvas (tick labels, legends,
    titles, labels, annotations), and that text; ``(inf, "")`` for a figure that draws no text."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    drawn: list[tuple[float, str]] = []
    renderer = FigureCanvasAgg(fig).get_renderer() if not hasattr(fig.canvas, "get_renderer") else \
        fig.canvas.get_renderer()
    plain = renderer.draw_text

    def record(gc, x, y, s, prop, angle, ismath=False, mtext=None):
        if str(s).strip():
            drawn.append((float(prop.get_size_in_points()), str(s).strip()[:40]))
        return plain(gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)

    renderer.draw_text = record
    try:
        fig.draw(renderer)
    finally:
        del renderer.draw_text
    return min(drawn, key=lambda d: d[0]) if drawn else (float("inf"), "")


def figure_png(fig) -> str | None:
    """The figure as base64 PNG, as IPython's inline backend makes it (``bbox_inches="tight"``, the figure's dpi),
    with :data:`PNG_KEYS` in its text chunks: the smallest font in points, the dpi, and the text that has it."""
    from IPython.core.pylabtools import print_figure

    size, text = smallest_text(fig)
    metadata = {PNG_KEYS["smallest"]: f"{size:g}", PNG_KEYS["dpi"]: f"{fig.dpi:g}",
                PNG_KEYS["which"]: text.encode("latin-1", "replace").decode("latin-1")}
    return print_figure(fig, fmt="png", bbox_inches="tight", base64=True, metadata=metadata)


def _display_figures_with_font_metadata() -> None:
    """Register :func:`figure_png` as the PNG formatter of matplotlib figures in a running IPython kernel with the
    inline backend (a no-op elsewhere), and keep it registered: the inline backend may register its own again."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    ip = get_ipython()
    if ip is None or not hasattr(ip, "display_formatter"):
        return
    try:
        import matplotlib_inline.backend_inline  # noqa: F401  (its import registers its formatter; ours replaces it)
    except ImportError:
        return

    if mpl.get_backend() not in ("inline", "module://matplotlib_inline.backend_inline"):
        return
    from matplotlib.figure import Figure

    def register(*_args) -> None:
        ip.display_formatter.formatters["image/png"].for_type(Figure, figure_png)

    register()
    if not any(getattr(cb, "__name__", "") == "_gradreg_png" for cb in ip.events.callbacks["pre_run_cell"]):
        register.__name__ = "_gradreg_png"
        ip.events.register("pre_run_cell", register)


def plain_log_ticks(axis, ticks: Sequence[float]) -> None:
    """Label a log-scaled ``axis`` (``ax.xaxis`` or ``ax.yaxis``) at ``ticks`` with plain numbers ("0.5", "2").

    Matplotlib's default labels a log axis that spans less than a decade with minor-tick labels such as
    "2×10⁰"; this sets the major ticks explicitly and removes the minor labels.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    if not ticks or any(t <= 0 for t in ticks):
        raise ValueError(f"ticks must be a non-empty list of positive numbers for a log axis, got {list(ticks)!r}")
    axis.set_major_locator(FixedLocator(list(ticks)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


@dataclass(frozen=True)
class GraphProducts:
    """Matrix products drawn by :func:`draw_double_backprop_graph` for an L-layer perceptron.

    ``gradient``: one gradient, 3L − 1 (what ``create_graph=True`` records); ``double_backward``: DB's extra
    backward pass through that graph, 6L − 4; ``total``: one DB step, 9L − 5.
    """

    gradient: int
    double_backward: int

    @property
    def total(self) -> int:
        return self.gradient + self.double_backward


#: Line style per kind of arrow; each arrow's gid is its kind, so tests count the products drawn.
ARROW_STYLES: dict[str, object] = {"product": "-", "elementwise": (0, (3, 3)), "reads": (0, (1, 2))}


class _Graph:
    """Node layout of the gradient graph of a ``depth``-layer MLP on one Axes, and arrows between its nodes."""

    def __init__(self, ax, depth: int, faded: bool = False):
        self.ax, self.depth, self.products = ax, depth, 0
        self.pos: dict[str, tuple[float, float]] = {"h0": (0, 3), "L": (depth + 1, 3), "P": ((depth + 1) / 2, 0)}
        self.labels = {"h0": "$x$", "L": "$L$", "P": r"$\frac{1}{2}\|\nabla L\|^2$"}
        for layer in range(1, depth + 1):
            self.pos |= {f"u{layer}": (layer, 3), f"d{layer}": (layer, 2), f"W{layer}": (layer, 1)}
            self.labels |= {f"u{layer}": f"$u_{layer}$", f"d{layer}": rf"$\delta_{layer}$",
                            f"W{layer}": rf"$\partial W_{layer}$"}
        self.faded = faded

    def arrow(self, a: str, b: str, kind: str, color: str = "black", bend: float = 0.0) -> None:
        """``kind``: "product" (solid, counted), "elementwise" (dashed, no product) or "reads" (dotted grey)."""
        product = kind == "product"
        self.products += product
        from matplotlib.patches import FancyArrowPatch

        patch = FancyArrowPatch(
            self.pos[a], self.pos[b], arrowstyle="-|>", mutation_scale=12, shrinkA=13, shrinkB=13, color=color,
            linestyle=ARROW_STYLES[kind], linewidth=1.4 if product else 1.0, connectionstyle=f"arc3,rad={bend}",
        )
        patch.set_gid(kind)
        self.ax.add_patch(patch)

    def nodes(self, accent: Sequence[str] = ()) -> None:
        """Draw every node; ``accent`` names those drawn in the DB colour (the rest are faded in the DB panel)."""
        for name, (x, y) in self.pos.items():
            color = COLORS["double"] if name in accent else ("0.5" if self.faded else "black")
            edge = COLORS["double"] if name in accent or name == "P" else ("0.75" if self.faded else "0.3")
            self.ax.text(x, y, self.labels[name], ha="center", va="center", fontsize=11, color=color,
                         bbox={"boxstyle": "round,pad=0.35", "fc": "white", "ec": edge})
        rows = [(3, "forward"), (2, "backward"), (1, "weight gradients")] + [(4.1, "into H g")] * bool(accent)
        for y, text in rows:
            self.ax.text(-0.6, y, text, ha="right", va="center", fontsize=9,
                         color=COLORS["double"] if y > 4 else "0.35")
        self.ax.set_xlim(-2.2, self.depth + 1.5)
        self.ax.set_axis_off()

    def h(self, layer: int) -> str:
        """The node holding h_{layer} (x for layer 0; else u_layer, of which h = φ(u) is an elementwise map)."""
        return "h0" if layer == 0 else f"u{layer}"


def _draw_gradient(graph: _Graph) -> None:
    """One gradient: u_l = W_l h_{l-1}; δ_{l-1} = φ'(u_{l-1}) ⊙ W_lᵀ δ_l; ∂W_l = δ_l h_{l-1}ᵀ → ½‖∇L‖²."""
    depth = graph.depth
    for layer in range(1, depth + 1):
        graph.arrow(graph.h(layer - 1), f"u{layer}", "product")  # u_l = W_l h_{l-1}: L products
    graph.arrow(f"u{depth}", "L", "elementwise")
    graph.arrow("L", f"d{depth}", "elementwise")
    for layer in range(depth, 1, -1):
        graph.arrow(f"d{layer}", f"d{layer - 1}", "product")  # δ_{l-1} = φ'(u_{l-1}) ⊙ W_lᵀ δ_l: L − 1 products
    for layer in range(1, depth + 1):
        graph.arrow(f"d{layer}", f"W{layer}", "product")  # ∂W_l = δ_l h_{l-1}ᵀ: L products ...
        graph.arrow(graph.h(layer - 1), f"W{layer}", "reads", "0.6")  # ... which read h_{l-1}
        graph.arrow(f"W{layer}", "P", "elementwise", COLORS["double"])
    graph.nodes()
    graph.ax.set_ylim(-0.6, 3.6)


def _draw_double_backward(graph: _Graph) -> None:
    """DB's extra backward pass: every product A·B of the gradient graph sends one product back to each input
    that depends on θ (two, or one where the input is the data x); the products with W_l add up to (Hg)_{W_l}."""
    depth, db = graph.depth, COLORS["double"]
    for layer in range(1, depth + 1):
        graph.pos[f"H{layer}"], graph.labels[f"H{layer}"] = (layer, 4.1), rf"$W_{layer}$"
    for layer in range(1, depth + 1):  # the seed: the adjoint of ∂W_l is g_l
        graph.arrow("P", f"W{layer}", "elementwise", db)
    for layer in range(1, depth + 1):  # from ∂W_l = δ_l h_{l-1}ᵀ back to δ_l and (except x) to h_{l-1}
        graph.arrow(f"W{layer}", f"d{layer}", "product", db)
        if layer > 1:
            graph.arrow(f"W{layer}", graph.h(layer - 1), "product", db)
    for layer in range(2, depth + 1):  # from δ_{l-1} = φ'(u_{l-1}) ⊙ W_lᵀ δ_l back to δ_l and to W_l
        graph.arrow(f"d{layer - 1}", f"d{layer}", "product", db)
        graph.arrow(f"d{layer - 1}", f"H{layer}", "product", db, bend=0.2)
    for layer in range(depth, 0, -1):  # from u_l = W_l h_{l-1} back to W_l and (except x) to h_{l-1}
        graph.arrow(f"u{layer}", f"H{layer}", "product", db)
        if layer > 1:
            graph.arrow(f"u{layer}", f"u{layer - 1}", "product", db)
    for layer in range(1, depth):  # δ_l reads u_l through φ'(u_l); δ_L reads u_L through the loss
        graph.arrow(f"d{layer}", f"u{layer}", "elementwise", db)
    graph.arrow(f"d{depth}", "L", "elementwise", db)
    graph.arrow("L", f"u{depth}", "elementwise", db)
    graph.nodes(accent=[f"H{layer}" for layer in range(1, depth + 1)])
    graph.ax.set_ylim(-0.6, 4.5)


def draw_double_backprop_graph(axes, depth: int = 3) -> GraphProducts:
    """Draw what double backprop (DB) computes for a ``depth``-layer perceptron u_l = W_l h_{l-1}, h_l = φ(u_l).

    ``axes``: two matplotlib Axes. The first gets the graph of one gradient, which DB records with
    ``create_graph=True``: the forward pass, the backpropagated errors δ_{l-1} = φ'(u_{l-1}) ⊙ W_lᵀ δ_l and the
    weight gradients ∂W_l = δ_l h_{l-1}ᵀ, feeding the penalty ½‖∇L‖²; 3L − 1 matrix products. The second gets
    DB's extra backward pass through that graph, seeded with g: each product sends one product back to each input
    that depends on θ, 6L − 4 in all, and those with W_l add up to H g. Solid arrows are matrix products; each
    panel has a legend. Returns the counts of solid arrows drawn.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1 (the number of layers), got {depth!r}")
    try:
        ax_gradient, ax_double = axes
    except (TypeError, ValueError):
        raise TypeError(
            "axes must be two matplotlib Axes (the gradient graph, DB's extra backward pass), e.g. "
            f"fig, axes = plt.subplots(1, 2); got {axes!r}"
        ) from None
    gradient = _Graph(ax_gradient, depth)
    _draw_gradient(gradient)
    double = _Graph(ax_double, depth, faded=True)
    _draw_double_backward(double)
    _legend(ax_gradient, [("product", "black", f"matrix product ({gradient.products} = 3L − 1)"),
                          ("reads", "0.6", "reads an activation"),
                          ("elementwise", "black", "elementwise, no product"),
                          ("elementwise", COLORS["double"], "summed into the penalty")])
    _legend(ax_double, [("product", COLORS["double"], f"matrix product ({double.products} = 6L − 4)"),
                        ("elementwise", COLORS["double"], "elementwise, no product")])
    return GraphProducts(gradient=gradient.products, double_backward=double.products)


def _legend(ax, entries: list[tuple[str, str, str]]) -> None:
    """A legend with one (kind of arrow, colour, text) entry per line style drawn on ``ax``."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle=ARROW_STYLES[kind], color=color, linewidth=1.4, label=label, gid=kind)
               for kind, color, label in entries]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8,
              handlelength=2.5)
