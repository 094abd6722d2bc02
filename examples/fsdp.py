"""GR and SAM on FSDP2 (``fully_shard``), one process per rank, started by torchrun:

    torchrun --standalone --nproc_per_node=2 examples/fsdp.py                  # CPU: gloo; GPUs: nccl
    torchrun --standalone --nproc_per_node=2 examples/fsdp.py --method sam

``fully_shard`` every layer and then the root, build GR around an optimizer of the sharded parameters as usual
and call the sharded model in the closure: nothing else changes. GR writes the perturbed point θ + δ into the
local shards (θ's shard is kept in one shard-sized buffer per rank and copied back bit for bit) and all-reduces
the norm of a normalized step, so an FSDP2 step is the single-process step on the ranks' batches together.

The script checks itself: rank 0 gathers every rank's batch and repeats each step in one process on their union.
It prints that difference, the bytes each rank keeps (its shards, GR's buffer, the full parameters) and the
collectives per step of GR against a plain FSDP2 SGD step.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import gradreg as gr


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # the same initial parameters on every rank
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))


def toy_data(n: int = 512, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, :2] > 0).sum(1))


def make_optimizer(params, method: str) -> gr.GR:
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    if method == "sam":
        return gr.GR.sam(base, rho=0.05)
    return gr.GR(base, gamma=0.05, eps=0.05, method="forward")


def gathered(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t``, concatenated in rank order (for the single-process check)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


class Collectives:
    """Counts FSDP's all-gathers and reduce-scatters and every all-reduce while it is on."""

    NAMES = ("all_gather_single", "reduce_scatter_single", "all_reduce")

    def __init__(self):
        self.counts, self.on = dict.fromkeys(self.NAMES, 0), False
        for name in self.NAMES:
            plain = getattr(dist, name)

            def counted(*args, plain=plain, name=name, **kwargs):
                self.counts[name] += self.on
                return plain(*args, **kwargs)

            setattr(dist, name, counted)

    def per_step(self, steps: int) -> str:
        return ", ".join(f"{self.counts[name] / steps:g} {name.split('_single')[0]}" for name in self.NAMES)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main(steps: int, method: str) -> None:
    # [start-fsdp]
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # torchrun sets rank and world
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    model = make_model().to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)  # every layer ...
    fully_shard(model)  # ... and the root: the parameters are now DTensors, sharded over the ranks
    optimizer = make_optimizer(model.parameters(), method)  # GR sees the sharded parameters
    data = toy_data()
    sampler = torch.utils.data.distributed.DistributedSampler(data, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=32, sampler=sampler)  # 32 per rank
    # [end-fsdp]
    reference = make_model().to(device) if rank == 0 else None  # one process, the ranks' batches together
    ref_optimizer = make_optimizer(reference.parameters(), method) if rank == 0 else None
    collectives = Collectives()
    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            collectives.on = True
            # [start-step]
            loss = optimizer.step(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y))  # no backward()
            # [end-step]
            collectives.on = False
            xs, ys = gathered(x), gathered(y)
            if rank == 0:
                ref_optimizer.step(lambda xs=xs, ys=ys: nn.functional.cross_entropy(reference(xs), ys))
            step += 1
            if step == steps:
                break
        epoch += 1
    gr_collectives = collectives.per_step(steps)
    shards = nbytes(p.to_local() for p in model.parameters())  # what each rank keeps between steps
    grads = nbytes(p.grad.to_local() for p in model.parameters())
    momentum = nbytes(t.to_local() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    kept = nbytes(b.to_local() for b in optimizer.buffer.values())
    collectives.counts = dict.fromkeys(Collectives.NAMES, 0)
    collectives.on = True  # one plain FSDP2 SGD step, for comparison
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    collectives.on = False
    optimizer.zero_grad()
    full = [p.full_tensor() for p in model.parameters()]
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, (shards, grads + momentum, kept))
    if rank == 0:
        error = max(float((a - b).detach().abs().max()) for a, b in zip(full, reference.parameters()))
        print(f"world {dist.get_world_size()}, method {method}, {steps} steps, last loss {float(loss):.4f}")
        print(f"max |θ_fsdp − θ_single-process| = {error:.1e}")
        for r, (s, other, k) in enumerate(sizes):
            print(f"rank {r}: shards {s} B, GR's kept buffer {k} B, full parameters {nbytes(full)} B; between "
                  f"steps plain FSDP2 SGD keeps {s + other} B (shards, .grad, momentum), GR {s + other + k} B")
        print(f"collectives per step: GR {gr_collectives}; plain FSDP2 SGD {collectives.per_step(1)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--method", choices=("forward", "sam"), default="forward",
                        help="forward: F-GR with γ = ε = 0.05; sam: GR.sam(rho=0.05)")
    args = parser.parse_args()
    main(args.steps, args.method)
