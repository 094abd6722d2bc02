"""GR in the Hugging Face ``Trainer``: :class:`GRTrainer` is a ``transformers.Trainer`` whose optimizer steps
follow the GR direction.

    trainer = GRTrainer(model=model, args=args, train_dataset=data, gr_config={"gamma": 0.05, "eps": 0.05})
    trainer.train()

Everything else is the Trainer's own: its optimizer (``args.optim``, by default AdamW) and scheduler, its loss
(``compute_loss``, with the ``num_items_in_batch`` normalization over the accumulated batch), its autocast
(``bf16``/``fp16``) and fp16 ``GradScaler``, ``max_grad_norm`` (which clips the unscaled GR direction), logging,
checkpoints and ``resume_from_checkpoint``. ``training_step`` keeps the micro-batches of an optimizer step until
the last one and hands GR their closures as one list (one GR direction per optimizer step, equal to the direction
of the whole accumulated batch); the Trainer then clips and steps as it would after ``backward()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradreg._optional import require
from gradreg.optim import GR

transformers = require("transformers", extra="huggingface", purpose="gradreg.integrations.huggingface")


class _DeferredOverflow:
    """The accelerator's ``GradScaler`` as GR sees it: GR reports an fp16 overflow through ``unscale_``, but the
    Trainer unscales once itself (when it clips) and a scaler refuses a second ``unscale_`` before ``update``;
    the overflow is handed to the Trainer's ``unscale_`` as a non-finite ``.grad`` instead (:func:`_mark_overflow`)."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self._scaler, self.overflowed = scaler, False

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.overflowed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scaler, name)


def _mark_overflow(optimizer: torch.optim.Optimizer) -> None:
    """An infinite ``.grad`` on one parameter: the scaler's ``unscale_`` finds it, skips the step, backs off."""
    param = next(p for group in optimizer.param_groups for p in group["params"] if p.requires_grad)
    param.grad = torch.full_like(param, float("inf"))


class GRTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose steps follow the GR direction.

    Args:
        gr_config: :class:`gradreg.GR`'s keyword arguments (``gamma``, ``eps``, ``method``, ...).
        args, kwargs: the ``Trainer``'s positional and keyword arguments. Give it a plain optimizer
            (``optimizers=(opt, sched)`` or ``args.optim``), never a ``GR``: the Trainer calls ``optimizer.step()``
            without a closure, so GR wraps the Trainer's optimizer itself (the attribute ``gr``) and only fills
            ``.grad``.

    One process only (multi-GPU DDP, FSDP and DeepSpeed are refused: use ``GR(..., ddp=model)`` in a plain loop).
    """

    def __init__(self, *args: Any, gr_config: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gr_config = dict(gr_config)
        self.gr: GR | None = None
        self._micro_batches: list[tuple[dict[str, Any], Any]] = []

    def _gr(self) -> GR:
        base = self.optimizer
        while not isinstance(base, GR) and hasattr(base, "optimizer"):  # accelerate's AcceleratedOptimizer
            base = base.optimizer
        if isinstance(base, GR):
            raise TypeError("GRTrainer wraps the Trainer's optimizer in GR itself: pass the base optimizer "
                            "(optimizers=(torch.optim.AdamW(...), None)) and GR's arguments as gr_config")
        if self.gr is None or self.gr.base_optimizer is not base:
            self.gr = GR(base, **self.gr_config)
        return self.gr

    def _micro_batch_loss(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> Tensor:
        """The loss the plain ``training_step`` back-propagates for one micro-batch (its normalization, exactly)."""
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        if self.accelerator.num_processes > 1 or self.args.n_gpu > 1:
            raise NotImplementedError("GRTrainer runs in one process on one device; for DDP use "
                                      "gradreg.GR(..., ddp=model) in a plain loop (examples/ddp.py)")
        gr = self._gr()
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        self._micro_batches.append((self._prepare_inputs(inputs), num_items_in_batch))
        if not self.accelerator.sync_gradients:  # not the last micro-batch of the step: keep it
            return torch.zeros((), device=self.args.device)
        batches, self._micro_batches = self._micro_batches, []
        closures = [lambda b=b, n=n: self._micro_batch_loss(model, b, n) for b, n in batches]
        scaler = _DeferredOverflow(self.accelerator.scaler) if self.accelerator.scaler is not None else None
        loss = gr.direction(closures, scaler=scaler)  # .grad ← GR direction; the Trainer clips and steps
        if loss is None:
            if scaler is not None and scaler.overflowed:
                _mark_overflow(gr.base_optimizer)
            return torch.tensor(float("nan"), device=self.args.device)  # the Trainer's NaN filter skips it
        return loss.detach()
