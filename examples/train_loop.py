"""gradreg in a plain PyTorch training loop: an LR scheduler, gradient clipping, mixed precision, accumulation.

Each function below is shown on the book's how-to page and run by ``tests/test_recipes.py``. Run the file to
train a small classifier on a synthetic task with each recipe (seconds on a CPU):

    python examples/train_loop.py
"""

from __future__ import annotations

import torch
from torch import nn

import gradreg as gr


def toy_data(n: int = 512, seed: int = 0) -> torch.utils.data.TensorDataset:
    """A synthetic 3-class task on 20 features (the class is the sign pattern of two projections)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    w = torch.randn(20, 2, generator=g)
    s = x @ w
    y = (s[:, 0] > 0).long() + (s[:, 1] > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def make_model(seed: int = 0) -> nn.Module:
    """A small MLP with BatchNorm and dropout: gradreg replays the dropout masks and updates BatchNorm's running
    statistics once per step."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.Tanh(), nn.Dropout(0.1), nn.Linear(64, 3))


# [start-train]
def train(model: nn.Module, loader: torch.utils.data.DataLoader, epochs: int = 3) -> tuple[list[float], gr.GR]:
    """F-GR with SGD and a cosine learning-rate schedule: the closure returns the loss, gradreg differentiates."""
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                      gamma=0.05, eps=0.05, method="forward")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    losses = []
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = optimizer.step(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y))
            scheduler.step()  # schedulers work on the wrapper: its param_groups are the base optimizer's
            losses.append(float(loss))
    return losses, optimizer
# [end-train]


def clipped_step(optimizer: gr.GR, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 max_norm: float = 1.0) -> torch.Tensor | None:
    """One GR step whose update is clipped: clip the GR direction d (what the optimizer applies), after gradreg
    computed it and before the base optimizer steps. The perturbation inside the step uses the unclipped g."""
    loss = optimizer.direction(lambda: nn.functional.cross_entropy(model(x), y))  # .grad ← d ≈ g + γHg
    if loss is not None:  # None: a non-finite pass with on_nonfinite="skip"; nothing to apply
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.base_optimizer.step()
    return loss


def bf16_step(optimizer: gr.GR, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """bfloat16 autocast: autocast goes inside the closure, so that every pass of the step runs under it.
    bfloat16 has float32's range, so no loss scaling is needed."""
    def closure() -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return nn.functional.cross_entropy(model(x), y)

    return optimizer.step(closure)


def fp16_step(optimizer: gr.GR, scaler: torch.amp.GradScaler, model: nn.Module, x: torch.Tensor,
              y: torch.Tensor, max_norm: float | None = None) -> torch.Tensor | None:
    """float16 autocast with a ``torch.amp.GradScaler``: every pass back-propagates the scaled loss, the
    perturbation uses the unscaled gradient, and an overflow in any pass skips the whole step (the scaler then
    backs off in ``update()``, as in a plain fp16 loop). Returns ``None`` for a skipped step."""
    def closure() -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.float16):
            return nn.functional.cross_entropy(model(x), y)

    if max_norm is None:
        loss = optimizer.step(closure, scaler=scaler)
    else:  # clipping: unscale the direction first, so that max_norm is in the units of the true gradient
        loss = optimizer.direction(closure, scaler=scaler)  # .grad ← scale·d
        if loss is not None:  # after an overflow the scaler has already seen the infs: no unscale_, no clip
            scaler.unscale_(optimizer.base_optimizer)  # .grad ← d
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(optimizer.base_optimizer)  # steps, or skips after an overflow
    scaler.update()
    return loss


def accumulated_step(optimizer: gr.GR, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     micro_batches: int = 4) -> torch.Tensor | None:
    """Gradient accumulation: one closure per micro-batch, each mean loss weighed by its share of the batch, so
    that the losses add up to the batch's mean loss. gradreg accumulates g over all micro-batches, perturbs with
    it, then runs each perturbed pass over all micro-batches again (each with its own dropout masks)."""
    closures = [
        lambda xs=xs, ys=ys: nn.functional.cross_entropy(model(xs), ys) * (len(xs) / len(x))
        for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches))
    ]
    return optimizer.step(closures)


def accuracy(model: nn.Module, data: torch.utils.data.TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    data = toy_data()
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model = make_model()
    losses, _ = train(model, loader)
    print(f"train: loss {losses[0]:.3f} → {losses[-1]:.3f}, accuracy {accuracy(model, data):.3f}")
    scaler = torch.amp.GradScaler("cpu")
    recipes = {
        "clipped": lambda opt, m, x, y: clipped_step(opt, m, x, y, max_norm=1.0),
        "bf16": bf16_step,
        "fp16": lambda opt, m, x, y: fp16_step(opt, scaler, m, x, y, max_norm=1.0),
        "accumulated": accumulated_step,
    }
    for name, step in recipes.items():
        model = make_model()
        optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=0.05, eps=0.05)
        model.train()
        for _ in range(3):
            for x, y in loader:
                step(optimizer, model, x, y)
        print(f"{name}: accuracy {accuracy(model, data):.3f}")


if __name__ == "__main__":
    main()
