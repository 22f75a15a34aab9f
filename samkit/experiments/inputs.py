"""The data of one run: the dataset, and the labels it trains on (clean, noisy, or bootstrapped).

    dataset   = load_dataset(data, subset, val_fraction, seed=data_seed)    (normalized tensors, in memory)
    labels    = y_train                                                    clean
              | add_label_noise(y_train, rate, seed=data_seed)              --label-noise R (train and val)
              | argmax model_RUN(x_train)                                  --bootstrap-from RUN
    test labels are never touched: accuracy is always on the clean test set.
    which labels were flipped: label_noise_record(data) -> DIR/label_noise.json

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
    flipped: Optional[Tensor]  # positions of flipped training labels (label noise only)
    val_flipped: Optional[Tensor] = None  # positions of flipped validation labels (label noise only)

    @property
    def model_shape(self) -> dict[str, int]:
        d = self.dataset
        return {"in_channels": d.in_channels, "num_classes": d.num_classes, "image_size": d.image_size}


def _noisy(config: TrainConfig, dataset, rate: float):
    """(train labels, val labels, flipped train positions, flipped val positions)."""
    if rate == 0:
        return dataset.y_train, dataset.y_val, None, None
    from samkit.data import add_label_noise

    train, flipped = add_label_noise(dataset.y_train, rate, dataset.num_classes, seed=config.data_seed)
    val, val_flipped = None, None
    if dataset.y_val is not None:
        val, val_flipped = add_label_noise(dataset.y_val, rate, dataset.num_classes, seed=config.data_seed + 1)
    return train, val, flipped, val_flipped


def label_noise_record(data: RunData, *, data_seed: int) -> Optional[dict]:
    """Which labels --label-noise flipped, for DIR/label_noise.json (None without label noise).

    Per split: ``positions`` index the run's split (``x_train`` / ``x_val`` after --subset and
    --val-fraction), ``dataset_indices`` the dataset's original training set, and the labels before and after.
    """
    if data.flipped is None:
        return None
    dataset = data.dataset
    record: dict = {"rate": data.label_noise, "data_seed": data_seed}
    splits = (("train", data.flipped, dataset.y_train, data.train_labels, dataset.train_indices),
              ("val", data.val_flipped, dataset.y_val, data.val_labels, dataset.val_indices))
    for split, flipped, clean, noisy, indices in splits:
        if flipped is None:
            continue
        flipped = flipped.cpu()
        record[split] = {
            "count": int(flipped.numel()),
            "of": int(clean.numel()),
            "positions": flipped.tolist(),
            "dataset_indices": (indices[flipped] if indices is not None else flipped).tolist(),
            "clean_labels": clean.cpu()[flipped].tolist(),
            "noisy_labels": noisy.cpu()[flipped].tolist(),
        }
    return record


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
        train, val, flipped, val_flipped = _noisy(config, dataset, config.label_noise)
        return RunData(dataset, train, val, config.label_noise, flipped, val_flipped)

    from samkit.experiments.saved_runs import open_run

    source = open_run(config.bootstrap_from)
    if source.epochs_completed < source.config.epochs:
        raise ValueError(
            f"--bootstrap-from {config.bootstrap_from} holds a run that stopped after {source.epochs_completed} of "
            f"its {source.config.epochs} epochs (interrupted or diverged): finish it first (samkit train ... "
            "--resume), since bootstrap relabels with a trained model's predictions"
        )
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
    _, val, _, _ = _noisy(source.config, dataset, source.config.label_noise)
    return RunData(dataset, predicted, val, source.config.label_noise, None)
