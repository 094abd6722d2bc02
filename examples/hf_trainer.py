"""gradreg in the Hugging Face ``Trainer`` with :class:`gradreg.integrations.huggingface.GRTrainer`: a tiny GPT-2
built from a config (no download), the default optimizer (AdamW), bf16, two micro-batches per step, clipping.

``GRTrainer`` is a ``Trainer`` that takes GR's arguments as ``gr_config``; everything else (its loss and its
``num_items_in_batch`` normalization, optimizer, schedule, clipping, checkpoints, resume) is the Trainer's.
``tests/test_integrations.py`` checks that at γ = 0 it is the plain ``Trainer``, and at γ > 0 the plain gradreg
loop. Run it (seconds on a CPU; needs ``pip install transformers accelerate``):

    python examples/hf_trainer.py
"""

from __future__ import annotations

import torch
import transformers

from gradreg.integrations.huggingface import GRTrainer


class Tokens(torch.utils.data.Dataset):
    """Counting sequences from random starts (the next token is this one + 1, modulo ``vocab``), as
    ``{"input_ids", "labels"}`` items: causal language modelling that a tiny model learns in a few steps."""

    def __init__(self, n: int = 64, length: int = 16, vocab: int = 64, seed: int = 0):
        starts = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(vocab: int = 64) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2,
                                                                n_positions=32))


def fit(model: torch.nn.Module, data: torch.utils.data.Dataset, output_dir: str, max_steps: int) -> GRTrainer:
    """Train for ``max_steps`` GR steps on a CPU in bf16, quietly (no logging, no checkpoints)."""
    # [start-fit]
    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        bf16=True, max_grad_norm=1.0, learning_rate=1e-3, use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True,
    )
    trainer = GRTrainer(model=model, args=args, train_dataset=data,
                        gr_config={"gamma": 0.05, "eps": 0.05, "method": "forward"})
    trainer.train()
    # [end-fit]
    return trainer


if __name__ == "__main__":
    import tempfile

    model, data = tiny_gpt2(), Tokens()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = fit(model, data, tmp, max_steps=20)
    print(f"global_step {trainer.state.global_step}, training loss {trainer.state.log_history[-1]['train_loss']:.3f}")
