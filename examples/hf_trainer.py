"""gradreg in the Hugging Face ``Trainer``: override ``training_step``.

The Trainer calls ``training_step`` for each micro-batch (it runs forward and ``backward()``), then clips the
gradients (``max_grad_norm``), calls ``optimizer.step()`` without a closure, steps the LR scheduler and zeroes the
gradients. GR cannot be that optimizer (its step needs a closure), but ``training_step`` can fill ``.grad`` with
the GR direction instead of the plain gradient: the Trainer then clips the GR direction and applies it with the
base optimizer and its scheduler, exactly as it would apply a gradient.

With ``gradient_accumulation_steps > 1`` the GR step must see the whole batch (g over all micro-batches, then the
perturbed passes over all of them), so ``training_step`` keeps the micro-batches until the last one of the step
and hands them to GR together, as a list of closures.

Run it (seconds on a CPU; needs ``pip install transformers accelerate``):

    python examples/hf_trainer.py
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

import gradreg as gr


# [start-trainer]
class GRTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose steps follow the GR direction (``gr_config``: GR's keyword arguments)."""

    def __init__(self, *args, gr_config: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.gr_config, self.gr, self.micro_batches = gr_config, None, []

    def create_optimizer(self, model=None):
        base = super().create_optimizer(model)  # the Trainer's optimizer (args.optim), which it steps itself
        if self.gr is None:
            self.gr = gr.GR(base, **self.gr_config)
        return base

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        self.micro_batches.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:  # not the last micro-batch of the step: keep it for later
            return torch.zeros((), device=self.args.device)
        batches, self.micro_batches = self.micro_batches, []
        closures = [lambda b=b: self.compute_loss(model, b) / len(batches) for b in batches]
        loss = self.gr.direction(closures)  # .grad ← GR direction; the Trainer clips it and steps
        return loss.detach() if loss is not None else torch.tensor(float("nan"), device=self.args.device)
# [end-trainer]


class TinyClassifier(nn.Module):
    """A plain ``nn.Module`` the Trainer can train: ``forward(x, labels)`` returns the loss and the logits."""

    def __init__(self, features: int = 20, width: int = 32, classes: int = 3, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, width), nn.Tanh(), nn.Dropout(dropout),
                                 nn.Linear(width, classes))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class DictData(torch.utils.data.Dataset):
    """``(x, y)`` tensors as the ``{"x": ..., "labels": ...}`` items that the Trainer's collator stacks."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, key: str = "x"):
        self.x, self.y, self.key = x, y, key

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {self.key: self.x[i], "labels": self.y[i]}


def fit(model: nn.Module, data: torch.utils.data.Dataset, output_dir: str, max_steps: int, batch_size: int = 64,
        accumulation: int = 1, max_grad_norm: float = 1.0, **gr_config) -> GRTrainer:
    """Train ``model`` for ``max_steps`` GR steps on a CPU, quietly (no logging, no checkpoints)."""
    gr_config = {"gamma": 0.05, "eps": 0.05, "method": "forward", **gr_config}
    # [start-fit]
    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm, optim="sgd", learning_rate=0.1,
        lr_scheduler_type="cosine", weight_decay=0.0, use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = GRTrainer(model=model, args=args, train_dataset=data, gr_config=gr_config)
    trainer.train()
    # [end-fit]
    return trainer


if __name__ == "__main__":
    import tempfile

    from train_loop import toy_data

    x, y = toy_data().tensors
    model = TinyClassifier()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = fit(model, DictData(x, y), tmp, max_steps=40, accumulation=2, batch_size=32)
    model.eval()
    print(f"global_step {trainer.state.global_step}, "
          f"accuracy {float((model(x)['logits'].argmax(1) == y).float().mean()):.3f}")
