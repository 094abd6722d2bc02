"""The resumable runner: train one :class:`RunConfig` for its epochs, checkpoint every epoch, write the result.

A results folder holds one ``<run_id>.json`` per finished run (its config, seed, gradreg's version and the
per-epoch metrics) and, while a run is under way, its ``<run_id>.ckpt.pt``. :func:`run` returns the stored
result when its JSON exists (nothing is retrained), and resumes from the checkpoint when one exists. The
checkpoint holds the model, the optimizer (momentum buffers and GR's settings), the learning-rate schedule and
every random-number state (torch's, CUDA's, numpy's, Python's and the generator of the data order and the
augmentation), so on a CPU a run that was interrupted and resumed is bit for bit the run that was not.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradreg import data as datasets
from gradreg import models
from gradreg.engine import NonFiniteError
from gradreg.experiments.config import RunConfig
from gradreg.experiments.training import evaluate
from gradreg.flooding import flooded
from gradreg.hessian import top_eigenvalue
from gradreg.optim import GR
from gradreg.runtime import progress, seed_everything

#: Training examples (the first ones) for the final ‖∇L‖ and sharpness: all of MNIST-1D's; 512 CIFAR-10 images,
#: since double backpropagation through ResNet-18 keeps about three graphs' worth of activations.
MEASURE_EXAMPLES = {"mnist1d": 4096, "cifar10": 512}
#: The final sharpness: power iteration with at most this many Hessian–vector products, to this relative tolerance.
SHARPNESS_ITERS, SHARPNESS_TOL = 200, 1e-5
#: Training examples (the first ones, without augmentation) for the training loss and accuracy of every epoch.
EVAL_EXAMPLES = 10_000
EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class RunRecord:
    """A finished run: its config, its metrics per epoch (one list per metric: ``history["test_acc"][k]`` after
    epoch k + 1), the final measurements and how it ran (versions, device, threads, seconds)."""

    config: RunConfig
    history: dict[str, list[float]] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "run_id": self.config.run_id, "history": self.history,
                "final": self.final, "meta": self.meta}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RunRecord:
        return cls(RunConfig.from_dict(values["config"]), values["history"], values["final"], values["meta"])

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        return cls.from_json(json.loads(Path(path).read_text()))


def load_results(results: str | Path) -> list[RunRecord]:
    """Every finished run in a results folder, sorted by run id."""
    return [RunRecord.load(p) for p in sorted(Path(results).glob("*.json"))]


@lru_cache(maxsize=2)
def _dataset(name: str, download: bool) -> datasets.Dataset:
    return datasets.mnist1d() if name == "mnist1d" else datasets.cifar10(download=download)


def build_model(config: RunConfig, data: datasets.Dataset) -> nn.Module:
    """The model of ``config`` for the inputs of ``data`` (initialized from torch's global generator)."""
    if config.model == "resnet18":
        return models.resnet18_cifar(data.num_classes)
    if config.model == "cnn1d":
        return models.cnn1d(data.x.shape[-1], config.width, data.num_classes)
    in_features = math.prod(data.x.shape[1:])
    return nn.Sequential(nn.Flatten(), models.mlp(in_features, config.width, config.depth, data.num_classes))


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, wrapped in :class:`gradreg.GR` for the GR methods and SAM."""
    base = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)
    if config.method in ("sgd", "flooding"):
        return base
    if config.method == "sam":
        return GR.sam(base, rho=config.rho)
    return GR(base, gamma=config.gamma, eps=config.eps, method=config.method)


def _cosine(total_steps: int) -> Callable[[int], float]:
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               flood: float | None = None) -> Tensor:
    """One step on the mini-batch (x, y); returns the cross-entropy L at θ before the step (detached).

    GR and SAM get a closure (they differentiate as their method needs); SGD backpropagates L, flooding the
    flooded loss abs(L − b) + b (Ishida et al. 2020, :func:`gradreg.flooding.flooded`).
    """
    if isinstance(optimizer, GR):
        return optimizer.step(lambda: nn.functional.cross_entropy(model(x), y)).detach()
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    (loss if flood is None else flooded(loss, flood)).backward()
    optimizer.step()
    return loss.detach()


def _rng_state() -> dict[str, Any]:
    cuda = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    for d, s in enumerate(state["cuda"]):
        torch.cuda.set_rng_state(s, d)
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


class _Trainer:
    """The state of one run between epochs: what a checkpoint saves and restores."""

    def __init__(self, config: RunConfig, device: torch.device, download: bool):
        self.config, self.device = config, device
        data = _dataset(config.dataset, download)
        if config.train_size is not None:
            if config.train_size > len(data.x):
                raise ValueError(f"train_size={config.train_size} exceeds the {len(data.x)} training examples")
            data = data.subset(config.train_size)
        self.data = data.to(device)
        seed_everything(config.seed)
        self.model = build_model(config, self.data).to(device)
        self.optimizer = build_optimizer(config, self.model)
        base = getattr(self.optimizer, "base_optimizer", self.optimizer)
        self.steps_per_epoch = math.ceil(len(self.data.x) / config.batch_size)
        schedule = _cosine(config.epochs * self.steps_per_epoch) if config.schedule == "cosine" else (lambda t: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(base, schedule)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epoch, self.history, self.seconds, self.diverged = 0, {}, 0.0, False

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                "rng": _rng_state(), "epoch": self.epoch, "history": self.history, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        _set_rng_state(state["rng"])
        self.epoch, self.history, self.seconds = state["epoch"], state["history"], state["seconds"]

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training set in a fresh random order; then the epoch's metrics."""
        start, config, data = time.perf_counter(), self.config, self.data
        lr = self.scheduler.get_last_lr()[0]
        self.model.train()
        order = torch.randperm(len(data.x), generator=self.generator)
        total = torch.zeros((), device=self.device)
        flood = config.flood if config.method == "flooding" else None
        for begin in range(0, len(order), config.batch_size):
            index = order[begin:begin + config.batch_size].to(self.device)
            x, y = data.x[index], data.y[index]
            if config.augment:
                x = datasets.random_crop_flip(x, self.generator)
            try:
                total += train_step(self.model, self.optimizer, x, y, flood) * len(y)
            except NonFiniteError:  # GR found a non-finite loss or gradient and changed nothing: stop here
                total += math.nan
                break
            self.scheduler.step()
        self.epoch += 1
        record = {"epoch": self.epoch, "lr": lr, "batch_loss": float(total) / len(order)}
        self.diverged = not math.isfinite(record["batch_loss"])
        n_eval = min(len(data.x), EVAL_EXAMPLES)
        for prefix, x, y in (("train", data.x[:n_eval], data.y[:n_eval]), ("test", data.x_test, data.y_test)):
            loss, accuracy = evaluate(self.model, x, y) if not self.diverged else (math.nan, math.nan)
            record[f"{prefix}_loss"], record[f"{prefix}_acc"] = loss, accuracy
        self.seconds += time.perf_counter() - start
        record["seconds"] = self.seconds
        for key, value in record.items():
            self.history.setdefault(key, []).append(value)
        return record

    def final(self) -> dict[str, Any]:
        """Last-epoch metrics, and ‖∇L‖ and the top Hessian eigenvalue of L on the first training examples."""
        result: dict[str, Any] = {k: self.history[k][-1] for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
        result.update(diverged=self.diverged, steps=self.epoch * self.steps_per_epoch,
                      skipped_steps=getattr(self.optimizer, "skipped_steps", 0))
        if self.diverged:
            return {**result, "grad_norm": math.nan, "sharpness": math.nan, "sharpness_converged": False}
        n = min(len(self.data.x), MEASURE_EXAMPLES[self.config.dataset])
        x, y = self.data.x[:n], self.data.y[:n]
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.eval()
        closure = lambda: nn.functional.cross_entropy(self.model(x), y)  # noqa: E731
        grads = torch.autograd.grad(closure(), params)
        top = top_eigenvalue(closure, params, iters=SHARPNESS_ITERS, tol=SHARPNESS_TOL, seed=0)
        self.model.train()
        return {**result, "grad_norm": float(torch.sqrt(sum((g * g).sum() for g in grads))),
                "sharpness": top.value, "sharpness_converged": top.converged}


def _json_safe(value: Any) -> Any:
    """Non-finite floats become None (JSON has no NaN); floats keep 7 significant digits (float32 resolution)."""
    if isinstance(value, float):
        return float(f"{value:.7g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def run(
    config: RunConfig,
    results: str | Path,
    *,
    device: str | torch.device | None = None,
    download: bool = False,
    keep_checkpoint: bool = False,
    on_epoch_end: EpochHook | None = None,
    show_progress: bool | None = None,
) -> RunRecord:
    """Train ``config`` and write ``results/<run_id>.json``; return the stored record if that file exists.

    Every epoch ends with a checkpoint ``results/<run_id>.ckpt.pt`` (removed when the run finishes, unless
    ``keep_checkpoint``); a run that finds one resumes from it. ``on_epoch_end(epoch, metrics)`` is called after
    each checkpoint. A run whose loss becomes non-finite stops and is recorded with ``final["diverged"] = True``.
    ``device`` defaults to CUDA when available; ``download`` lets CIFAR-10 be fetched (see
    :func:`gradreg.data.cifar10`).
    """
    from gradreg import __version__

    config = config.resolved()
    folder = Path(results)
    path, checkpoint = folder / f"{config.run_id}.json", folder / f"{config.run_id}.ckpt.pt"
    if path.exists():
        return RunRecord.load(path)
    folder.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    trainer = _Trainer(config, device, download)
    resumed_from = None
    if checkpoint.exists():
        # On the CPU: random-number states must be CPU tensors; load_state_dict moves the rest to the model's device.
        trainer.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        resumed_from = trainer.epoch
    epochs = range(trainer.epoch + 1, config.epochs + 1)
    for epoch in progress(epochs, desc=config.run_id, leave=False, enabled=show_progress):
        metrics = trainer.train_epoch()
        tmp = checkpoint.with_suffix(".tmp")
        torch.save(trainer.state_dict(), tmp)
        tmp.replace(checkpoint)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
        if trainer.diverged:
            break
    meta = {"gradreg": __version__, "torch": torch.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "seconds": trainer.seconds, "resumed_from_epoch": resumed_from}
    record = RunRecord(config, _json_safe(trainer.history), _json_safe(trainer.final()), meta)
    record.save(path)
    if not keep_checkpoint:
        checkpoint.unlink(missing_ok=True)
    return record


def sweep(configs: list[RunConfig], results: str | Path, *, show_progress: bool | None = None,
          **kwargs: Any) -> list[RunRecord]:
    """:func:`run` every config (finished ones are read back, not retrained), with a progress bar over runs."""
    names = [c.run_id for c in configs]
    if len(set(names)) != len(names):
        raise ValueError("configs: the same run appears twice in the sweep")
    return [run(c, results, show_progress=show_progress, **kwargs)
            for c in progress(configs, desc="runs", enabled=show_progress)]
