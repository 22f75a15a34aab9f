"""<method>_over_sgd: what a training step of each method of the family costs relative to SGD, and its passes.

Every method of ``samkit.experiments.methods`` is built with its default options around SGD(momentum) on its
own copy of the small CNN with BatchNorm (``cnn-bn``: SAM-ON perturbs only normalization layers, so the model
needs them; SGD is timed on the same model), and trained on the same Fashion-MNIST-shaped batch by the
trainer's own step (``sam_step`` for the SAM family, a plain step with the loss term for MESA and SAF). The
timing is ``samkit.experiments.timing.time_methods``, the one compare uses: blocks of ``block`` consecutive
steps, interleaved round by round, so that the methods that perturb only on some steps (LookSAM every k-th,
RST with probability p, AE-SAM by its rule, late-phase SAM at the end of its run) show their average cost::

    ratio(method) = seconds per step of the method / seconds per step of SGD     (the same rounds)
    passes_per_step = optimizer.passes / optimizer.steps  (counted by the optimizer: 1 on a one-pass step, 2 on
                                                           a SAM step; MESA adds one forward of its EMA model)
"""

from __future__ import annotations

from benchmarks.timing import check_count
from benchmarks.workloads import NUM_CLASSES, fashion_batch, small_cnn
from samkit.experiments.config import TrainConfig
from samkit.experiments.methods import METHODS, resolve_options
from samkit.experiments.timing import time_methods

LR, MOMENTUM = 0.01, 0.9
SKIPPED = ("msam",)  # micro-batch mSAM has its own rows (msam4_over_sam)


def family_over_sgd(*, batch_size: int = 128, block: int = 10, repeats: int = 5, warmup: int = 1, device="cpu"):
    """{"<name>_over_sgd": {"value": ratio, "details": {...}}} for every method of the registry but mSAM."""
    check_count("block", block, minimum=1)
    check_count("repeats", repeats, minimum=1)
    names = ["sgd"] + [name for name in METHODS if name not in SKIPPED]
    base = TrainConfig(
        data="synthetic",
        model="cnn-bn",
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=0.0,
        batch_size=batch_size,
        schedule="constant",
    )
    configs = {name: base.replace(optimizer=name).resolved() for name in names}
    timed = time_methods(
        configs,
        steps=block,
        repeats=repeats,
        warmup=warmup,
        device=device,
        batch=(*fashion_batch(batch_size, device=device), NUM_CLASSES),
        build=lambda config: small_cnn(device=device, batch_norm=True),
    )
    sgd = timed["sgd"]["seconds_per_step"]
    return {
        f"{name}_over_sgd": {
            "value": timed[name]["seconds_per_step"] / sgd,
            "details": {
                "passes_per_step": timed[name]["passes_per_step"],
                "options": resolve_options(name, None),
                "block": block,
                "repeats": repeats,
                "batch_size": batch_size,
                "seconds_per_step": {"method": timed[name]["seconds_per_step"], "sgd": sgd},
            },
        }
        for name in names[1:]
    }
