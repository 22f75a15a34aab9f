"""SAMLightningModule under Lightning's DDP strategy (gloo, 2 CPU processes, one spawn): each replica ascends with
its own gradient and only the perturbed gradient is all-reduced, so 2 replicas equal one process running mSAM with
2 micro-batches (the replicas' batches) on the same data, as samkit.sam_step under DDP does."""

from __future__ import annotations

import gc
import os
import socket

import pytest

pl = pytest.importorskip("pytorch_lightning", reason="the Lightning integration needs samkit[lightning]")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from samkit import SAM, LookSAM, sam_step  # noqa: E402
from tests.integrations.lightning_support import Classifier, data, net, sgd_sam, trainer  # noqa: E402

STEPS, BATCH = 3, 4


def _looksam(params):
    return sgd_sam(params, LookSAM, k=2)


class DecidingSAM(SAM):
    """SAM with a rule that reads the clean gradient, as AE-SAM's does: it records the gradient it decides on and
    takes a SAM step on even steps, a one-pass step on odd ones."""

    def _plan(self):
        return None

    def _decide(self, grads):
        self.__dict__.setdefault("seen", []).append(torch.cat([g.flatten() for g in grads]).clone())
        return self.steps % 2 == 0


def _deciding(params):
    return sgd_sam(params, DecidingSAM)


# optimizer, batches per step: plain SAM; LookSAM's clean gradient averaged over replicas, with accumulation;
# a rule deciding on the replicas' mean gradient (both outcomes)
CASES = {"sam": (sgd_sam, 1), "looksam-accumulate-2": (_looksam, 2), "deciding": (_deciding, 1)}


def _replica_batches(rank: int):
    x, y = data()
    return torch.utils.data.TensorDataset(x[rank::2], y[rank::2])


def _replica(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    os.environ["NODE_RANK"] = "0"
    torch.set_num_threads(1)
    try:
        for name, (make, k) in CASES.items():
            module = Classifier(make, accumulate_grad_batches=k)
            t = trainer(devices=2, strategy="ddp", max_steps=STEPS, use_distributed_sampler=False)
            t.fit(module, torch.utils.data.DataLoader(_replica_batches(rank), batch_size=BATCH))
            weights = torch.cat([p.detach().flatten() for p in module.net.parameters()])
            counts = (t.global_step, module.sam_optimizer.steps, module.sam_optimizer.sam_steps)
            seen = getattr(module.sam_optimizer, "seen", None)
            torch.save((weights, counts, seen), f"{out_dir}/{name}-rank{rank}.pt")
    finally:
        gc.collect()  # no DDP reducer may outlive the process group
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _one_process(make, k: int, micro_batches: int):
    """The same steps in one process: each step's batch is the replicas' windows side by side."""
    model = net()
    optimizer = make(model.parameters())
    parts = [_replica_batches(rank).tensors for rank in range(2)]
    for step in range(STEPS):
        window = slice(step * BATCH * k, (step + 1) * BATCH * k)
        x = torch.cat([xs[window] for xs, _ in parts])
        y = torch.cat([ys[window] for _, ys in parts])
        sam_step(optimizer, model, F.cross_entropy, x, y, micro_batches=micro_batches)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), optimizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_replicas_equal_msam_with_their_batches_as_micro_batches(tmp_path):
    mp.spawn(_replica, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for name, (make, k) in CASES.items():
        (rank0, counts, seen), (rank1, counts1, _) = (torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(2))
        assert torch.equal(rank0, rank1), name
        expected, optimizer = _one_process(make, k, micro_batches=2)
        assert (rank0 - expected).abs().max().item() <= 1e-12, name
        assert counts == counts1 == (STEPS, STEPS, optimizer.sam_steps), name
        if seen is not None:  # the rule saw the whole batch's gradient (the replicas' mean), as in one process
            reference = optimizer.seen
            assert len(seen) == len(reference) == STEPS
            assert max((a - b).abs().max().item() for a, b in zip(seen, reference)) <= 1e-15
        # and not SAM on the whole batch: the replicas really ascended separately
        whole, _ = _one_process(make, k, micro_batches=1)
        assert (rank0 - whole).abs().max().item() > 1e-6, name
