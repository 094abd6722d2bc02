"""gradreg.plotting: the style reads the one vocabulary, log axes get plain labels, and the drawing of double
backprop draws as many matrix products as autograd's FLOP counter finds in one DB step."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.patches import FancyArrowPatch
from torch.utils.flop_counter import FlopCounterMode

from gradreg import methods, plotting

matplotlib.use("Agg")


def _drawn_products(ax) -> int:
    """Solid arrows that stand for a matrix product, counted on the canvas (not taken from the return value)."""
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    solid = [p for p in arrows if p.get_linestyle() == "-"]
    assert all(p.get_gid() == "product" for p in solid) and all(p.get_gid() in plotting.ARROW_STYLES for p in arrows)
    return len(solid)


def _db_matmul_units(depth: int, n: int = 6, batch: int = 4) -> tuple[int, int]:
    """Matrix products of one gradient recorded with create_graph=True, and of DB's extra backward pass, counted
    by torch's FLOP counter on a bias-free tanh MLP whose every product costs 2·batch·n² FLOPs."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(n, n, bias=False) for _ in range(depth)]
    net = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Tanh())][:-1]).double()
    x, y = torch.randn(batch, n, dtype=torch.float64), torch.randint(n, (batch,))
    params = list(net.parameters())
    unit = 2 * batch * n * n
    with FlopCounterMode(display=False) as first:
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), params, create_graph=True)
    with FlopCounterMode(display=False) as second:
        torch.autograd.grad(grads, params, grad_outputs=[g.detach() for g in grads])
    return first.get_total_flops() // unit, second.get_total_flops() // unit


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_double_backprop_graph_figure_counts_3l_minus_1_and_6l_minus_4_products(depth):
    fig, axes = plt.subplots(1, 2)
    counts = plotting.draw_double_backprop_graph(axes, depth)
    drawn = (_drawn_products(axes[0]), _drawn_products(axes[1]))
    plt.close(fig)
    assert (counts.gradient, counts.double_backward) == drawn == (3 * depth - 1, 6 * depth - 4)
    assert counts.total == 9 * depth - 5
    assert drawn == _db_matmul_units(depth), "the drawing disagrees with torch's FLOP counter"


def test_double_backprop_graph_has_a_legend_per_panel_for_every_arrow_style():
    fig, axes = plt.subplots(1, 2)
    plotting.draw_double_backprop_graph(axes, 3)
    for ax in axes:
        legend = ax.get_legend()
        assert legend is not None
        drawn = {(p.get_gid(), matplotlib.colors.to_hex(p.get_edgecolor())) for p in ax.patches
                 if isinstance(p, FancyArrowPatch)}
        explained = {(h.get_linestyle() == "-", matplotlib.colors.to_hex(h.get_color()))
                     for h in legend.legend_handles}
        assert len(legend.legend_handles) == len(drawn) >= 2, "one legend entry per kind and colour of arrow"
        assert {(kind == "product", color) for kind, color in drawn} == explained
    plt.close(fig)


def test_double_backprop_graph_rejects_bad_arguments_by_name():
    fig, ax = plt.subplots()
    with pytest.raises(TypeError, match="axes must be two matplotlib Axes"):
        plotting.draw_double_backprop_graph(ax, 3)
    fig2, axes = plt.subplots(1, 2)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="depth must be an integer >= 1"):
            plotting.draw_double_backprop_graph(axes, bad)
    plt.close(fig)
    plt.close(fig2)


def test_style_cycle_is_built_from_the_one_vocabulary():
    assert not hasattr(plotting, "METHOD_COLORS") and not hasattr(plotting, "METHOD_LABELS")
    plotting.use_style()
    cycle = [c for c in matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]]
    assert cycle[:4] == [methods.COLORS[m] for m in ("double", "forward", "backward", "central")]
    assert set(cycle) <= set(methods.COLORS.values())


def test_plain_log_ticks_label_a_short_log_axis_with_plain_numbers():
    fig, ax = plt.subplots()
    ax.set_yscale("log")
    ax.plot([1, 2], [0.6, 2.3])
    plotting.plain_log_ticks(ax.yaxis, [0.5, 1, 2])
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    minor = [t.get_text() for t in ax.yaxis.get_minorticklabels() if t.get_text()]
    assert labels == ["0.5", "1", "2"] and minor == []
    with pytest.raises(ValueError, match="ticks must be a non-empty list of positive numbers"):
        plotting.plain_log_ticks(ax.yaxis, [0, 1])
    plt.close(fig)


def test_smallest_text_is_the_smallest_font_drawn():
    plotting.use_style()
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4], label="curve")
    ax.legend(fontsize=7)
    ax.set_title("title", fontsize=14)
    assert plotting.smallest_text(fig) == (7.0, "curve")
    fig2, ax2 = plt.subplots()
    ax2.set_axis_off()  # hidden axes draw no tick labels
    ax2.text(0.5, 0.5, "only", fontsize=13)
    assert plotting.smallest_text(fig2) == (13.0, "only")
    plt.close(fig)
    plt.close(fig2)


def test_figure_png_records_the_smallest_font_and_the_dpi():
    import base64
    import io

    from PIL import Image

    fig, ax = plt.subplots(dpi=100)
    ax.plot([1, 2], [3, 4], label="curve")
    ax.legend(fontsize=6.5)
    image = Image.open(io.BytesIO(base64.b64decode(plotting.figure_png(fig))))
    plt.close(fig)
    assert image.text[plotting.PNG_KEYS["smallest"]] == "6.5"
    assert image.text[plotting.PNG_KEYS["dpi"]] == "100"
    assert image.text[plotting.PNG_KEYS["which"]] == "curve"
