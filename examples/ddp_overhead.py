"""What GR's extra all-reduce costs under DDP: time per step of SGD, GR with local perturbation (one all-reduce per
step, like SGD) and GR with global perturbation (two), as medians over interleaved rounds:

    torchrun --standalone --nproc_per_node=2 examples/ddp_overhead.py --width 512 --depth 4 --rounds 15

Prints the median ms/step of each and the ratios. Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradreg as gr


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(width, width) for _ in range(depth)]
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())][:-1])


def variants(width: int, depth: int) -> dict:
    """name → (DDP module, one step(x, y))."""
    out = {}
    for name in ("SGD", "GR local", "GR global"):
        ddp = DDP(make_model(width, depth))
        base = torch.optim.SGD(ddp.parameters(), lr=1e-3)
        if name == "SGD":
            def step(x, y, ddp=ddp, base=base):
                base.zero_grad()
                nn.functional.mse_loss(ddp(x), y).backward()
                base.step()
        else:
            opt = gr.GR(base, gamma=0.05, eps=0.05, method="forward", ddp=ddp, local_perturbation=name == "GR local")

            def step(x, y, ddp=ddp, opt=opt):
                opt.step(lambda: nn.functional.mse_loss(ddp(x), y))
        out[name] = step
    return out


def main(width: int, depth: int, batch: int, rounds: int, steps: int) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    steppers = variants(width, depth)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for step in steppers.values():  # warm-up
        step(x, y)
    for _ in range(rounds):
        for name, step in steppers.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                step(x, y)
            dist.barrier()
            times[name].append((time.perf_counter() - start) / steps)
    if dist.get_rank() == 0:
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        params = sum(p.numel() for p in make_model(width, depth).parameters())
        print(f"world {dist.get_world_size()} (gloo, {torch.get_num_threads()} thread(s) each), MLP width {width} "
              f"depth {depth} ({params / 1e6:.2f} M parameters), batch {batch} per worker, median of {rounds} "
              f"interleaved rounds of {steps} steps")
        for name, value in ms.items():
            print(f"{name:10s} {value:8.2f} ms/step  ×SGD {value / ms['SGD']:.2f}")
        print(f"GR global / GR local = {ms['GR global'] / ms['GR local']:.2f} (the extra all-reduce)")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    main(args.width, args.depth, args.batch, args.rounds, args.steps)
