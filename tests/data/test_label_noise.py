"""add_label_noise: exact counts, only real flips, seeding, uniform targets, input untouched, errors."""

import math

import pytest
import torch

from samkit.data import add_label_noise


def labels(n=1000, classes=10, seed=0):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n, rate", [(1000, 0.3), (5, 0.5), (7, 0.2), (10, 0.05), (3, 0.999), (1, 0.6), (0, 0.4)])
def test_exactly_round_rate_n_labels_change(n, rate):
    y = labels(n)
    noisy, flipped = add_label_noise(y, rate, 10, seed=1)
    assert flipped.numel() == math.floor(rate * n + 0.5)  # half up: 5 x 0.5 flips 3
    assert flipped.dtype == torch.int64 and torch.equal(flipped, flipped.unique())  # sorted, distinct
    assert torch.equal((noisy != y).nonzero().flatten(), flipped)  # every flip is to a DIFFERENT class


def test_input_untouched_and_rate_zero_is_identity():
    y = labels()
    before = y.clone()
    noisy, flipped = add_label_noise(y, 0.4, 10, seed=0)
    assert torch.equal(y, before) and noisy is not y and noisy.dtype == y.dtype
    clean, none = add_label_noise(y, 0.0, 10, seed=0)
    assert torch.equal(clean, y) and none.numel() == 0 and clean is not y


def test_seeded():
    y = labels()
    a, fa = add_label_noise(y, 0.2, 10, seed=5)
    b, fb = add_label_noise(y, 0.2, 10, seed=5)
    c, fc = add_label_noise(y, 0.2, 10, seed=6)
    assert torch.equal(a, b) and torch.equal(fa, fb)
    assert not torch.equal(fa, fc) and not torch.equal(a, c)


def test_higher_rate_flips_a_superset_with_the_same_seed():
    y = labels()
    _, low = add_label_noise(y, 0.2, 10, seed=3)
    _, high = add_label_noise(y, 0.6, 10, seed=3)
    assert set(low.tolist()) <= set(high.tolist())


def test_new_labels_uniform_over_the_other_classes_and_positions_uniform():
    n, classes = 20000, 5
    y = torch.zeros(n, dtype=torch.int64)
    noisy, flipped = add_label_noise(y, 0.5, classes, seed=0)
    counts = torch.bincount(noisy[flipped], minlength=classes)
    assert counts[0] == 0
    # 10000 flips, each class 1..4 with p = 1/4: binomial sd = sqrt(10000 * 1/4 * 3/4) = 43.3; allow 6 sd
    assert bool(((counts[1:] - 2500).abs() < 6 * 43.3).all()), counts
    # positions: the first half of the data holds half the flips, binomial sd 50, allow 6 sd
    assert abs(int((flipped < n // 2).sum()) - 5000) < 6 * 50


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((labels(), 1.0, 10), ValueError, r"rate must be in \[0, 1\), got 1.0"),
        ((labels(), -0.1, 10), ValueError, "got -0.1"),
        ((labels(), "0.2", 10), ValueError, "got '0.2'"),
        ((labels(), 0.2, 1), ValueError, "num_classes must be an int >= 2"),
        ((labels(), 0.2, 5), ValueError, r"labels must lie in \[0, 4\]"),
        ((labels().float(), 0.2, 10), ValueError, "1-D integer tensor"),
        ((labels().reshape(10, 100), 0.2, 10), ValueError, "1-D integer tensor"),
        (([0, 1, 2], 0.2, 10), ValueError, "1-D integer tensor, got list"),
    ],
)
def test_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        add_label_noise(*args, seed=0)


def test_seed_must_be_an_int():
    with pytest.raises(TypeError, match="seed must be an int"):
        add_label_noise(labels(), 0.2, 10, seed="0")
