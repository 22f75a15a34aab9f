"""Everything ``train`` checks and builds before it touches the run folder: the names, the data, the batch split,
the model (``--init-from`` weights), the trajectory term (MESA, SAF), the optimizer and the GradScaler.

    check_names(config)                    unknown dataset, model or augmentation: refused, listing the valid ones
    data = load_run_data(config)           (label noise / bootstrap)
    torch.manual_seed(seed); model = build_model(...) (+ --init-from weights); optimizer = build_optimizer(...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from samkit.experiments import fsdp as sharding
from samkit.experiments.config import TrainConfig
from samkit.experiments.inputs import RunData, load_run_data
from samkit.experiments.optimizers import build_optimizer
from samkit.experiments.train_step import make_loss_fn, make_scaler
from samkit.experiments.training.state import TrainingState


@dataclass
class Prepared:
    """What the epochs run on."""

    data: RunData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]


def check_names(config: TrainConfig) -> None:
    """Unknown dataset, model or augmentation names, listing the valid ones, before any work."""
    from samkit.data import AUGMENTATIONS, check_dataset_name
    from samkit.models import MODELS, build_model

    check_dataset_name(config.data)  # a known name or npz:PATH
    if config.model not in MODELS:
        try:  # the registry also parses sized names beyond its list, e.g. wrn-10-1 or resnet8
            build_model(config.model, in_channels=1, num_classes=2, image_size=8)
        except ValueError as error:
            # a sized name of a known family (wrn-15-2) says what is wrong with its size
            why = "" if str(error).startswith("unknown model") else f" ({error})"
            raise ValueError(
                f"unknown model {config.model!r}{why}; valid: {', '.join(MODELS)} (and wrn-D-W[-nobn], resnetD)"
            ) from None
    if config.augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {config.augment!r}; valid: {', '.join(AUGMENTATIONS)}")


def prepare(state: TrainingState) -> Prepared:
    """The data, model, optimizer and scaler of the run (raises ValueError on bad input; call under checking())."""
    config = state.config
    data = load_run_data(config, device=state.device)
    check_batches(state, data.train_labels.shape[0])
    model = build_model(state, data)
    if config.trajectory_loss is not None:
        from samkit.experiments.trajectory import build_term

        state.term = build_term(
            config.trajectory_loss,
            dict(config.options or {}),
            model=model,
            base_loss=make_loss_fn(config.label_smoothing),
            num_examples=data.train_labels.shape[0],
            num_classes=data.dataset.num_classes,
            distributed=state.context.distributed,
        )
    total_steps = (data.train_labels.shape[0] // config.batch_size) * config.epochs
    if state.fsdp:  # before the optimizer: it must hold the sharded (DTensor) parameters
        state.evaluated = sharding.plain_copy(model)
        sharding.shard(model)
    optimizer = build_optimizer(model, config, total_steps=total_steps)
    return Prepared(data, model, optimizer, make_scaler(config, state.device))


def check_batches(state: TrainingState, n_train: int) -> None:
    config, world = state.config, state.context.world_size
    if config.batch_size > n_train:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the {n_train} training examples: lower --batch-size"
        )
    if config.batch_size % (world * config.micro_batches):
        raise ValueError(
            f"batch_size={config.batch_size} must split evenly over {world} process(es) x "
            f"{config.micro_batches} micro-batch(es): pick a multiple of {world * config.micro_batches}"
        )


def build_model(state: TrainingState, data: RunData) -> nn.Module:
    from samkit.models import build_model as build_named_model

    config = state.config
    torch.manual_seed(config.seed)
    model = build_named_model(config.model, **data.model_shape)
    if config.init_from is not None:
        from samkit.experiments.saved_runs import open_run
        from samkit.experiments.transfer import load_matching_weights

        source = open_run(config.init_from)
        if source.config.model != config.model:
            raise ValueError(
                f"--init-from {config.init_from} holds a {source.config.model!r} model, not "
                f"{config.model!r}: use --model {source.config.model}"
            )
        _, fresh = load_matching_weights(model, source.checkpoint["model"])
        state.say(f"init from {source.path}: kept fresh {fresh if fresh else 'nothing'}")
    if config.subspace is not None:  # a line of networks: this model is its first endpoint
        from samkit.experiments.subspace import build_line

        model = build_line(model, lambda: build_named_model(config.model, **data.model_shape), config.seed)
    return model.to(state.device)
