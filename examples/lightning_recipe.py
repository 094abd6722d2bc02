"""gradreg in PyTorch Lightning with :class:`gradreg.integrations.lightning.GRLightningModule`: AdamW, bf16-mixed,
two micro-batches per step, gradient clipping and a per-step cosine schedule.

Subclass ``GRLightningModule`` instead of ``LightningModule``, pass GR's arguments (and accumulation/clipping,
which Lightning refuses under manual optimization) to its ``__init__``, and write ``training_loss`` instead of
``training_step``. ``tests/test_integrations.py`` checks that at γ = 0 this is the plain Lightning run, and at
γ > 0 the plain gradreg loop. Run it (seconds on a CPU; needs ``pip install lightning``):

    python examples/lightning_recipe.py
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from gradreg.integrations.lightning import GRLightningModule


# [start-module]
class GRClassifier(GRLightningModule):
    """A classifier trained with F-GR; everything Lightning does otherwise stays Lightning's."""

    def __init__(self, model: nn.Module, lr: float = 1e-2, **gr_kwargs):
        super().__init__(gamma=0.05, eps=0.05, accumulate_grad_batches=2, gradient_clip_val=1.0, **gr_kwargs)
        self.model, self.lr = model, lr

    def training_loss(self, batch, batch_idx):  # called once per GR pass: log in hooks, not here
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):  # the base optimizer and its scheduler, as for any LightningModule
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        steps = self.trainer.estimated_stepping_batches // self.accumulate + 1
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
# [end-module]


def fit(model: nn.Module, data: torch.utils.data.Dataset, epochs: int, batch_size: int = 32,
        **kwargs) -> tuple[GRClassifier, L.Trainer]:
    """Train ``model`` for ``epochs`` on a CPU in bf16-mixed, quietly; return the module and the trainer."""
    # [start-fit]
    module = GRClassifier(model, **kwargs)
    trainer = L.Trainer(max_epochs=epochs, precision="bf16-mixed", accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=batch_size))
    # [end-fit]
    return module, trainer


if __name__ == "__main__":
    from train_loop import accuracy, make_model, toy_data

    data = toy_data()
    module, trainer = fit(make_model(), data, epochs=3)
    print(f"global_step {trainer.global_step}, accuracy {accuracy(module.model, data):.3f}")
