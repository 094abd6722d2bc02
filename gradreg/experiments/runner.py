"""The resumable runner: train one :class:`RunConfig` for its epochs, checkpoint every epoch, write the result.

A results folder holds one ``<run_id>.json`` per finished run (its config, seed, gradreg's version and the
per-epoch metrics) and, while a run is under way, its ``<run_id>.ckpt.pt``. :func:`run` returns the stored
result when its JSON exists (nothing is retrained), and resumes from the checkpoint when one exists. The
checkpoint holds the model, the optimizer (momentum buffers and GR's settings), the learning-rate schedule and
every random-number state (torch's, CUDA's, numpy's, Python's and the generator of the data order and the
augmentation), so on a CPU a run that was interrupted and resumed is bit for bit the run that was not.

Every file is written atomically and verified when read (:mod:`gradreg.experiments.storage`): results and
checkpoints carry a schema version, the run id and the config (results also a checksum); a bad file raises
:class:`~gradreg.experiments.storage.StoredFileError`, or is deleted and retrained with ``retrain_corrupt``. A
process that trains a run holds ``<run_id>.claim``; another one leaves the run for later (:func:`sweep`) or waits
for it (:func:`run`), so several processes can share a folder (``sweep(..., jobs=N)``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
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
from gradreg.experiments.storage import (
    StoredFileError,
    atomic_write,
    atomic_write_text,
    is_stale,
    read_claim,
    read_json,
    release,
    try_claim,
)
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
#: The version of the result and checkpoint formats (results without one are schema 1, gradreg 0.2's).
SCHEMA = 2
#: Seconds between two looks at a run that another process is training.
POLL_SECONDS = 1.0


@dataclass
class RunRecord:
    """A finished run: its config, its metrics per epoch (one list per metric: ``history["test_acc"][k]`` after
    epoch k + 1), the final measurements and how it ran (versions, device, threads, seconds)."""

    config: RunConfig
    history: dict[str, list[float]] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = {"schema": SCHEMA, "config": self.config.to_dict(), "run_id": self.config.run_id,
                "history": self.history, "final": self.final, "meta": self.meta}
        return {**body, "checksum": _checksum(body)}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RunRecord:
        return cls(RunConfig.from_dict(values["config"]), values["history"], values["final"], values["meta"])

    def save(self, path: Path) -> None:
        """Write atomically (a temporary file of this writer's own, then ``os.replace``)."""
        atomic_write_text(path, json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False))

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        """Read and verify ``path``: a :class:`StoredFileError` naming the file if it is not a whole result of the
        run its name says (the checks of ``verified_record``)."""
        return verified_record(Path(path))


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verified_record(path: Path) -> RunRecord:
    """The result stored at ``path``, checked: valid JSON with every part of a result, a valid config whose run id
    is the one stored and the file's name, and (schema 2) the checksum. Results without a ``schema`` field
    (schema 1: gradreg 0.2's, e.g. the stored runs of Chapter 5) are accepted without a checksum."""
    values = read_json(path)
    schema = values.get("schema", 1)
    if schema not in (1, SCHEMA):
        raise StoredFileError(path, f"has schema {schema!r}; this gradreg reads schemas 1 and {SCHEMA}")
    missing = [k for k in ("config", "run_id", "history", "final", "meta") if k not in values]
    if missing or not all(isinstance(values[k], dict) for k in ("config", "history", "final", "meta")):
        raise StoredFileError(path, f"is not a run's result (missing or malformed: {missing or 'a section'})")
    if schema == SCHEMA and values.get("checksum") != _checksum({k: v for k, v in values.items() if k != "checksum"}):
        raise StoredFileError(path, "fails its checksum (edited or damaged since it was written)")
    try:
        record = RunRecord.from_json(values)
        run_id = record.config.run_id
    except (TypeError, ValueError) as exc:
        raise StoredFileError(path, f"holds an invalid config ({exc})") from None
    if values["run_id"] != run_id or path.stem != run_id:
        raise StoredFileError(path, f"holds the result of run {run_id} (stored run id {values['run_id']}), not "
                                    f"of {path.stem}: renamed or copied over")
    return record


def load_results(results: str | Path) -> list[RunRecord]:
    """Every finished run in a results folder, sorted by run id, each verified as :meth:`RunRecord.load` does."""
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


def _say(message: str) -> None:
    print(f"gradreg: {message}", file=sys.stderr, flush=True)


def _read_checkpoint(path: Path, config: RunConfig) -> dict[str, Any]:
    """The checkpoint at ``path`` (``weights_only=True``), checked to be a whole schema-2 checkpoint of ``config``."""
    try:
        # On the CPU: random-number states must be CPU tensors; load_state_dict moves the rest to the model's device.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and EOF errors of every kind: the file is unreadable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StoredFileError(path, f"cannot be read as a checkpoint ({type(exc).__name__}: {first[:200]}; empty, "
                                    "truncated or overwritten?)") from None
    if not isinstance(state, dict) or state.get("schema") != SCHEMA:
        found = state.get("schema") if isinstance(state, dict) else type(state).__name__
        raise StoredFileError(path, f"is not a schema-{SCHEMA} checkpoint of this runner (schema {found!r}; "
                                    "written by an older gradreg or by something else)")
    if state.get("run_id") != config.run_id or state.get("config") != config.to_dict():
        raise StoredFileError(path, f"is the checkpoint of run {state.get('run_id')}, not of {config.run_id} "
                                    "(renamed or copied over): resuming it would record another run's training")
    if not 0 <= state.get("epoch", -1) <= config.epochs:
        raise StoredFileError(path, f"records epoch {state.get('epoch')!r} of a {config.epochs}-epoch run")
    return state


def _stored(path: Path, retrain_corrupt: bool) -> RunRecord | None:
    """The verified result at ``path``, None if there is none; a bad one is deleted when ``retrain_corrupt``."""
    if not path.exists():
        return None
    try:
        return RunRecord.load(path)
    except StoredFileError as exc:
        if not retrain_corrupt:
            raise
        path.unlink(missing_ok=True)
        _say(f"{exc.path}: {exc.problem}: deleted (--retrain-corrupt), training the run again")
    return None


def _resume(config: RunConfig, device: torch.device, download: bool, checkpoint: Path,
            retrain_corrupt: bool) -> tuple[_Trainer, int | None]:
    """A trainer for ``config``, loaded from ``checkpoint`` if there is one, and the epoch it resumes from."""
    trainer = _Trainer(config, device, download)
    if not checkpoint.exists():
        return trainer, None
    try:
        state = _read_checkpoint(checkpoint, config)
        try:
            trainer.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise StoredFileError(checkpoint, f"does not fit this run's model and optimizer ({exc})") from None
    except StoredFileError as exc:
        if not retrain_corrupt:
            raise
        checkpoint.unlink(missing_ok=True)
        _say(f"{exc.path}: {exc.problem}: deleted (--retrain-corrupt), training from the start")
        return _Trainer(config, device, download), None
    return trainer, trainer.epoch


def _train(config: RunConfig, folder: Path, *, device: str | torch.device | None = None, download: bool = False,
           keep_checkpoint: bool = False, on_epoch_end: EpochHook | None = None, show_progress: bool | None = None,
           retrain_corrupt: bool = False) -> RunRecord:
    """Train ``config`` (resuming from its checkpoint) and write its result; the caller holds the run's claim."""
    from gradreg import __version__

    path, checkpoint = folder / f"{config.run_id}.json", folder / f"{config.run_id}.ckpt.pt"
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    trainer, resumed_from = _resume(config, device, download, checkpoint, retrain_corrupt)
    epochs = range(trainer.epoch + 1, config.epochs + 1)
    header = {"schema": SCHEMA, "run_id": config.run_id, "config": config.to_dict()}
    for epoch in progress(epochs, desc=config.run_id, leave=False, enabled=show_progress):
        metrics = trainer.train_epoch()
        state = {**header, **trainer.state_dict()}
        atomic_write(checkpoint, lambda file, state=state: torch.save(state, file))
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


def _attempt(config: RunConfig, folder: Path, retrain_corrupt: bool, **train: Any) -> RunRecord | str:
    """The run's result (stored, or trained now under its claim), or a description of the live process that
    holds its claim."""
    path = folder / f"{config.run_id}.json"
    try:
        record = _stored(path, retrain_corrupt=False)
    except StoredFileError:
        if not retrain_corrupt:
            raise
        record = None  # deleted below, under the run's claim
    if record is not None:
        return record
    folder.mkdir(parents=True, exist_ok=True)
    claim_path = folder / f"{config.run_id}.claim"
    mine, other = try_claim(claim_path)
    if mine is None:
        return other.describe()
    try:
        if other is not None:
            _say(f"{config.run_id}: taking over the stale claim of {other.describe()} (no such process)")
        record = _stored(path, retrain_corrupt)  # finished by another process meanwhile, or corrupt
        return record if record is not None else _train(config, folder, retrain_corrupt=retrain_corrupt, **train)
    finally:
        release(claim_path, mine)


def _wait(config: RunConfig, folder: Path, holder: str) -> None:
    """Until the process that holds the run's claim has finished or died."""
    _say(f"{config.run_id}: being trained by {holder}; waiting for it")
    claim_path, path = folder / f"{config.run_id}.claim", folder / f"{config.run_id}.json"
    while not path.exists():
        claim = read_claim(claim_path)
        if claim is None or is_stale(claim, claim_path):
            return
        time.sleep(POLL_SECONDS)


def run(
    config: RunConfig,
    results: str | Path,
    *,
    device: str | torch.device | None = None,
    download: bool = False,
    keep_checkpoint: bool = False,
    on_epoch_end: EpochHook | None = None,
    show_progress: bool | None = None,
    retrain_corrupt: bool = False,
) -> RunRecord:
    """Train ``config`` and write ``results/<run_id>.json``; return the stored record if that file exists.

    Every epoch ends with a checkpoint ``results/<run_id>.ckpt.pt`` (removed when the run finishes, unless
    ``keep_checkpoint``); a run that finds one resumes from it. ``on_epoch_end(epoch, metrics)`` is called after
    each checkpoint. A run whose loss becomes non-finite stops and is recorded with ``final["diverged"] = True``.
    ``device`` defaults to CUDA when available; ``download`` lets CIFAR-10 be fetched (see
    :func:`gradreg.data.cifar10`).

    Files are written atomically and verified when read: a result or checkpoint that is corrupt or belongs to
    another run raises :class:`StoredFileError` naming it, or, with ``retrain_corrupt``, is deleted and the run
    trained again. While a process trains a run it holds ``results/<run_id>.claim``; a second process asked for
    the same run says so in one line and waits for the result (a claim of a dead process is taken over).
    """
    config, folder = config.resolved(), Path(results)
    train = dict(device=device, download=download, keep_checkpoint=keep_checkpoint, on_epoch_end=on_epoch_end,
                 show_progress=show_progress)
    while not isinstance(outcome := _attempt(config, folder, retrain_corrupt, **train), RunRecord):
        _wait(config, folder, outcome)
    return outcome


def _check_sweep(configs: list[RunConfig], jobs: int) -> list[RunConfig]:
    configs = [c.resolved() for c in configs]
    names = [c.run_id for c in configs]
    if len(set(names)) != len(names):
        raise ValueError("configs: the same run appears twice in the sweep")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1 (worker processes), got {jobs!r}")
    return configs


def sweep(configs: list[RunConfig], results: str | Path, *, show_progress: bool | None = None, jobs: int = 1,
          **kwargs: Any) -> list[RunRecord]:
    """:func:`run` every config (finished ones are read back, not retrained), with a progress bar over runs.

    A run that another process is training is left for later (one line says so) and the next one trained; at the
    end the sweep waits for those. ``jobs > 1`` trains in that many worker processes (each claims runs in turn,
    with ``torch.get_num_threads() // jobs`` threads, at least one): the results are those of one process
    training the runs one after the other at that thread count. ``kwargs`` go to :func:`run`.
    """
    configs, folder = _check_sweep(configs, jobs), Path(results)
    if jobs > 1:
        _parallel(configs, folder, jobs, kwargs)
    retrain = kwargs.pop("retrain_corrupt", False)
    train = {"show_progress": show_progress, **kwargs}
    records: dict[str, RunRecord] = {}
    for config in progress(configs, desc="runs", enabled=show_progress):
        outcome = _attempt(config, folder, retrain, **train)
        if isinstance(outcome, RunRecord):
            records[config.run_id] = outcome
        else:
            _say(f"{config.run_id}: being trained by {outcome}; training the next run first")
    for config in (c for c in configs if c.run_id not in records):
        records[config.run_id] = run(config, folder, retrain_corrupt=retrain, **train)
    return [records[c.run_id] for c in configs]


def _worker(configs: list[RunConfig], folder: Path, threads: int, kwargs: dict[str, Any]) -> int:
    """One worker of :func:`sweep` with ``jobs > 1``: train every run no other process holds; the count trained."""
    torch.set_num_threads(threads)
    retrain, trained = kwargs.pop("retrain_corrupt", False), 0
    for config in configs:
        if (folder / f"{config.run_id}.json").exists():
            continue
        outcome = _attempt(config, folder, retrain, show_progress=False, **kwargs)
        trained += isinstance(outcome, RunRecord)
    return trained


def _parallel(configs: list[RunConfig], folder: Path, jobs: int, kwargs: dict[str, Any]) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, torch.get_num_threads() // jobs)
    _say(f"training {len(configs)} runs in {jobs} worker processes, {threads} thread(s) each")
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_worker, configs, folder, threads, dict(kwargs)) for _ in range(jobs)]
        for future in futures:
            future.result()
