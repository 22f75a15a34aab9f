"""Side-by-side timing of training methods on one job, in one process: what compare's time column reports.

A run's own seconds per step depend on what else the machine was doing while it trained (other runs, other
users), and reused runs were timed in another invocation. So compare times the selected methods again, side by
side: each method on its own model and optimizer built from its config, on the same batch of the job's
training data, interleaved round by round (the order alternates, A B then B A, so neither always runs on a warm
or a cold cache)::

    warm up: each method `warmup` blocks
    for r in 1..repeats:  for m in (methods if r is odd else reversed(methods)):  t[m][r] = time of one block
    seconds per step (m) = Σ_r t[m][r] / (repeats · steps)          a block = `steps` consecutive training steps

A block of consecutive steps shows a method's average mix of one-pass and SAM steps (LookSAM's k-cycle, RST's
draws, AE-SAM's rule); the optimizer is told that the whole timing is its run (``total_steps``), so late-phase
SAM's last fraction and AE-SAM's schedule fall inside it.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from samkit.experiments.config import TrainConfig


def interleaved(
    variants: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one list entry per round (see the module docstring)."""
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not variants:
        raise ValueError("variants is empty: give at least one name -> callable")
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            synchronize()
            start = time.perf_counter()
            variants[name]()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_methods(
    configs: Mapping[str, TrainConfig],
    *,
    steps: int = 20,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    batch: Optional[tuple[Tensor, Tensor, int]] = None,
    build: Optional[Callable[[TrainConfig], nn.Module]] = None,
) -> dict[str, dict[str, float]]:
    """{name: {"seconds_per_step", "passes_per_step"}} for each config, timed side by side (module docstring).

    Every config must train on the same data (the job's); the batch is the first ``batch_size`` training
    examples, without augmentation. ``batch`` (inputs, targets, number of classes) and ``build`` (config ->
    model) replace the job's data and model (the benchmarks time the methods on a fixed model and batch)."""
    from samkit.experiments.inputs import load_run_data
    from samkit.experiments.optimizers import build_optimizer
    from samkit.experiments.train_step import make_loss_fn, make_scaler, train_step
    from samkit.experiments.trajectory import build_term
    from samkit.models import build_model

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    target = torch.device(device)
    first = next(iter(configs.values()))
    if batch is None:
        data = load_run_data(first, device=target)
        x = data.dataset.x_train[: first.batch_size].to(target)
        y = data.train_labels[: first.batch_size].to(target)
        num_classes = data.dataset.num_classes

        def build(config: TrainConfig) -> nn.Module:
            return build_model(config.model, **data.model_shape)
    else:
        x, y, num_classes = batch[0].to(target), batch[1].to(target), batch[2]
    indices = torch.arange(len(x), device=target)
    total_steps = steps * (repeats + warmup)
    variants, optimizers, terms = {}, {}, {}
    for name, config in configs.items():
        torch.manual_seed(config.seed)
        model = build(config).to(target)
        optimizer = build_optimizer(model, config, total_steps=total_steps)
        loss_fn = make_loss_fn(config.label_smoothing, per_example=getattr(optimizer, "selects_examples", False))
        term, epoch = None, 0
        if config.trajectory_loss is not None:
            epoch = int(config.options["start_epoch"])  # timed as an epoch with the term on: the run's later epochs
            term = build_term(
                config.trajectory_loss,
                dict(config.options),
                model=model,
                base_loss=loss_fn,
                num_examples=len(x),
                num_classes=num_classes,
                distributed=False,
            )
        scaler = make_scaler(config, target)
        model.train()

        def block(
            config=config, model=model, optimizer=optimizer, loss_fn=loss_fn, term=term, scaler=scaler, epoch=epoch
        ):
            for _ in range(steps):
                step_loss = loss_fn if term is None else term.loss_fn(x, indices, epoch)
                train_step(config, optimizer, model, step_loss, x, y, scaler=scaler)
                if term is not None:
                    term.after_step()

        variants[name], optimizers[name], terms[name] = block, optimizer, term
    times = interleaved(variants, repeats=repeats, warmup=warmup)
    result = {}
    for name, optimizer in optimizers.items():
        done = steps * (repeats + warmup)
        result[name] = {
            "seconds_per_step": sum(times[name]) / (repeats * steps),
            "passes_per_step": float(getattr(optimizer, "passes", done)) / done,
        }
    return result
