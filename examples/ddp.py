"""GR under DistributedDataParallel, one process per worker, started by torchrun:

    torchrun --standalone --nproc_per_node=2 examples/ddp.py            # CPU: gloo; GPUs: nccl
    torchrun --standalone --nproc_per_node=2 examples/ddp.py --perturbation local
    torchrun --standalone --nproc_per_node=2 examples/ddp.py --accumulation 2 --bf16   # + accumulation, AMP

Pass the DDP module to GR (``ddp=``) and call that module in the closure. By default the perturbation uses the
all-reduced gradient, so a DDP step is the single-process step on the workers' batches together (two gradient
all-reduces per step); ``local_perturbation=True`` perturbs each worker with its own gradient (SAM's
m-sharpness; one all-reduce per step, as for SGD).

The script checks itself: rank 0 gathers every worker's batch and repeats each step in one process on their
union; with global perturbation the parameters agree to round-off. It prints that difference and whether the
workers' parameters are identical.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradreg as gr


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # the same initial parameters on every worker (DDP also broadcasts rank 0's)
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))


def toy_data(n: int = 512, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, :2] > 0).sum(1))


def make_optimizer(params, ddp: DDP | None = None, local: bool = False) -> gr.GR:
    return gr.GR(torch.optim.SGD(params, lr=0.1, momentum=0.9), gamma=0.05, eps=0.05, method="forward",
                 ddp=ddp, local_perturbation=local)


def gathered(t: torch.Tensor) -> torch.Tensor:
    """Every worker's ``t``, concatenated in rank order (for the single-process check)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


# [start-loss]
def ddp_closures(ddp: DDP, x: torch.Tensor, y: torch.Tensor, accumulation: int, bf16: bool) -> list:
    """One closure per micro-batch (accumulation), each under bf16 autocast (AMP) if asked: GR gets the list, and
    synchronises the accumulated gradient once per pass that needs it."""
    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=bf16):
            return nn.functional.cross_entropy(ddp(xb), yb) / accumulation
    return [lambda xb=xb, yb=yb: loss(xb, yb) for xb, yb in zip(x.chunk(accumulation), y.chunk(accumulation))]
# [end-loss]


def main(steps: int, local: bool, accumulation: int = 1, bf16: bool = False) -> None:
    # [start-ddp]
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # torchrun sets rank and world
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    ddp = DDP(make_model().to(device))
    optimizer = make_optimizer(ddp.parameters(), ddp=ddp, local=local)  # GR knows the DDP module ...
    data = toy_data()
    sampler = torch.utils.data.distributed.DistributedSampler(data, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=32, sampler=sampler)  # 32 per worker
    # [end-ddp]
    reference = make_model().to(device) if rank == 0 else None  # one process, the workers' batches together
    ref_optimizer = make_optimizer(reference.parameters()) if rank == 0 else None
    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            # [start-step]
            # ... and the closure calls the DDP module
            if accumulation == 1 and not bf16:
                loss = optimizer.step(lambda x=x, y=y: nn.functional.cross_entropy(ddp(x), y))
            else:  # with accumulation and/or AMP: a list of closures, one per micro-batch
                loss = optimizer.step(ddp_closures(ddp, x, y, accumulation, bf16))
            # [end-step]
            xs, ys = gathered(x), gathered(y)
            if rank == 0:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    ref_optimizer.step(lambda xs=xs, ys=ys: nn.functional.cross_entropy(reference(xs), ys))
            step += 1
            if step == steps:
                break
        epoch += 1
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
    spread = gathered(flat[None]).max(0).values - gathered(flat[None]).min(0).values
    if rank == 0:
        pairs = zip(ddp.module.parameters(), reference.parameters())
        error = max(float((a - b).detach().abs().max()) for a, b in pairs)
        mode = "local" if local else "global"
        print(f"world {dist.get_world_size()}, {mode} perturbation, {steps} steps, last loss {float(loss):.4f}, "
              f"accumulation {accumulation}, {'bf16 autocast' if bf16 else 'float32'}")
        print(f"workers' parameters identical: {float(spread.max()) == 0.0}")
        note = " (local perturbation: a different step by design)" if local else ""
        print(f"max |θ_ddp − θ_single-process| = {error:.1e}{note}")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--perturbation", choices=("global", "local"), default="global",
                        help="global: with the all-reduced gradient; local: each worker with its own")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per worker and step")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (AMP) in every pass")
    args = parser.parse_args()
    main(args.steps, args.perturbation == "local", args.accumulation, args.bf16)
