"""The sweeps of Chapter 5, by name, so that the chapter and ``python -m gradreg.experiments`` run the same runs.

* ``mnist1d``: the CPU scale (the chapter's fast size);
* ``cifar10``: the GPU scale (the chapter's full size).
"""

from __future__ import annotations

from gradreg.experiments.config import RunConfig, grid

#: The γ of the paper's Wide-ResNet sweep for its Figure S.3.
PAPER_GAMMA = 0.1


def _mnist1d() -> list[RunConfig]:
    common = dict(dataset="mnist1d", model="mlp", epochs=50, seeds=range(5))
    return (grid(["sgd"], **common) + grid(["double"], gammas=[0.1, 1.0], **common)
            + grid(["forward", "backward"], gammas=[0.1, 1.0], epss=[0.02, 0.1, 0.5], **common))


def _cifar10() -> list[RunConfig]:
    common = dict(dataset="cifar10", model="resnet18", epochs=50, seeds=range(5))
    return (grid(["sgd"], **common) + grid(["double"], gammas=[0.01, 0.1], **common)
            + grid(["forward", "backward"], gammas=[PAPER_GAMMA], epss=[0.02, 0.1, 0.5], **common))


PRESETS = {"mnist1d": _mnist1d, "cifar10": _cifar10}


def preset(name: str) -> list[RunConfig]:
    """The configs of the sweep ``name``: ``"mnist1d"`` (CPU scale) or ``"cifar10"`` (GPU scale)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]()
