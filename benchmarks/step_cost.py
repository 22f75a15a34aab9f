"""sam_over_sgd_step: the time of a full SAM training step over a full SGD step, same model, same batch.

SAM's price is a second forward-backward pass, so a SAM step costs at least 2 SGD steps; what samkit adds
beyond that (the ascent, the restore, the bookkeeping in ``sam_step``) is overhead. Both steps, timed
interleaved (``benchmarks.timing``)::

    SGD:  zero_grad; loss(model(x), y).backward(); SGD(momentum).step()
    SAM:  samkit.sam_step(SAM(SGD(momentum)), model, loss, x, y)         # micro_batches = 1
    ratio = median over rounds of t_SAM / t_SGD                              (target <= 2.05)

The model is samkit's small CNN on a Fashion-MNIST-shaped batch (1x28x28, 10 classes). The details add
t_SAM / t(two SGD steps in a row), which is what samkit adds beyond the second pass (SAM does one
optimizer update where two SGD steps do two, so 1.0 means no overhead at all), and the minor page faults
per step: each pass allocates ~100 MB of activations, and how many of those pages fault depends on the
state of glibc's heap, not on SAM (``run.py --keep-freed-memory`` takes that out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.allocator import minor_page_faults
from benchmarks.timing import check_count, interleaved, median_ratio, medians
from benchmarks.workloads import fashion_batch, small_cnn
from samkit import SAM, sam_step

LR, MOMENTUM, RHO = 0.01, 0.9, 0.05


def sgd_training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs, targets) -> None:
    """One plain training step: the unit every SAM cost is measured in."""
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()


def sam_over_sgd_step(*, batch_size: int = 128, repeats: int = 15, warmup: int = 2, device: str = "cpu") -> dict:
    """Row ``sam_over_sgd_step``: {"value": ratio, "details": {...}}."""
    check_count("batch_size", batch_size, minimum=1)
    model = small_cnn(device=device)
    inputs, targets = fashion_batch(batch_size, device=device)
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
    # the two optimizers move the same weights; neither step's cost depends on the values
    def sgd_step() -> None:
        sgd_training_step(model, sgd, inputs, targets)

    variants = {
        "sgd": sgd_step,
        "sam": lambda: sam_step(sam, model, F.cross_entropy, inputs, targets),
        "sgd_twice": lambda: (sgd_step(), sgd_step()),
    }
    times = interleaved(variants, repeats=repeats, warmup=warmup)
    seconds = medians(times)
    return {
        "value": median_ratio(times, "sam", "sgd"),
        "details": {
            "batch_size": batch_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "repeats": repeats,
            "median_seconds": seconds,
            "ratio_of_minimums": min(times["sam"]) / min(times["sgd"]),
            "sam_over_two_sgd_steps": median_ratio(times, "sam", "sgd_twice"),
            "minor_page_faults_per_call": {name: minor_page_faults(run) for name, run in variants.items()},
        },
    }
