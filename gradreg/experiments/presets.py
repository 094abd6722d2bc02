"""The sweeps of Chapter 5, by name, so that the chapter and ``python -m gradreg.experiments`` run the same runs.

* ``mnist1d``: the CPU scale (the chapter's fast size);
* ``cifar10-short``: what the chapter runs by itself on a GPU (Colab): ``cifar10``'s grid with 5 epochs and
  4000 training images, 45 short runs (minutes on one GPU by our estimate; not timed, no GPU was available to us);
* ``cifar10``: the GPU scale of the paper's recipe, 45 runs of 50 epochs (hours): a command
  (``python -m gradreg.experiments run --preset cifar10 ...``), never started by opening the chapter.
"""

from __future__ import annotations

from gradreg.experiments.config import RunConfig, grid

#: The γ of the paper's Wide-ResNet sweep for its Figure S.3.
PAPER_GAMMA = 0.1


def _mnist1d() -> list[RunConfig]:
    common = dict(dataset="mnist1d", model="mlp", epochs=50, seeds=range(5))
    return (grid(["sgd"], **common) + grid(["double"], gammas=[0.1, 1.0], **common)
            + grid(["forward", "backward"], gammas=[0.1, 1.0], epss=[0.02, 0.1, 0.5], **common))


def _cifar10(**overrides) -> list[RunConfig]:
    common = {"dataset": "cifar10", "model": "resnet18", "epochs": 50, "seeds": range(5), **overrides}
    return (grid(["sgd"], **common) + grid(["double"], gammas=[0.01, 0.1], **common)
            + grid(["forward", "backward"], gammas=[PAPER_GAMMA], epss=[0.02, 0.1, 0.5], **common))


def _cifar10_short() -> list[RunConfig]:
    """The grid of :func:`_cifar10`, short: 5 epochs on the first 4000 training images (five seeds still)."""
    return _cifar10(epochs=5, train_size=4000)


PRESETS = {"mnist1d": _mnist1d, "cifar10-short": _cifar10_short, "cifar10": _cifar10}


def preset(name: str) -> list[RunConfig]:
    """The configs of the sweep ``name``: ``"mnist1d"`` (CPU scale), ``"cifar10-short"`` (what Chapter 5 runs on a
    GPU by itself) or ``"cifar10"`` (the GPU scale, hours)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]()
