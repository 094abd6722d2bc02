"""A small step-based trainer shared by the chapters: mini-batch training with any optimizer, GR or not.

:func:`train_classifier` draws batches with replacement for a fixed number of steps and measures every
``eval_every`` steps; the epoch-based, resumable runner of the experiments is ``gradreg.experiments.run``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradreg.data import Dataset
from gradreg.optim import GR
from gradreg.runtime import progress

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class History:
    """Measurements every ``eval_every`` steps: step index, full training loss, test loss and accuracy."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in self.__dict__.items()}


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = nn.functional.cross_entropy,
             batch_size: int = 4096) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` (put in eval mode for the call) on ``(x, y)``."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        out = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        total_loss += float(loss_fn(out, target)) * len(target)
        correct += int((out.argmax(1) == target).sum())
    model.train(was_training)
    return total_loss / len(x), correct / len(x)


def train_classifier(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    *,
    steps: int,
    batch_size: int,
    eval_every: int = 100,
    seed: int = 0,
    loss_fn: LossFn = nn.functional.cross_entropy,
    desc: str | None = None,
) -> History:
    """Train for ``steps`` mini-batch steps (batches drawn with a generator seeded by ``seed``).

    A :class:`gradreg.GR` optimizer gets a closure (it differentiates as its method needs); any other
    optimizer gets the usual ``zero_grad(); loss.backward(); step()``.
    """
    generator = torch.Generator().manual_seed(seed)
    history = History()
    model.train()

    def record(step: int) -> None:
        train_loss, _ = evaluate(model, data.x, data.y, loss_fn)
        test_loss, accuracy = evaluate(model, data.x_test, data.y_test, loss_fn)
        history.step.append(step)
        history.train_loss.append(train_loss)
        history.test_loss.append(test_loss)
        history.test_accuracy.append(accuracy)

    record(0)
    for step in progress(range(1, steps + 1), desc=desc, leave=False):
        index = torch.randint(len(data.x), (batch_size,), generator=generator).to(data.x.device)
        x, y = data.x[index], data.y[index]
        if isinstance(optimizer, GR):
            optimizer.step(lambda x=x, y=y: loss_fn(model(x), y))
        else:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        if step % eval_every == 0 or step == steps:
            record(step)
    return history


def compare_methods(
    data: Dataset,
    make_model: Callable[[], nn.Module],
    *,
    methods: list[str],
    seeds: list[int],
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    gamma: float = 0.0,
    eps: float | None = None,
    eval_every: int = 100,
) -> dict[str, list[History]]:
    """Train a fresh model per method and seed with SGD (momentum) wrapped in GR; ``"sgd"`` is the plain base.

    Seed ``s`` fixes both the initialization (``torch.manual_seed(s)`` before ``make_model()``) and the batch
    order, so the methods differ only in their update direction.
    """
    histories: dict[str, list[History]] = {}
    for method in methods:
        for seed in seeds:
            torch.manual_seed(seed)
            model = make_model().to(data.x.device)
            base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
            optimizer = base if method == "sgd" else GR(base, gamma=gamma, eps=eps, method=method)
            histories.setdefault(method, []).append(train_classifier(
                model, optimizer, data, steps=steps, batch_size=batch_size, eval_every=eval_every, seed=seed,
                desc=f"{method} seed {seed}",
            ))
    return histories
