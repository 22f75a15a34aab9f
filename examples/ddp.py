"""Data-parallel SAM with DDP: each replica perturbs with its own gradient (the SAM paper's m-sharpness).

Run on CPU with two processes (gloo):

    torchrun --nproc_per_node 2 examples/ddp.py

``sam_step`` runs the ascent forward AND backward under ``model.no_sync()``, so the first gradient is never
all-reduced; only the gradient at w + ε̂ is. R replicas with k micro-batches each are mSAM with R·k
micro-batches. At the end every replica checks that all replicas hold identical weights.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist

from samkit import SAM, sam_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the replicas")
    parser.add_argument("--micro-batches", type=int, default=1, help="micro-batches per replica")
    parser.add_argument("--rho", type=float, default=0.05)
    args = parser.parse_args()

    if "RANK" not in os.environ:
        raise SystemExit("run me with torchrun, e.g.: torchrun --nproc_per_node 2 examples/ddp.py")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if backend == "nccl" else "cpu")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} replicas")

    # the same data on every replica (a seeded synthetic problem); each takes its own shard of every batch
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(20, 4, generator=generator)
    x_all = torch.randn(4096, 20, generator=generator)
    y_all = (x_all @ teacher).argmax(dim=1)

    torch.manual_seed(0)  # identical initial weights everywhere (DDP also broadcasts rank 0's)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).to(device)
    model = torch.nn.parallel.DistributedDataParallel(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=args.rho, lr=0.1, momentum=0.9)
    loss_fn = torch.nn.functional.cross_entropy

    shard = args.batch_size // world
    for step in range(args.steps):
        start = (step * args.batch_size) % (len(x_all) - args.batch_size)
        x = x_all[start + rank * shard : start + (rank + 1) * shard].to(device)
        y = y_all[start + rank * shard : start + (rank + 1) * shard].to(device)
        loss = sam_step(opt, model, loss_fn, x, y, micro_batches=args.micro_batches)
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  mean clean loss {loss.item() / world:.4f}")

    weights = torch.cat([p.detach().flatten() for p in model.module.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    same = all(torch.equal(gathered[0], w) for w in gathered)
    if rank == 0:
        m = shard // args.micro_batches
        print(f"{world} replicas x {args.micro_batches} micro-batch(es): m = {m} examples per perturbation")
        print("replicas hold identical weights" if same else "ERROR: replicas diverged")
    del model, opt  # the DDP reducer must go before the process group, or gloo may abort the process at exit
    gc.collect()
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
