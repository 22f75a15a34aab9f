"""SAM and its family under FSDP2 (``fully_shard``): N ranks equal one process on the same global batch.

Run on CPU with two processes (gloo):

    torchrun --nproc_per_node 2 examples/fsdp.py

Every parameter is a DTensor split over the ranks; each rank trains on its slice of every global batch and holds
its shard of the global batch's gradient, so ``sam_step(..., perturbation="shared")`` takes ε̂ from the global
batch's gradient: SAM on the global batch. Rank 0 then trains the same float64 model in one process on the whole
batch and prints, per method, the largest |difference| between the two sets of weights.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import samkit
from samkit import sam_step

SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
# method -> (build(model) -> optimizer, micro-batches per rank)
METHODS = {
    "sam": (lambda m: samkit.SAM(m.parameters(), torch.optim.SGD, rho=0.1, **SGD), 1),
    "asam": (lambda m: samkit.SAM(m.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, **SGD), 1),
    "msam-shared": (lambda m: samkit.SAM(m.parameters(), torch.optim.SGD, rho=0.1, **SGD), 2),
    "gsam": (lambda m: samkit.GSAM(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.3, **SGD), 1),
    "fsam": (lambda m: samkit.FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.1, sigma=0.5, **SGD), 1),
    "looksam": (lambda m: samkit.LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=2, alpha=0.7, **SGD), 1),
    "sam-on": (lambda m: samkit.SAMOn(m.parameters(), torch.optim.SGD, model=m, rho=0.5, **SGD), 1),
    "rst": (lambda m: samkit.RandomSAM(m.parameters(), torch.optim.SGD, rho=0.1, prob=0.5, seed=3, **SGD), 1),
    "aesam": (lambda m: samkit.AESAM(m.parameters(), torch.optim.SGD, rho=0.1, total_steps=20, **SGD), 1),
    "late-sam": (lambda m: samkit.LateSAM(m.parameters(), torch.optim.SGD, rho=0.1, start_step=5, **SGD), 1),
    "momentum-sam": (lambda m: samkit.MomentumSAM(m.parameters(), torch.optim.SGD, rho=0.5, **SGD), 1),
}


def model() -> torch.nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank and in the one-process run
    layers = [torch.nn.Linear(20, 64), torch.nn.LayerNorm(64), torch.nn.Tanh(), torch.nn.Linear(64, 4)]
    return torch.nn.Sequential(*layers).to(torch.float64)


def train(method: str, x_all, y_all, steps: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """The weights after ``steps`` steps: sharded over ``world`` ranks (world > 1), or one process (world = 1)."""
    net = model()
    if world > 1:
        for layer in net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(net)
    build, micro_batches = METHODS[method]
    opt = build(net)
    shard = batch_size // world
    for step in range(steps):
        start = (step * batch_size) % (len(x_all) - batch_size) + rank * shard
        x, y = x_all[start : start + shard], y_all[start : start + shard]
        k = micro_batches if world > 1 else 1  # shared mode: k micro-batches give the whole batch's step
        sam_step(opt, net, torch.nn.functional.cross_entropy, x, y, micro_batches=k, perturbation="shared")
    opt.eval()  # Momentum-SAM: the weights back at w
    return torch.cat([(p.full_tensor() if world > 1 else p.detach()).flatten() for p in net.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the ranks")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; valid: {', '.join(METHODS)}")
    if "RANK" not in os.environ:
        raise SystemExit("run me with torchrun, e.g.: torchrun --nproc_per_node 2 examples/fsdp.py")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # CPU; FSDP2 on GPUs works the same with nccl
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % (2 * world):
        raise SystemExit(f"--batch-size {args.batch_size} must split into 2 micro-batches on each of {world} ranks")

    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    x_all = torch.randn(4096, 20, generator=generator, dtype=torch.float64)
    y_all = (x_all @ teacher).argmax(dim=1)
    worst = 0.0
    for method in methods:
        sharded = train(method, x_all, y_all, args.steps, args.batch_size, rank, world)
        if rank == 0:
            single = train(method, x_all, y_all, args.steps, args.batch_size, 0, 1)
            difference = (sharded - single).abs().max().item()
            moved = (single - train_nothing()).abs().max().item()
            worst = max(worst, difference)
            print(f"{method:13s} max |FSDP2 - one process| = {difference:.2e}   (weights moved by {moved:.2e})")
    dist.destroy_process_group()
    if rank == 0 and worst > 1e-10:
        raise SystemExit(f"ERROR: FSDP2 and one process differ by {worst:.2e}")


def train_nothing() -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model().parameters()])


if __name__ == "__main__":
    main()
