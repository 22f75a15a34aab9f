"""peak_memory_over_sgd: the peak memory of a SAM training step over that of an SGD training step.

Peak = the bytes alive when the step starts + the highest the allocations made during the step climb::

    CUDA: torch.cuda.reset_peak_memory_stats(); step(); torch.cuda.max_memory_allocated()   (all of it)
    CPU:  start = bytes of the tensors alive at the start (weights, optimizer state, SAM's saved copy,
                  the batch), summed tensor by tensor;
          climb = max over time of the running sum of the allocations (+) and frees (−) that
                  torch.profiler(profile_memory=True) records during one step (torch's CPU allocator
                  reports every tensor allocation; library-internal scratch, e.g. oneDNN's, is not seen)

Both steps start from the steady state (one step taken before, gradients set to None). Beside the
measurement, the difference is predicted from P, the bytes of one copy of the weights::

    SGD peak = weights + momentum + batch + max(climb of the forward-backward)          (.grad inside it)
    SAM peak = SGD peak + P      the saved w, kept for the bit-exact restore; nothing else parameter-sized
                                 outlives a pass: sam_step drops the clean gradient before the perturbed
                                 pass, and first_step computes ε̂ in the weights' own memory (before that
                                 change a fresh ε̂ lived next to the clean gradient: + P more at first_step)
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.step_cost import LR, MOMENTUM, RHO, sgd_training_step
from benchmarks.timing import check_count
from benchmarks.workloads import IMAGE_SHAPE, NUM_CLASSES, fashion_batch
from samkit import SAM, sam_step
from samkit.models import build_model


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage are counted once)."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (momentum buffers, ...) and, for SAM, its saved weights."""
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
    saved = list(getattr(optimizer, "_saved", {}).values())
    return tensor_bytes(state + saved)


def step_peak_bytes(step: Callable[[], object], alive_at_start: Iterable[Tensor], *, device: str) -> dict:
    """{"start", "climb", "peak"} bytes of one call of ``step`` (see the module docstring for how)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"start": start, "climb": peak - start, "peak": peak, "how": "torch.cuda.max_memory_allocated"}
    start = tensor_bytes(alive_at_start)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    level = climb = 0
    for event in events:
        level += event.nbytes()
        climb = max(climb, level)
    return {"start": start, "climb": climb, "peak": start + climb, "how": "torch.profiler(profile_memory=True)"}


def _model(model_name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(model_name, in_channels=IMAGE_SHAPE[0], num_classes=NUM_CLASSES, image_size=IMAGE_SHAPE[1])
    return model.to(device)


def _steady_state_peak(optimizer_name: str, model_name: str, inputs: Tensor, targets: Tensor, device: str) -> dict:
    model = _model(model_name, device)
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

        def step() -> None:
            sgd_training_step(model, optimizer, inputs, targets)

    else:
        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)

        def step() -> None:
            sam_step(optimizer, model, F.cross_entropy, inputs, targets)

    step()  # the steady state: momentum buffers and SAM's saved weights exist
    optimizer.zero_grad(set_to_none=True)
    state = optimizer_bytes(optimizer)
    alive = list(model.parameters()) + list(model.buffers()) + [inputs, targets]
    measured = step_peak_bytes(step, alive, device=device)
    if not device.startswith("cuda"):  # on CUDA the allocator's count already holds the optimizer state
        measured["start"] += state
        measured["peak"] += state
    measured["optimizer_state"] = state
    return measured


def peak_memory_over_sgd(*, model_name: str = "cnn", batch_size: int = 128, device: str = "cpu") -> dict:
    """Row ``peak_memory_over_sgd``: {"value": SAM peak / SGD peak, "details": {...}}."""
    check_count("batch_size", batch_size, minimum=1)
    inputs, targets = fashion_batch(batch_size, device=device)
    peaks = {name: _steady_state_peak(name, model_name, inputs, targets, device) for name in ("sgd", "sam")}
    weights = sum(p.numel() * p.element_size() for p in _model(model_name, "cpu").parameters())
    return {
        "value": peaks["sam"]["peak"] / peaks["sgd"]["peak"],
        "details": {
            "model": model_name,
            "batch_size": batch_size,
            "bytes": peaks,
            "weights_bytes": weights,
            "predicted_difference_bytes": weights,
            "measured_difference_bytes": peaks["sam"]["peak"] - peaks["sgd"]["peak"],
        },
    }
