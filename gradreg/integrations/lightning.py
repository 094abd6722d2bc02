"""GR in PyTorch Lightning: subclass :class:`GRLightningModule` and write ``training_loss`` instead of
``training_step``.

    class Classifier(GRLightningModule):
        def __init__(self):
            super().__init__(gamma=0.05, eps=0.05, accumulate_grad_batches=2, gradient_clip_val=1.0)
            self.model = ...
        def training_loss(self, batch, batch_idx):          # called once per GR pass: no self.log here
            x, y = batch
            return F.cross_entropy(self.model(x), y)
        def configure_optimizers(self):                      # the base optimizer, as for any LightningModule
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

Lightning's automatic optimization cannot drive GR (its closure calls ``backward()`` itself), so the module uses
manual optimization and does what the Trainer would: it keeps each micro-batch's closure until the last one of the
step and hands GR the list (accumulation), asks GR for the direction (with the precision plugin's ``GradScaler``
under ``precision="16-mixed"``; autocast comes from the plugin), unscales and clips it, and calls Lightning's
``optimizer.step()`` once — so ``global_step``, ``max_steps``, checkpoints and ``on_before_optimizer_step`` behave
as in a plain run — then steps the LR schedulers by their ``interval``/``frequency``. Accumulation and clipping
are the module's arguments because Lightning refuses ``Trainer(accumulate_grad_batches=, gradient_clip_val=)``
under manual optimization.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from gradreg._checks import check_int
from gradreg._optional import require
from gradreg.optim import GR

L = require("lightning", extra="lightning", purpose="gradreg.integrations.lightning")

CLIP_ALGORITHMS = ("norm", "value")


class _AlreadyUnscaled:
    """The plugin's scaler, as its ``optimizer_step`` sees it once the module has unscaled (GR's direction must be
    unscaled before it is clipped, and a ``GradScaler`` refuses a second ``unscale_`` before ``update``)."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self._scaler = scaler

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scaler, name)


class GRLightningModule(L.LightningModule):
    """A ``LightningModule`` trained with GR; subclasses define ``training_loss(batch, batch_idx) -> Tensor``.

    Args:
        gamma, eps, method, ...: :class:`gradreg.GR`'s keyword arguments (``gr_kwargs``).
        accumulate_grad_batches: micro-batches per optimizer step (each loss divided by it, as Lightning does).
        gradient_clip_val, gradient_clip_algorithm: clip the unscaled GR direction (``"norm"`` or ``"value"``)
            before the step, as ``Trainer(gradient_clip_val=...)`` clips a gradient.
        log_loss: the name under which the loss at θ is logged once per step (``None``: not logged).

    ``configure_optimizers`` returns one base optimizer (and schedulers), as usual; the module wraps it in
    ``gr``. Schedulers with a ``monitor`` (ReduceLROnPlateau) are stepped at epoch end with that metric.
    ``on_before_backward``/``on_after_backward`` do not fire (GR back-propagates several times per step);
    ``on_before_optimizer_step`` fires once per step, with the unscaled, clipped GR direction in ``.grad``.
    """

    def __init__(self, *, accumulate_grad_batches: int = 1, gradient_clip_val: float | None = None,
                 gradient_clip_algorithm: str = "norm", log_loss: str | None = "train_loss", **gr_kwargs: Any):
        super().__init__()
        self.automatic_optimization = False  # GR differentiates: Lightning must not call backward()
        self.accumulate = check_int("accumulate_grad_batches", accumulate_grad_batches, minimum=1)
        if gradient_clip_algorithm not in CLIP_ALGORITHMS:
            raise ValueError(f"gradient_clip_algorithm must be one of {CLIP_ALGORITHMS}; got "
                             f"{gradient_clip_algorithm!r}")
        self.clip_val, self.clip_algorithm, self.log_loss = gradient_clip_val, gradient_clip_algorithm, log_loss
        self.gr_kwargs = gr_kwargs
        self.gr: GR | None = None
        self._micro_batches: list[Callable[[], Tensor]] = []

    def training_loss(self, batch: Any, batch_idx: int) -> Tensor:
        """The loss of one micro-batch; called once per GR pass (do not log or count here)."""
        raise NotImplementedError(f"{type(self).__name__} must define training_loss(batch, batch_idx) -> Tensor")

    def _gr(self) -> GR:
        optimizers = self.optimizers(use_pl_optimizer=False)
        if isinstance(optimizers, list):
            raise ValueError("GRLightningModule trains with one optimizer: configure_optimizers returned "
                             f"{len(optimizers)}")
        if isinstance(optimizers, GR):
            raise TypeError("configure_optimizers must return the base optimizer (e.g. AdamW); "
                            "GRLightningModule wraps it in GR itself (pass gamma/eps to its __init__)")
        if self.gr is None or self.gr.base_optimizer is not optimizers:
            self.gr = GR(optimizers, **self.gr_kwargs)
        return self.gr

    def _last_of_step(self, batch_idx: int) -> bool:
        return (batch_idx + 1) % self.accumulate == 0 or batch_idx + 1 == self.trainer.num_training_batches

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.trainer.world_size > 1:
            raise NotImplementedError("GRLightningModule runs on one device: for DDP, use gradreg.GR(..., ddp=model) "
                                      "in a plain loop (examples/ddp.py)")
        gr = self._gr()
        self._micro_batches.append(lambda: self.training_loss(batch, batch_idx) / self.accumulate)
        if not self._last_of_step(batch_idx):
            return None
        closures, self._micro_batches = self._micro_batches, []
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        loss = gr.direction(closures, scaler=scaler)
        if loss is not None and scaler is not None:
            scaler.unscale_(gr.base_optimizer)  # clip (and show the hooks) the unscaled direction
        if loss is not None and self.clip_val is not None:
            self.clip_gradients(self.optimizers(), gradient_clip_val=self.clip_val,
                                gradient_clip_algorithm=self.clip_algorithm)
        with self._unscaled(scaler):
            self.optimizers().step()  # counted by Lightning; the scaler skips it after an overflow
        self.optimizers().zero_grad()
        self._step_schedulers("step")
        if loss is not None and self.log_loss is not None:
            self.log(self.log_loss, loss, prog_bar=True)  # the step's loss at θ: Σ micro-batch loss / accumulate
        return loss

    @contextlib.contextmanager
    def _unscaled(self, scaler: torch.amp.GradScaler | None) -> Iterator[None]:
        plugin = self.trainer.precision_plugin
        if scaler is None:
            yield
            return
        plugin.scaler = _AlreadyUnscaled(scaler)
        try:
            yield
        finally:
            plugin.scaler = scaler

    def on_train_epoch_end(self) -> None:
        self._micro_batches = []
        self._step_schedulers("epoch")

    def _step_schedulers(self, interval: str) -> None:
        """Step the schedulers as Lightning's automatic optimization would (interval, frequency, monitor)."""
        count = self.trainer.global_step if interval == "step" else self.trainer.current_epoch + 1
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval or count % config.frequency:
                continue
            if config.monitor is None:
                config.scheduler.step()
            elif config.monitor in self.trainer.callback_metrics:
                config.scheduler.step(self.trainer.callback_metrics[config.monitor])
            elif config.strict:
                raise KeyError(f"the scheduler monitors {config.monitor!r}, which is not among the logged metrics "
                               f"{sorted(self.trainer.callback_metrics)}: log it, or set strict=False")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.gr is not None:
            checkpoint["gradreg_skipped_steps"] = self.gr.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._skipped_on_resume = checkpoint.get("gradreg_skipped_steps", 0)

    def on_train_start(self) -> None:
        self._gr().skipped_steps = getattr(self, "_skipped_on_resume", self._gr().skipped_steps)
