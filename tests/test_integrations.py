"""gradreg.integrations: GR inside Lightning and the Hugging Face Trainer.

At γ = 0 each integration must be its plain trainer (same loss normalization, accumulation, clipping, schedule,
precision); at γ > 0 it must be the plain gradreg loop (GR.direction, clip, base step, scheduler) on the same
batches. Tiny models built from configs (no downloads), a few steps each.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradreg as gr

L = pytest.importorskip("lightning")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from gradreg.integrations.huggingface import GRTrainer  # noqa: E402
from gradreg.integrations.lightning import GRLightningModule  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
QUIET = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
         "enable_model_summary": False}


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------------------------------------ Lightning


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 3))


def toy_data(n: int = 40) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 20, generator=g), torch.randint(0, 3, (n,), generator=g))


def loader(data: torch.utils.data.Dataset) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=8)  # 40 samples: 5 batches, the last step has one


def adamw_cosine(params, steps: int = 3) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.AdamW(params, lr=1e-2)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


class Counting:
    """Counts on_before_optimizer_step (Lightning fires it once per optimizer step)."""

    hook_calls = 0

    def on_before_optimizer_step(self, optimizer):
        self.hook_calls += 1

    def configure_optimizers(self):
        opt, sched = adamw_cosine(self.parameters())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Plain(Counting, L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = mlp()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)


class WithGR(Counting, GRLightningModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.model = mlp()

    def training_loss(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)


def fp16_plugin() -> MixedPrecision:
    """16-mixed on a CPU (Lightning's precision="16-mixed" falls back to bf16 there): the plugin with a scaler."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))


def precision_kwargs(precision: str) -> dict:
    return {"plugins": [fp16_plugin()]} if precision == "16-mixed" else {"precision": precision}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_lightning_at_gamma_0_equals_the_plain_trainer(precision):
    """AdamW, accumulation 2 (an incomplete last step), active clipping, a per-step cosine schedule."""
    plain, module = Plain(), WithGR(gamma=0.0, eps=0.05, accumulate_grad_batches=2, gradient_clip_val=0.05)
    L.Trainer(max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=0.05, enable_checkpointing=False,
              **precision_kwargs(precision), **QUIET).fit(plain, loader(toy_data()))
    trainer = L.Trainer(max_epochs=1, enable_checkpointing=False, **precision_kwargs(precision), **QUIET)
    trainer.fit(module, loader(toy_data()))
    assert trainer.global_step == 3 and module.hook_calls == plain.hook_calls == 3
    assert max_difference(plain, module) <= 1e-6
    assert max_difference(module, WithGR(gamma=0.0)) > 1e-3  # it trained


def test_lightning_steps_an_epoch_scheduler_as_the_plain_trainer_does():
    def epoch_schedule(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
                                                   "interval": "epoch"}}

    plain, module = Plain(), WithGR(gamma=0.0, eps=0.05, accumulate_grad_batches=2)
    plain.configure_optimizers = epoch_schedule.__get__(plain)
    module.configure_optimizers = epoch_schedule.__get__(module)
    L.Trainer(max_epochs=3, accumulate_grad_batches=2, enable_checkpointing=False, **QUIET).fit(plain,
                                                                                               loader(toy_data()))
    trainer = L.Trainer(max_epochs=3, enable_checkpointing=False, **QUIET)
    trainer.fit(module, loader(toy_data()))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert max_difference(plain, module) <= 1e-6


def gr_loop(model: nn.Module, batches, *, gamma: float, accumulate: int, max_norm: float,
            autocast: torch.dtype | None = None) -> nn.Module:
    """The plain gradreg loop: GR.direction over the step's micro-batches, clip, base step, scheduler step."""
    base, sched = adamw_cosine(model.parameters())
    opt = gr.GR(base, gamma=gamma, eps=0.05)

    def closure(x, y):
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            return nn.functional.cross_entropy(model(x), y) / accumulate

    for start in range(0, len(batches), accumulate):
        opt.direction([lambda b=b: closure(*b) for b in batches[start:start + accumulate]])
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        base.step()
        base.zero_grad()
        sched.step()
    return model


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_at_gamma_positive_equals_the_plain_gradreg_loop(precision):
    module = WithGR(gamma=0.05, eps=0.05, accumulate_grad_batches=2, gradient_clip_val=0.05)
    L.Trainer(max_epochs=1, enable_checkpointing=False, precision=precision, **QUIET).fit(module, loader(toy_data()))
    reference = gr_loop(mlp(), list(loader(toy_data())), gamma=0.05, accumulate=2, max_norm=0.05,
                        autocast=torch.bfloat16 if precision == "bf16-mixed" else None)
    assert max_difference(module.model, reference) <= 1e-6


def test_lightning_resumes_from_a_checkpoint(tmp_path):
    straight = WithGR(gamma=0.05, eps=0.05, accumulate_grad_batches=2)
    L.Trainer(max_epochs=2, enable_checkpointing=False, **QUIET).fit(straight, loader(toy_data()))
    first = WithGR(gamma=0.05, eps=0.05, accumulate_grad_batches=2)
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, **QUIET)
    trainer.fit(first, loader(toy_data()))
    resumed = WithGR(gamma=0.05, eps=0.05, accumulate_grad_batches=2)
    trainer = L.Trainer(max_epochs=2, default_root_dir=tmp_path, **QUIET)
    trainer.fit(resumed, loader(toy_data()), ckpt_path=trainer_checkpoint(tmp_path))
    assert trainer.global_step == 6
    assert max_difference(straight, resumed) <= 1e-6


def trainer_checkpoint(root) -> str:
    (path,) = root.rglob("*.ckpt")
    return str(path)


def test_lightning_fp16_overflow_skips_the_step_and_backs_the_scaler_off():
    class Overflowing(WithGR):
        def training_loss(self, batch, batch_idx):
            x, y = batch
            factor = 1e6 if self.trainer.global_step == 1 else 1.0  # overflows float16 in step 2 only
            return nn.functional.cross_entropy(self.model(x * factor), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Overflowing(gamma=0.05, eps=0.05, accumulate_grad_batches=2, gradient_clip_val=1.0)
    trainer = L.Trainer(max_epochs=1, enable_checkpointing=False, plugins=[fp16_plugin()], **QUIET)
    trainer.fit(module, loader(toy_data()))
    assert trainer.global_step == 3 and module.hook_calls == 3 and module.gr.skipped_steps == 1
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**9


def test_lightning_misuse_gets_clear_errors():
    class Wrapped(WithGR):
        def configure_optimizers(self):
            return gr.GR(torch.optim.SGD(self.parameters(), lr=0.1), gamma=0.05, eps=0.05)

    with pytest.raises(TypeError, match="must return the base optimizer"):
        L.Trainer(max_steps=1, enable_checkpointing=False, **QUIET).fit(Wrapped(gamma=0.05, eps=0.05),
                                                                        loader(toy_data()))
    with pytest.raises(ValueError, match="gradient_clip_algorithm must be one of"):
        WithGR(gamma=0.05, eps=0.05, gradient_clip_algorithm="l2")
    with pytest.raises(ValueError, match="accumulate_grad_batches must be an integer >= 1"):
        WithGR(gamma=0.05, eps=0.05, accumulate_grad_batches=0)


# ------------------------------------------------------------------------------------------------ Hugging Face


class TokenData(torch.utils.data.Dataset):
    def __init__(self, labels_key: str = "lm"):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (16, 8), generator=g)
        if labels_key == "lm":  # uneven token counts per micro-batch: num_items_in_batch matters
            self.labels = self.ids.clone()
            self.labels[:, :3] = -100
            self.labels[::3, 5:] = -100
        else:
            self.labels = torch.randint(0, 3, (16,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny(kind: str, dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return transformers.BertForSequenceClassification(config)


def hf_args(output_dir, **kwargs) -> transformers.TrainingArguments:
    """The default optimizer (adamw_torch) and schedule (linear); accumulation 2, active clipping."""
    settings = {"max_steps": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                "max_grad_norm": 0.5, "learning_rate": 1e-3, "use_cpu": True, "report_to": "none",
                "save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True, "dataloader_num_workers": 0,
                "seed": 0, **kwargs}
    return transformers.TrainingArguments(output_dir=str(output_dir), **settings)


@pytest.mark.parametrize("kind, bf16", [("gpt2", False), ("gpt2", True), ("bert", False)])
def test_hf_at_gamma_0_equals_the_plain_trainer(kind, bf16, tmp_path):
    plain, model = tiny(kind), tiny(kind)
    data = TokenData("lm" if kind == "gpt2" else "class")
    loss = transformers.Trainer(model=plain, args=hf_args(tmp_path, bf16=bf16), train_dataset=data).train()
    trainer = GRTrainer(model=model, args=hf_args(tmp_path, bf16=bf16), train_dataset=data,
                        gr_config={"gamma": 0.0, "eps": 0.05})
    gr_loss = trainer.train()
    assert trainer.state.global_step == 3
    assert max_difference(plain, model) <= 1e-6
    assert gr_loss.training_loss == pytest.approx(loss.training_loss, rel=1e-6)
    assert max_difference(model, tiny(kind)) > 1e-4  # it trained


class InOrder(GRTrainer):
    """The data in order (the Trainer shuffles): the reference loop sees the same micro-batches."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def test_hf_at_gamma_positive_equals_the_plain_gradreg_loop(tmp_path):
    """One optimizer step per epoch (16 samples, 2 micro-batches of 8): the loop hands GR the same two micro-batches,
    each normalized by the step's token count (``num_items_in_batch``), with the Trainer's AdamW and schedule."""
    model, reference = tiny("gpt2", dropout=0.0), tiny("gpt2", dropout=0.0)  # (the Trainer reseeds the RNG)
    data = TokenData("lm")
    InOrder(model=model, args=hf_args(tmp_path, per_device_train_batch_size=8), train_dataset=data,
            gr_config={"gamma": 0.05, "eps": 0.05}).train()
    # the Trainer's AdamW (its parameter groups and kwargs), built by a plain Trainer, and its linear schedule
    base = transformers.Trainer(model=reference, args=hf_args(tmp_path)).create_optimizer()
    sched = torch.optim.lr_scheduler.LambdaLR(base, lambda k: 1 - k / 3)
    opt = gr.GR(base, gamma=0.05, eps=0.05)
    tokens = int((data.labels[:, 1:] != -100).sum())  # GPT-2 shifts the labels by one
    micro = [(data.ids[:8], data.labels[:8]), (data.ids[8:], data.labels[8:])]
    reference.train()
    for _ in range(3):
        opt.direction([lambda x=x, y=y: reference(input_ids=x, labels=y, num_items_in_batch=tokens).loss
                       for x, y in micro])
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        base.step()
        base.zero_grad()
        sched.step()
    assert max_difference(model, reference) <= 1e-6


def test_hf_resumes_from_a_checkpoint(tmp_path):
    data, config = TokenData("lm"), {"gamma": 0.05, "eps": 0.05}
    straight = tiny("gpt2")
    GRTrainer(model=straight, args=hf_args(tmp_path / "a", max_steps=4), train_dataset=data,
              gr_config=config).train()
    first = tiny("gpt2")
    GRTrainer(model=first, args=hf_args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2),
              train_dataset=data, gr_config=config).train()
    resumed = tiny("gpt2")
    trainer = GRTrainer(model=resumed, args=hf_args(tmp_path / "b", max_steps=4), train_dataset=data,
                        gr_config=config)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    assert max_difference(straight, resumed) <= 1e-6


def test_an_fp16_overflow_reaches_the_trainers_single_unscale():
    """GRTrainer's fp16 path without a GPU (accelerate uses no GradScaler on a CPU): GR reports the overflow to the
    proxy, an infinite .grad hands it to the one ``unscale_`` the Trainer makes when it clips, and the scaler then
    skips the step and backs off, as in a plain fp16 step."""
    from gradreg.integrations.huggingface import _DeferredOverflow, _mark_overflow

    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt, scaler = gr.GR(base, gamma=0.05, eps=0.05), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = toy_data(8).tensors
    before = [p.detach().clone() for p in model.parameters()]
    proxy = _DeferredOverflow(scaler)
    with torch.autocast("cpu", dtype=torch.float16):
        assert opt.direction(lambda: nn.functional.cross_entropy(model(x * 1e6), y), scaler=proxy) is None
    assert proxy.overflowed
    _mark_overflow(base)
    scaler.unscale_(base)  # what the Trainer's clip_grad_norm_ does, once
    scaler.step(base)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_gr_given_to_grtrainer_is_refused(tmp_path):
    model = tiny("bert")
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.05, eps=0.05)
    trainer = GRTrainer(model=model, args=hf_args(tmp_path), train_dataset=TokenData("class"),
                        optimizers=(optimizer, None), gr_config={"gamma": 0.05, "eps": 0.05})
    with pytest.raises(TypeError, match="wraps the Trainer's optimizer in GR itself"):
        trainer.train()
