"""The recipes in examples/ (shown on the book's how-to page) do what the page says.

Plain loop: the scheduler drives the wrapper's learning rate, clipping clips the GR direction, bf16 and fp16 steps
follow the float32 step, an fp16 overflow skips the step and backs the scaler off, accumulation equals the large
batch. Lightning and the Hugging Face Trainer: the examples (gradreg.integrations) train in bf16 with AdamW and
accumulation, and the paths that cannot work fail with gradreg's errors. DDP: examples/ddp.py under torchrun, with
accumulation and bf16 too. Each framework is optional: its tests skip when it is not installed.
"""

from __future__ import annotations

import copy
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from helpers import load_example as example
from torch import nn

import gradreg as gr

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


loop = example("train_loop")


def smooth_mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """No BatchNorm, no dropout: micro-batches and batches see the same function (for exact comparisons)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 3)).to(dtype)


def batch(n: int = 48, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = loop.toy_data(n).tensors
    return x.to(dtype), y


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return float((flat(a) - flat(b)).abs().max())


# ------------------------------------------------------------------------------------------------ plain loop


def test_train_follows_the_schedule_and_updates_batchnorm_once_per_step():
    data = loop.toy_data(256)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = loop.make_model()
    losses, optimizer = loop.train(model, loader, epochs=3)
    steps = 3 * len(loader)
    assert len(losses) == steps and all(map(math.isfinite, losses))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine: 0 after T_max steps
    assert optimizer.base_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert int(model[1].num_batches_tracked) == steps
    assert sum(losses[-4:]) < sum(losses[:4])


def test_clipping_clips_the_gr_direction():
    x, y = batch()
    model, reference = smooth_mlp(), smooth_mlp()
    gr.gr_grad(lambda: nn.functional.cross_entropy(reference(x), y), reference.parameters(), gamma=0.05, eps=0.05)
    d = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    max_norm, lr = 0.5 * float(d.norm()), 0.1  # active clipping
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=lr), gamma=0.05, eps=0.05)
    before = flat(model)
    loop.clipped_step(optimizer, model, x, y, max_norm=max_norm)
    update = (before - flat(model)) / lr
    clipped = d * max_norm / (d.norm() + 1e-6)  # torch's clip_grad_norm_: factor max_norm / (‖d‖ + 1e-6)
    assert float((update - clipped).abs().max()) <= 1e-12


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_follow_the_float32_step(precision):
    x, y = batch(dtype=torch.float32)
    models = {name: smooth_mlp(dtype=torch.float32) for name in ("fp32", precision)}
    optimizers = {name: gr.GR(torch.optim.SGD(m.parameters(), lr=0.1), gamma=0.05, eps=0.05)
                  for name, m in models.items()}
    start = flat(models["fp32"])
    optimizers["fp32"].step(lambda: nn.functional.cross_entropy(models["fp32"](x), y))
    if precision == "bf16":
        loss = loop.bf16_step(optimizers["bf16"], models["bf16"], x, y)
    else:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        loss = loop.fp16_step(optimizers["fp16"], scaler, models["fp16"], x, y, max_norm=1e3)  # inactive clip
        assert scaler.get_scale() == 2.0**12  # no overflow
    assert loss is not None
    exact, low = start - flat(models["fp32"]), start - flat(models[precision])
    error = float((low - exact).norm() / exact.norm())
    assert 0 < error < 0.05, error  # low precision was used, and the step follows the float32 step


@pytest.mark.parametrize("max_norm", [None, 1.0], ids=["step", "clipped"])
def test_an_fp16_overflow_skips_the_step_and_backs_the_scaler_off(max_norm):
    x, y = batch(dtype=torch.float32)
    model = smooth_mlp(dtype=torch.float32)
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=0.05, eps=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    assert loop.fp16_step(optimizer, scaler, model, x, y, max_norm=max_norm) is not None
    before, state = flat(model), copy.deepcopy(optimizer.base_optimizer.state_dict())
    huge = x * 1e5  # overflows float16 (largest finite value 65504) in the first layer
    assert loop.fp16_step(optimizer, scaler, model, huge, y, max_norm=max_norm) is None
    assert torch.equal(flat(model), before)
    assert str(optimizer.base_optimizer.state_dict()) == str(state)  # momentum buffers untouched
    assert scaler.get_scale() == 2.0**11 and optimizer.skipped_steps == 1
    assert loop.fp16_step(optimizer, scaler, model, x, y, max_norm=max_norm) is not None  # and training goes on
    assert not torch.equal(flat(model), before)


@pytest.mark.parametrize("method", ["forward", "central", "double"])
def test_accumulation_equals_the_large_batch(method):
    x, y = batch(n=48)
    big, small = smooth_mlp(), smooth_mlp()
    eps = None if method == "double" else 0.05
    opt_big, opt_small = (gr.GR(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), gamma=0.05, eps=eps,
                                method=method) for m in (big, small))
    for _ in range(3):
        opt_big.step(lambda: nn.functional.cross_entropy(big(x), y))
        loop.accumulated_step(opt_small, small, x, y, micro_batches=3)
    assert max_difference(big, small) <= 1e-12


# ------------------------------------------------------------------------------------------------ Lightning
# The integrations' exact comparisons (γ = 0: the plain trainers; γ > 0: the plain gradreg loop) are in
# tests/test_integrations.py; here the How-to page's examples run as shown.

def test_the_lightning_example_trains_in_bf16_with_adamw_and_accumulation():
    pytest.importorskip("lightning")
    lit = example("lightning_recipe")
    data = loop.toy_data()
    module, trainer = lit.fit(loop.make_model(), data, epochs=3)
    assert trainer.global_step == 3 * 16 // 2  # 16 batches per epoch, 2 per step
    assert loop.accuracy(module.model, data) > 0.6


def test_lightning_automatic_optimization_fails_with_gradregs_error():
    L = pytest.importorskip("lightning")

    class Automatic(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = smooth_mlp()

        def configure_optimizers(self):
            return gr.GR(torch.optim.SGD(self.parameters(), lr=0.1), gamma=0.05, eps=0.05)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match=r"called zero_grad\(\) or backward\(\)"):
        trainer.fit(Automatic(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch(n=8))))


# ------------------------------------------------------------------------------------------------ Hugging Face


def test_the_hf_example_trains_a_tiny_gpt2_in_bf16_with_the_default_optimizer(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = example("hf_trainer")
    model, data = hf.tiny_gpt2(), hf.Tokens()
    trainer = hf.fit(model, data, str(tmp_path), max_steps=20)
    assert trainer.state.global_step == 20
    assert trainer.state.log_history[-1]["train_loss"] < 3.75  # mean over the run; ln 64 = 4.16, plain AdamW 3.64


def test_gr_given_to_the_hf_trainer_fails_with_gradregs_error(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = example("hf_trainer")
    model = hf.tiny_gpt2()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
                                          use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.05, eps=0.05)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=hf.Tokens(8), optimizers=(optimizer, None))
    with pytest.raises(TypeError, match="needs a closure"):
        trainer.train()


# ------------------------------------------------------------------------------------------------ DDP


def torchrun(script: str, *args: str, timeout: int = 300) -> str:
    """``torchrun --standalone --nproc_per_node=2 examples/<script> args`` on CPU (gloo); its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(EXAMPLES / script), *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("perturbation", ["global", "local"])
def test_the_ddp_example_runs_under_torchrun(perturbation):
    out = torchrun("ddp.py", "--steps", "3", "--perturbation", perturbation)
    print(out)
    assert f"world 2, {perturbation} perturbation, 3 steps" in out
    assert "workers' parameters identical: True" in out
    error = float(re.search(r"max \|θ_ddp − θ_single-process\| = (\S+)", out).group(1))
    if perturbation == "global":  # float32: round-off only (the exact float64 check is tests/test_ddp.py)
        assert error <= 1e-5, error
    else:  # each worker's own perturbation: a different step, O(γ) away
        assert 1e-6 < error < 1e-1, error


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "tolerance"), [(("--accumulation", "2"), 1e-5),
                                                  (("--accumulation", "2", "--bf16"), 1e-2)],
                         ids=["accumulation", "accumulation+bf16"])
def test_the_ddp_example_with_accumulation_and_amp_equals_one_process(flags, tolerance):
    """float32: round-off only; bf16 autocast: bf16's round-off (8 bits of mantissa) after 3 steps."""
    out = torchrun("ddp.py", "--steps", "3", *flags)
    assert "workers' parameters identical: True" in out and "accumulation 2" in out
    error = float(re.search(r"max \|θ_ddp − θ_single-process\| = (\S+)", out).group(1))
    assert error <= tolerance, error


@pytest.mark.slow
def test_the_ddp_overhead_script_runs():
    out = torchrun("ddp_overhead.py", "--width", "32", "--depth", "2", "--batch", "8", "--rounds", "2",
                   "--steps", "1")
    assert re.search(r"GR global / GR local = \d+\.\d\d", out), out


# ------------------------------------------------------------------------------------------------ FSDP


def _fsdp_worker(rank: int, store: str, out: str) -> None:
    """FSDP2 (fully_shard) on CPU/gloo: plain SGD works; GR's step and its global norm on sharded gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gradreg._perturb import _global_norm

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = smooth_mlp()
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    x, y = batch(n=16)
    x, y = x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8]
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    result = {"norm": float(_global_norm(grads).full_tensor()),
              "full": float(torch.cat([g.full_tensor().reshape(-1) for g in grads]).norm())}
    before = [p.full_tensor().clone() for p in model.parameters()]
    try:
        gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.05, eps=0.05).step(
            lambda: nn.functional.cross_entropy(model(x), y))
        result["error"] = None
        result["moved"] = max(float((p.full_tensor() - b).abs().max()) for p, b in zip(model.parameters(), before))
    except NotImplementedError as exc:
        result["error"] = str(exc)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()


def fsdp_result(tmp_path) -> dict:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    pytest.importorskip("torch.distributed.fsdp")
    out = tmp_path / "fsdp.pt"
    torch.multiprocessing.spawn(_fsdp_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.slow
def test_fsdp_gr_steps_and_its_sharded_norm_is_global(tmp_path):
    """FSDP2 shards each parameter (DTensor) and runs the forward pass on gathered copies: GR perturbs the local
    shards (gradreg._sharded; the exact checks are tests/test_fsdp.py) and moves the model. The norm of sharded
    gradients is already global."""
    import torch.distributed.fsdp

    if not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard is public from torch 2.6 on")
    result = fsdp_result(tmp_path)
    assert result["norm"] == pytest.approx(result["full"], rel=1e-12)
    assert result["error"] is None and result["moved"] > 0, result
