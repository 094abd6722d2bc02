"""What one training run is: :class:`RunConfig`, its validation, its name on disk, and grids of runs.

The defaults are the recipe of the paper's Wide-ResNet experiments, as far as it is verified (Karakida et al.
2023, appendix): SGD with momentum 0.9, weight decay 10⁻⁴, batch size 128, a cosine learning-rate schedule from
0.1, random crops and horizontal flips for images. What the paper does not say (the number of epochs, the MLP's
depth, whether the cosine is stepped per epoch or per step) is our choice and documented below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: The hyperparameters each algorithm takes (every other one must be left ``None``).
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "double": ("gamma",),
    "forward": ("gamma", "eps"),
    "backward": ("gamma", "eps"),
    "central": ("gamma", "eps"),
    "sam": ("rho",),
    "flooding": ("flood",),
}

#: The values ``RunConfig.method`` accepts: plain SGD, the four GR computations of ``gradreg.METHODS``,
#: SAM and flooding.
ALGORITHMS: tuple[str, ...] = tuple(HYPERPARAMETERS)

DATASETS: tuple[str, ...] = ("mnist1d", "cifar10")
#: The models each data set can train (the MLP flattens images).
MODELS_FOR: dict[str, tuple[str, ...]] = {"mnist1d": ("mlp", "cnn1d"), "cifar10": ("resnet18", "mlp")}
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
#: Model defaults: the MLP's hidden width and number of linear layers (2 = one hidden layer), cnn1d's channels.
DEFAULT_WIDTH = {"mlp": 512, "cnn1d": 32}
DEFAULT_DEPTH = 2


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run depends on; two runs with equal configs compute the same thing.

    Seed ``seed`` fixes the initialization (``torch.manual_seed(seed)`` before the model is built) and the data
    order and augmentation (a ``torch.Generator`` seeded with ``seed``), so runs of different methods with the
    same seed are paired: they differ only in their update direction.

    The learning rate follows lr · ½(1 + cos(π t/T)) over the T = epochs · ⌈n/batch_size⌉ steps (``"cosine"``,
    stepped every mini-batch) or stays at lr (``"constant"``). ``augment=None`` means: crops and flips for
    CIFAR-10, nothing for MNIST-1D (its generator already shifts and scales the signals). ``train_size`` keeps
    the first examples of the training set (for quick runs).
    """

    method: str = "sgd"
    gamma: float | None = None
    eps: float | None = None
    rho: float | None = None
    flood: float | None = None
    seed: int = 0
    dataset: str = "mnist1d"
    model: str = "mlp"
    width: int | None = None
    depth: int | None = None
    epochs: int = 60
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    augment: bool | None = None
    train_size: int | None = None

    def resolved(self) -> RunConfig:
        """This config validated, with the model and augmentation defaults filled in (one name per run)."""
        check(self)
        width = self.width if self.width is not None or self.model == "resnet18" else DEFAULT_WIDTH[self.model]
        depth = self.depth if self.depth is not None or self.model != "mlp" else DEFAULT_DEPTH
        augment = self.dataset == "cifar10" if self.augment is None else self.augment
        floats = {name: None if getattr(self, name) is None else float(getattr(self, name))
                  for name in ("gamma", "eps", "rho", "flood", "lr", "momentum", "weight_decay")}
        return dataclasses.replace(self, width=width, depth=depth, augment=augment, **floats)

    @property
    def setting(self) -> tuple[tuple[str, Any], ...]:
        """The method and its hyperparameters, e.g. (("method", "forward"), ("gamma", 0.1), ("eps", 0.05))."""
        return (("method", self.method),) + tuple((n, getattr(self, n)) for n in HYPERPARAMETERS[self.method])

    @property
    def run_id(self) -> str:
        """The run's file name (readable and unique), made of the data set, model, method, hyperparameters, seed and
        a hash of the whole resolved config."""
        config = self.resolved()
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()
        parts = [config.dataset, config.model, config.method]
        parts += [f"{name}{value:g}" for name, value in config.setting[1:]]
        return "-".join(parts) + f"-seed{config.seed}-{digest[:8]}"

    def label(self) -> str:
        """E.g. ``"forward γ=0.1 ε=0.05"``."""
        symbols = {"gamma": "γ", "eps": "ε", "rho": "ρ", "flood": "b"}
        return " ".join([self.method] + [f"{symbols[n]}={v:g}" for n, v in self.setting[1:]])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown RunConfig fields {unknown}; allowed: {sorted(names)}")
        return cls(**values)


def _choice(name: str, value: object, allowed: Sequence[object], hint: str = "") -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}{hint}")


def _number(name: str, value: object, *, low: float, strict: bool, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or \
            (value <= low if strict else value < low):
        what = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {what} {'>' if strict else '>='} {low:g}, got {value!r}")


def check(config: RunConfig) -> None:
    """Raise ValueError, naming the field and its allowed values, for a config that cannot run."""
    _choice("method", config.method, ALGORITHMS, " (gradreg.experiments.ALGORITHMS)")
    _choice("dataset", config.dataset, DATASETS)
    _choice("model", config.model, MODELS_FOR[config.dataset], f" for dataset={config.dataset!r}")
    _choice("schedule", config.schedule, SCHEDULES)
    needed = HYPERPARAMETERS[config.method]
    for name in ("gamma", "eps", "rho", "flood"):
        value = getattr(config, name)
        if name in needed and value is None:
            raise ValueError(f"method={config.method!r} needs {name} (it takes {', '.join(needed)})")
        if name not in needed and value is not None:
            takers = [m for m, names in HYPERPARAMETERS.items() if name in names]
            raise ValueError(f"{name} applies to method in {tuple(takers)} only; method={config.method!r} takes "
                             f"{', '.join(needed) or 'no hyperparameter'}: leave {name} unset")
        if value is not None:
            _number(name, value, low=0.0, strict=name != "gamma")
    _number("seed", config.seed, low=0, strict=False, integer=True)
    for name in ("epochs", "batch_size"):
        _number(name, getattr(config, name), low=0, strict=True, integer=True)
    _number("lr", config.lr, low=0.0, strict=True)
    _number("momentum", config.momentum, low=0.0, strict=False)
    _number("weight_decay", config.weight_decay, low=0.0, strict=False)
    for name in ("width", "depth", "train_size"):
        if getattr(config, name) is not None:
            _number(name, getattr(config, name), low=0, strict=True, integer=True)
    if config.model == "resnet18" and config.width is not None:
        raise ValueError("width applies to model in ('mlp', 'cnn1d'); resnet18 has fixed widths: leave it unset")
    if config.depth is not None and config.model != "mlp":
        raise ValueError(f"depth applies to model='mlp' only, got model={config.model!r}: leave it unset")
    if config.augment and config.dataset != "cifar10":
        raise ValueError(f"augment applies to dataset='cifar10' (images) only, got dataset={config.dataset!r}")


def grid(
    methods: Iterable[str],
    *,
    gammas: Iterable[float] = (),
    epss: Iterable[float] = (),
    rhos: Iterable[float] = (),
    floods: Iterable[float] = (),
    seeds: Iterable[int] = (0,),
    **common: Any,
) -> list[RunConfig]:
    """Every run of a sweep: for each method, the product of the hyperparameters it takes and the seeds.

    ``grid(["sgd", "forward"], gammas=[0.1], epss=[0.01, 0.1], seeds=[0, 1])`` gives 2 SGD runs and 4 F-GR
    runs; ``common`` holds the other :class:`RunConfig` fields. A method whose hyperparameter list is empty is
    an error.
    """
    values = {"gamma": list(gammas), "eps": list(epss), "rho": list(rhos), "flood": list(floods)}
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must list at least one seed")
    configs = []
    for method in methods:
        _choice("method", method, ALGORITHMS, " (gradreg.experiments.ALGORITHMS)")
        names = HYPERPARAMETERS[method]
        for name in names:
            if not values[name]:
                raise ValueError(f"method={method!r} needs {name}: give at least one value in {name}s")
        for combo in itertools.product(*(values[n] for n in names), seeds):
            config = RunConfig(method=method, seed=combo[-1], **dict(zip(names, combo[:-1])), **common)
            configs.append(config.resolved())
    return configs
