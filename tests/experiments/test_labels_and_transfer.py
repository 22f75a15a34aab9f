"""Bootstrap (retrain on a run's predicted labels), init-from with a new head, label noise in a run."""

import json

import pytest
import torch

from samkit.data import load_dataset
from samkit.experiments.checkpoint import load_checkpoint, save_checkpoint
from samkit.experiments.saved_runs import open_run
from samkit.experiments.trainer import train
from samkit.experiments.transfer import load_matching_weights
from samkit.models import build_model

from .conftest import TINY


def test_bootstrap_trains_on_the_labels_the_first_run_predicts(finished_run, tmp_path):
    source, _ = finished_run
    summary = train(
        TINY.replace(bootstrap_from=str(source), epochs=1), tmp_path / "boot", device="cpu", quiet=True, plot=False
    )
    dataset = load_dataset("synthetic")
    with torch.no_grad():
        expected = open_run(source).model()(dataset.x_train).argmax(1)
    assert torch.equal(load_checkpoint(tmp_path / "boot")["train_labels"], expected)
    assert summary["bootstrap_from"] == str(source) and summary["label_noise"] == 0.0


def test_bootstrap_needs_a_finished_run(finished_run, tmp_path):
    source, _ = finished_run
    unfinished = load_checkpoint(source)
    unfinished["epoch"] = unfinished["config"]["epochs"] - 1  # as a run stopped one epoch short
    save_checkpoint(tmp_path / "cut.pt", unfinished)
    with pytest.raises(ValueError, match=r"stopped after 1 of its 2 epochs"):
        train(TINY.replace(bootstrap_from=str(tmp_path / "cut.pt")), tmp_path / "b", device="cpu", quiet=True)
    assert not (tmp_path / "b" / "config.json").exists()


def test_bootstrap_needs_the_same_training_images(finished_run, tmp_path):
    source, _ = finished_run
    with pytest.raises(ValueError, match=r"was trained on other data \(subset=None\)"):
        train(
            TINY.replace(bootstrap_from=str(source), subset=128), tmp_path / "b", device="cpu", quiet=True, plot=False
        )


def test_label_noise_flips_the_asked_fraction_of_training_labels_and_records_which(tmp_path):
    config = TINY.replace(label_noise=0.25, epochs=1, val_fraction=0.25)
    summary = train(config, tmp_path / "noisy", device="cpu", quiet=True, plot=False)
    labels = load_checkpoint(tmp_path / "noisy")["train_labels"]
    clean = load_dataset("synthetic", val_fraction=0.25)
    with torch.no_grad():  # test labels are never touched: accuracy is against the clean test set
        predicted = open_run(tmp_path / "noisy").model()(clean.x_test).argmax(1)
    assert summary["test_accuracy"] == (predicted == clean.y_test).double().mean().item()
    changed = (labels != clean.y_train).nonzero().flatten()
    assert changed.numel() == round(0.25 * clean.y_train.numel())

    record = json.loads((tmp_path / "noisy" / "label_noise.json").read_text())
    assert record["rate"] == 0.25 and record["data_seed"] == 0
    train_record, val_record = record["train"], record["val"]
    assert train_record["positions"] == changed.tolist()
    assert train_record["dataset_indices"] == clean.train_indices[changed].tolist()
    assert train_record["clean_labels"] == clean.y_train[changed].tolist()
    assert train_record["noisy_labels"] == labels[changed].tolist()
    assert len(val_record["positions"]) == round(0.25 * clean.y_val.numel())
    assert set(val_record["dataset_indices"]) <= set(clean.val_indices.tolist())
    assert all(a != b for a, b in zip(val_record["clean_labels"], val_record["noisy_labels"]))

    again = tmp_path / "again"  # the record is as seeded as the flips
    train(config, again, device="cpu", quiet=True, plot=False)
    assert json.loads((again / "label_noise.json").read_text()) == record
    train(TINY.replace(epochs=1), again, device="cpu", quiet=True, plot=False, overwrite=True)
    assert not (again / "label_noise.json").exists()  # a clean run in the same folder leaves no stale record


def test_init_from_copies_the_body_and_gives_a_new_head(finished_run, tmp_path):
    source, _ = finished_run  # synthetic: 4 classes; digits: 10 classes, same 8x8 single-channel images
    config = TINY.replace(data="digits", init_from=str(source), epochs=1, lr=1e-12, momentum=0.0, weight_decay=0.0)
    train(config, tmp_path / "digits", device="cpu", quiet=True, plot=False)
    before, after = load_checkpoint(source)["model"], load_checkpoint(tmp_path / "digits")["model"]
    heads = [name for name in after if after[name].shape != before[name].shape]
    assert heads and all(after[name].shape[0] == 10 for name in heads if name.endswith("weight"))
    for name in after:
        if name not in heads:
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-9)


def test_init_from_refuses_another_architecture():
    small = build_model("mlp", in_channels=1, num_classes=4, image_size=8).state_dict()
    with pytest.raises(ValueError, match="does not fit this model"):
        load_matching_weights(build_model("cnn", in_channels=1, num_classes=4, image_size=8), small)
