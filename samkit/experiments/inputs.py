"""The data of one run: the dataset, and the labels it trains on (clean, noisy, or bootstrapped).

    dataset   = load_dataset(data, subset, val_fraction, seed=data_seed)    (normalized tensors, in memory)
    labels    = y_train                                                    clean
              | add_label_noise(y_train, rate, seed=data_seed)              --label-noise R (train and val)
              | argmax model_RUN(x_train)                                  --bootstrap-from RUN
    test labels are never touched: accuracy is always on the clean test set.

Bootstrap (SAM paper, Table 4): train once on the noisy labels, then retrain from scratch on the labels
the first model predicts for the training images. The validation split keeps RUN's (noisy) labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from samkit.experiments.config import TrainConfig
from samkit.experiments.metrics import evaluate

# the split options a bootstrap run must share with its source run, so "the training images" are the same
_SAME_DATA = ("data", "subset", "val_fraction", "data_seed", "data_dir")


@dataclass
class RunData:
    dataset: object  # samkit.data.Dataset
    train_labels: Tensor
    val_labels: Optional[Tensor]
    label_noise: float  # the noise rate behind the labels (the source run's for a bootstrap)
    flipped: Optional[Tensor]  # indices of flipped training labels (label noise only)

    @property
    def model_shape(self) -> dict[str, int]:
        d = self.dataset
        return {"in_channels": d.in_channels, "num_classes": d.num_classes, "image_size": d.image_size}


def _noisy(config: TrainConfig, dataset, rate: float) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    if rate == 0:
        return dataset.y_train, dataset.y_val, None
    from samkit.data import add_label_noise

    train, flipped = add_label_noise(dataset.y_train, rate, dataset.num_classes, seed=config.data_seed)
    val = None
    if dataset.y_val is not None:
        val, _ = add_label_noise(dataset.y_val, rate, dataset.num_classes, seed=config.data_seed + 1)
    return train, val, flipped


def load_config_dataset(config: TrainConfig):
    """The ``samkit.data.Dataset`` (splits, normalization) that ``config`` names, with its original labels."""
    from samkit.data import load_dataset

    return load_dataset(
        config.data,
        data_dir=config.data_dir,
        subset=config.subset,
        val_fraction=config.val_fraction,
        seed=config.data_seed,
    )


def load_run_data(config: TrainConfig, *, device: torch.device | str = "cpu") -> RunData:
    """Load the dataset ``config`` names and the labels to train on (see the module doc)."""
    dataset = load_config_dataset(config)
    if config.bootstrap_from is None:
        train, val, flipped = _noisy(config, dataset, config.label_noise)
        return RunData(dataset, train, val, config.label_noise, flipped)

    from samkit.experiments.runs import open_run

    source = open_run(config.bootstrap_from)
    mismatched = [
        f"{key}={getattr(source.config, key)!r}"
        for key in _SAME_DATA
        if getattr(source.config, key) != getattr(config, key)
    ]
    if mismatched:
        raise ValueError(
            f"--bootstrap-from {config.bootstrap_from} was trained on other data ({', '.join(mismatched)}); "
            "use the same data options as that run so its predictions label the same images"
        )
    predicted = evaluate(
        source.model(device=device),
        dataset.x_train,
        dataset.y_train,
        num_classes=dataset.num_classes,
        device=device,
    ).predictions
    _, val, _ = _noisy(source.config, dataset, source.config.label_noise)
    return RunData(dataset, predicted, val, source.config.label_noise, None)
