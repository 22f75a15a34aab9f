"""mSAM against SAM: the same FLOPs in smaller kernels, and what the two sam_step backends make of it.

All on samkit's small CNN and one Fashion-MNIST-shaped batch of N = 128, timed interleaved::

    msam4_over_sam_loop:  t(sam_step(k=4, backend="loop")) / t(sam_step(k=1))        target <= 1.15
    msam4_over_sam_vmap:  t(sam_step(k=4, backend="vmap")) / t(sam_step(k=1))        (same target)
    msam4_over_sam:       the loop backend's ratio (the default backend, and any model works with it)
    accumulate4_over_sgd: t(4 x forward-backward on N/4 + one SGD step) / t(SGD step on N)
                          the floor: plain gradient accumulation does mSAM's passes without any SAM,
                          so no mSAM implementation can beat this ratio
    vmap_over_loop_k32:   t(sam_step(k=32, "vmap")) / t(sam_step(k=32, "loop")), micro-batches of m = 4,
                          for the CNN and for samkit's MLP (the docstring's claim: vmap pays off there)

The denominator of both msam4 rows is plain SAM, ``sam_step(k=1)`` with the default loop backend.
The vmap backend holds k perturbed copies of the weights and k gradients at once; on CPU those fresh
allocations page-fault whenever glibc has handed the memory back to the OS, so the vmap rows also report
minor page faults per step (their time moves with the allocator's state; see BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.allocator import minor_page_faults
from benchmarks.step_cost import LR, MOMENTUM, RHO, sgd_training_step
from benchmarks.timing import check_count, interleaved, median_ratio, medians
from benchmarks.workloads import IMAGE_SHAPE, NUM_CLASSES, fashion_batch, small_cnn
from samkit import SAM, sam_step
from samkit.models import build_model


def msam_over_sam(
    *, batch_size: int = 128, micro_batches: int = 4, repeats: int = 9, warmup: int = 1, device: str = "cpu"
) -> dict:
    """Rows ``msam4_over_sam_loop``, ``msam4_over_sam_vmap``, ``accumulate4_over_sgd``: {key: row}."""
    check_count("micro_batches", micro_batches, minimum=2)
    if batch_size % micro_batches:
        raise ValueError(f"batch_size must be divisible by micro_batches={micro_batches}, got {batch_size}")
    model = small_cnn(device=device)
    inputs, targets = fashion_batch(batch_size, device=device)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    k = micro_batches

    def step(micro: int, backend: str):
        return lambda: sam_step(sam, model, F.cross_entropy, inputs, targets, micro_batches=micro, backend=backend)

    def accumulated_sgd_step() -> None:
        sgd.zero_grad(set_to_none=True)
        for x, y in zip(inputs.chunk(k), targets.chunk(k)):
            (F.cross_entropy(model(x), y) / k).backward()
        sgd.step()

    times = interleaved(
        {
            "sam": step(1, "loop"),
            f"msam{k}_loop": step(k, "loop"),
            f"msam{k}_vmap": step(k, "vmap"),
            "sam_vmap": step(1, "vmap"),
            "sgd": lambda: sgd_training_step(model, sgd, inputs, targets),
            f"sgd_accumulate{k}": accumulated_sgd_step,
        },
        repeats=repeats,
        warmup=warmup,
    )
    common = {"batch_size": batch_size, "micro_batches": k, "repeats": repeats, "median_seconds": medians(times)}
    return {
        f"msam{k}_over_sam_loop": {"value": median_ratio(times, f"msam{k}_loop", "sam"), "details": common},
        f"msam{k}_over_sam_vmap": {
            "value": median_ratio(times, f"msam{k}_vmap", "sam"),
            "details": {"over_sam_vmap": median_ratio(times, f"msam{k}_vmap", "sam_vmap")},
        },
        f"accumulate{k}_over_sgd": {"value": median_ratio(times, f"sgd_accumulate{k}", "sgd"), "details": {}},
    }


def vmap_over_loop(
    *, model_name: str = "cnn", batch_size: int = 128, micro_batches: int = 32, repeats: int = 5, warmup: int = 1,
    device: str = "cpu",
) -> dict:
    """Row ``vmap_over_loop_k32_<model>``: t(vmap) / t(loop) for many small micro-batches."""
    check_count("micro_batches", micro_batches, minimum=2)
    if batch_size % micro_batches:
        raise ValueError(f"batch_size must be divisible by micro_batches={micro_batches}, got {batch_size}")
    torch.manual_seed(0)
    model = build_model(model_name, in_channels=IMAGE_SHAPE[0], num_classes=NUM_CLASSES, image_size=IMAGE_SHAPE[1])
    model = model.to(device)
    inputs, targets = fashion_batch(batch_size, device=device)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)

    def step(backend: str):
        return lambda: sam_step(
            sam, model, F.cross_entropy, inputs, targets, micro_batches=micro_batches, backend=backend
        )

    variants = {"loop": step("loop"), "vmap": step("vmap")}
    times = interleaved(variants, repeats=repeats, warmup=warmup)
    return {
        "value": median_ratio(times, "vmap", "loop"),
        "details": {
            "model": model_name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "batch_size": batch_size,
            "micro_batches": micro_batches,
            "micro_batch_size": batch_size // micro_batches,
            "repeats": repeats,
            "median_seconds": medians(times),
            "minimum_seconds": {name: min(values) for name, values in times.items()},
            "minor_page_faults_per_step": {name: minor_page_faults(run) for name, run in variants.items()},
        },
    }
