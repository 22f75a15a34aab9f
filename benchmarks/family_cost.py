"""<method>_over_sgd: what a training step of each SAM-family method costs relative to SGD, and its passes.

Every method of ``samkit.experiments.methods`` is built with its default options around SGD(momentum) on its own
copy of the small CNN with BatchNorm (``cnn-bn``: SAM-ON perturbs only normalization layers, so the model needs
them; SGD is timed on the same model), and stepped with ``samkit.sam_step`` on the same Fashion-MNIST-shaped batch. One call is a
block of ``block`` consecutive steps, so that the methods that perturb only on some steps (LookSAM every k-th,
RST with probability p, AE-SAM by its rule, late-phase SAM at the end) show their average cost, not one step's::

    for r in rounds (interleaved, benchmarks.timing):   t[method][r] = time of `block` steps of the method
    ratio(method) = Σ_r t[method][r] / Σ_r t[sgd][r]      (the whole run's time, not a median of one kind of step)
    passes_per_step = optimizer.passes / optimizer.steps  (counted by the optimizer: 1 on a one-pass step, 2 on a
                                                           SAM step)

Late-phase SAM is given ``total_steps`` = every step of the run, so its SAM phase is the run's last 6.25 %; AE-SAM's
c_t schedule runs over the same total.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.step_cost import sgd_training_step
from benchmarks.timing import check_count, interleaved, medians
from benchmarks.workloads import fashion_batch, small_cnn
from samkit import sam_step
from samkit.experiments.methods import METHODS, BuildContext, resolve_options

LR, MOMENTUM, RHO = 0.01, 0.9, 0.05
SKIPPED = ("msam",)  # micro-batch mSAM has its own rows (msam4_over_sam)


def family_over_sgd(*, batch_size: int = 128, block: int = 10, repeats: int = 5, warmup: int = 1, device="cpu"):
    """{"<name>_over_sgd": {"value": ratio, "details": {...}}} for every method of the registry but mSAM."""
    check_count("block", block, minimum=1)
    check_count("repeats", repeats, minimum=1)
    inputs, targets = fashion_batch(batch_size, device=device)
    total_steps = (warmup + repeats) * block
    base_model = small_cnn(device=device, batch_norm=True)
    sgd = torch.optim.SGD(base_model.parameters(), lr=LR, momentum=MOMENTUM)

    def sgd_block() -> None:
        for _ in range(block):
            sgd_training_step(base_model, sgd, inputs, targets)

    variants = {"sgd": sgd_block}
    optimizers = {}
    for name, method in METHODS.items():
        if name in SKIPPED:
            continue
        model = small_cnn(device=device, batch_norm=True)
        context = BuildContext(
            model=model,
            params=list(model.parameters()),
            base_class=torch.optim.SGD,
            base_options={"lr": LR, "momentum": MOMENTUM},
            rho=RHO,
            lr=LR,
            schedule="cosine",
            total_steps=total_steps,
            seed=0,
        )
        optimizer = method.build(context, resolve_options(name, None))
        optimizers[name] = optimizer

        def run_block(model=model, optimizer=optimizer) -> None:
            for _ in range(block):
                sam_step(optimizer, model, F.cross_entropy, inputs, targets)

        variants[name] = run_block
    times = interleaved(variants, repeats=repeats, warmup=warmup)
    seconds = medians(times)
    rows = {}
    for name, optimizer in optimizers.items():
        rows[f"{name}_over_sgd"] = {
            "value": sum(times[name]) / sum(times["sgd"]),
            "details": {
                "passes_per_step": optimizer.passes / optimizer.steps,
                "options": resolve_options(name, None),
                "block": block,
                "repeats": repeats,
                "batch_size": batch_size,
                "median_seconds_per_block": {"method": seconds[name], "sgd": seconds["sgd"]},
            },
        }
    return rows
