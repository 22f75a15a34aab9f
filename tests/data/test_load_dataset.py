"""load_dataset for digits and synthetic: splits, subsets, validation hold-out, normalization, errors."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from samkit.data import DATASETS, Dataset, load_dataset
from samkit.data.digits import load_digits_arrays
from samkit.data.synthetic import load_synthetic_arrays


def pixels(ds, x):
    """Back to the [0, 1] scale, in float64."""
    return x.double() * ds.std[0] + ds.mean[0]


def test_names_and_unknown_name():
    assert DATASETS == ("digits", "fashion-mnist", "synthetic", "cifar10", "cifar100", "cifar100-coarse")
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*digits.*fashion-mnist.*synthetic"):
        load_dataset("imagenet")


def test_digits_shapes_dtypes_and_stratified_split():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert (ds.num_classes, ds.in_channels, ds.image_size, ds.classes) == (10, 1, 8, [str(d) for d in range(10)])
    assert ds.x_val is None and ds.y_val is None
    full = np.bincount(load_digits().target, minlength=10)
    # stratified: each class holds 360/1797 of its examples in the test set, to the nearest example
    assert np.all(np.abs(np.bincount(ds.y_test.numpy(), minlength=10) - full * 360 / 1797) < 1.0)


def test_digits_split_is_a_partition_of_the_scaled_images():
    ds = load_dataset("digits")
    digits = load_digits()
    both = torch.cat([pixels(ds, ds.x_train), pixels(ds, ds.x_test)]).reshape(-1, 64).numpy() * 16
    assert np.abs(both - np.round(both)).max() < 1e-4  # pixel counts 0..16, scaled by exactly 1/16
    labels = torch.cat([ds.y_train, ds.y_test]).numpy()
    ours = sorted(zip(labels.tolist(), map(tuple, np.round(both).astype(int).tolist())))
    theirs = sorted(zip(digits.target.tolist(), map(tuple, digits.data.astype(int).tolist())))
    assert ours == theirs


def test_normalization_uses_training_split_statistics_only():
    ds = load_dataset("digits", val_fraction=0.1, seed=3)
    raw = load_digits_arrays()[0].double()[ds.train_indices]
    assert ds.mean[0] == pytest.approx(raw.mean().item(), rel=1e-12)
    assert ds.std[0] == pytest.approx(raw.std(correction=0).item(), rel=1e-12)
    np.testing.assert_allclose(ds.x_train.numpy(), ((raw - ds.mean[0]) / ds.std[0]).numpy(), rtol=0, atol=1e-6)
    x = ds.x_train.double()
    assert abs(x.mean().item()) < 1e-6 and abs(x.std(correction=0).item() - 1) < 1e-6


def test_validation_split_is_seeded_and_disjoint():
    ds = load_dataset("digits", val_fraction=0.1, seed=0)
    assert ds.x_val.shape == (144, 1, 8, 8) and ds.y_val.shape == (144,)  # round(0.1 * 1437) = 144
    train, val = set(ds.train_indices.tolist()), set(ds.val_indices.tolist())
    assert not train & val and train | val == set(range(1437))
    raw_x, raw_y = load_digits_arrays()[:2]
    np.testing.assert_allclose(pixels(ds, ds.x_val).numpy(), raw_x[ds.val_indices].double().numpy(), atol=1e-6)
    assert torch.equal(ds.y_val, raw_y[ds.val_indices])
    again = load_dataset("digits", val_fraction=0.1, seed=0)
    other = load_dataset("digits", val_fraction=0.1, seed=1)
    assert torch.equal(ds.val_indices, again.val_indices) and torch.equal(ds.x_val, again.x_val)
    assert not torch.equal(ds.val_indices, other.val_indices)
    # the test set does not move with the seed
    assert torch.equal(ds.y_test, other.y_test)
    np.testing.assert_allclose(pixels(ds, ds.x_test).numpy(), pixels(other, other.x_test).numpy(), atol=1e-6)


def test_subset_keeps_n_seeded_training_examples_and_the_whole_test_set():
    ds = load_dataset("digits", subset=100, seed=5)
    assert ds.x_train.shape[0] == 100 and ds.x_test.shape[0] == 360
    idx = ds.train_indices
    assert idx.unique().numel() == 100 and torch.equal(idx, idx.sort().values)
    assert torch.equal(ds.y_train, load_digits_arrays()[1][idx])
    assert torch.equal(idx, load_dataset("digits", subset=100, seed=5).train_indices)
    assert not torch.equal(idx, load_dataset("digits", subset=100, seed=6).train_indices)
    with_val = load_dataset("digits", subset=100, val_fraction=0.2, seed=5)
    assert with_val.x_train.shape[0] == 80 and with_val.x_val.shape[0] == 20
    assert set(with_val.train_indices.tolist()) | set(with_val.val_indices.tolist()) == set(idx.tolist())


def test_synthetic_subset_cuts_the_test_set_too():
    ds = load_dataset("synthetic", subset=40)
    assert ds.x_train.shape == (40, 1, 8, 8) and ds.x_test.shape == (40, 1, 8, 8)
    assert ds.num_classes == 4 and len(ds.classes) == 4
    assert load_dataset("synthetic").x_test.shape[0] == 128


def test_synthetic_is_fixed_balanced_and_learnable():
    x_train, y_train, x_test, y_test = load_synthetic_arrays()
    again = load_synthetic_arrays()
    assert all(torch.equal(a, b) for a, b in zip((x_train, y_train, x_test, y_test), again))
    assert torch.equal(torch.bincount(y_train), torch.full((4,), 64))
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    ds = load_dataset("synthetic")
    # nearest class mean, a linear classifier fitted in closed form on the training split
    x_train, x_test = ds.x_train.flatten(1).double(), ds.x_test.flatten(1).double()
    centroids = torch.stack([x_train[ds.y_train == k].mean(0) for k in range(4)])
    accuracy = (torch.cdist(x_test, centroids).argmin(1) == ds.y_test).double().mean().item()
    assert accuracy > 0.9  # chance is 0.25


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"subset": 0}, ValueError, "subset must be a positive int"),
        ({"subset": -3}, ValueError, "got -3"),
        ({"subset": 2.5}, ValueError, "got 2.5"),
        ({"subset": True}, ValueError, "got True"),
        ({"subset": 257}, ValueError, "subset must be <= 256"),
        ({"val_fraction": 1.0}, ValueError, r"val_fraction must be in \[0, 1\), got 1.0"),
        ({"val_fraction": -0.1}, ValueError, "got -0.1"),
        ({"val_fraction": 0.001, "subset": 100}, ValueError, "leaves 0 for validation"),
        ({"seed": "a"}, TypeError, "seed must be an int"),
    ],
)
def test_bad_options_are_named(options, error, message):
    with pytest.raises(error, match=message):
        load_dataset("synthetic", **options)


def test_dataset_checks_its_tensors():
    x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64)
    ds = Dataset("t", x, y, None, None, x, y, num_classes=2, in_channels=1, image_size=8, classes=["a", "b"])
    assert ds.mean == (0.0,) and ds.std == (1.0,)
    with pytest.raises(ValueError, match=r"expected \(1, 28, 28\)"):
        Dataset("t", x, y, None, None, x, y, num_classes=2, in_channels=1, image_size=28, classes=["a", "b"])
    with pytest.raises(ValueError, match="y_test must be int64"):
        Dataset("t", x, y, None, None, x, y.int(), num_classes=2, in_channels=1, image_size=8, classes=["a", "b"])
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        Dataset("t", x, y + 2, None, None, x, y, num_classes=2, in_channels=1, image_size=8, classes=["a", "b"])
    with pytest.raises(ValueError, match="x_val and y_val must both"):
        Dataset("t", x, y, x, None, x, y, num_classes=2, in_channels=1, image_size=8, classes=["a", "b"])
