"""gradreg in PyTorch Lightning: manual optimization, with gradient clipping, an LR scheduler and ``max_steps``.

Lightning's automatic optimization cannot drive GR: its closure runs ``training_step`` *and* ``backward()`` and
hands the optimizer a detached loss, while GR must differentiate the loss itself, several times per step. With
manual optimization the module asks GR for the direction, and Lightning's own ``optimizer.step()`` applies it:

* ``configure_optimizers`` returns the **base** optimizer (and its scheduler) to Lightning and keeps the GR wrapper
  for itself. Lightning's ``optimizer.step()`` is then exactly the base step, and Lightning counts it, so
  ``global_step`` advances and ``Trainer(max_steps=...)`` stops training. (Calling ``gr.base_optimizer.step()``
  directly would bypass Lightning's wrapper: ``global_step`` would stay 0 and ``max_steps`` would never stop.)
* ``training_step`` fills ``.grad`` with the GR direction, clips it with ``self.clip_gradients`` (Lightning's
  ``Trainer(gradient_clip_val=...)`` is for automatic optimization only) and steps.

Run it (seconds on a CPU; needs ``pip install lightning``):

    python examples/lightning_recipe.py
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

import gradreg as gr


# [start-module]
class GRClassifier(L.LightningModule):
    """A classifier trained with GR under Lightning's manual optimization."""

    def __init__(self, model: nn.Module, lr: float = 0.1, gamma: float = 0.05, eps: float = 0.05,
                 method: str = "forward", max_norm: float = 1.0):
        super().__init__()
        self.model = model
        self.automatic_optimization = False  # gradreg differentiates: Lightning must not call backward()
        self.lr, self.max_norm = lr, max_norm
        self.gr_config = {"gamma": gamma, "eps": eps, "method": method}

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        self.gr = gr.GR(base, **self.gr_config)  # the module keeps the GR wrapper ...
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": base, "lr_scheduler": scheduler}  # ... Lightning gets the base optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()  # Lightning's wrapper around the base optimizer
        loss = self.gr.direction(lambda: nn.functional.cross_entropy(self.model(x), y))  # .grad ← GR direction
        if loss is not None:  # None: a skipped step (on_nonfinite="skip")
            self.clip_gradients(optimizer, gradient_clip_val=self.max_norm, gradient_clip_algorithm="norm")
            optimizer.step()  # the base step, counted by Lightning: global_step advances, max_steps stops
            self.log("train_loss", loss, prog_bar=True)
        self.lr_schedulers().step()
        return loss
# [end-module]


def fit(model: nn.Module, data: torch.utils.data.Dataset, max_steps: int, batch_size: int = 64,
        **kwargs) -> tuple[GRClassifier, L.Trainer]:
    """Train ``model`` for ``max_steps`` GR steps on a CPU, quietly; return the module and the trainer."""
    # [start-fit]
    module = GRClassifier(model, **kwargs)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=batch_size))
    # [end-fit]
    return module, trainer


if __name__ == "__main__":
    from train_loop import accuracy, make_model, toy_data

    data = toy_data()
    module, trainer = fit(make_model(), data, max_steps=40)
    print(f"global_step {trainer.global_step}, accuracy {accuracy(module.model, data):.3f}")
