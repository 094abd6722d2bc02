"""Models used by the chapters and the benchmarks."""

from __future__ import annotations

from torch import nn


def mlp(
    in_features: int, width: int, depth: int, out_features: int, *, bias: bool = True,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """A ``depth``-layer perceptron: ``depth`` linear layers of ``width`` units with ``activation`` between them."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    sizes = [in_features] + [width] * (depth - 1) + [out_features]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < depth - 1:
            layers.append(activation())
    return nn.Sequential(*layers)
