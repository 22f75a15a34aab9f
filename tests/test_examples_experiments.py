"""The arithmetic of examples/stress_test_seeds.py and examples/fine_tuning.py, checked against plain numpy."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
stress = runpy.run_path(str(EXAMPLES / "stress_test_seeds.py"))
fine_tuning = runpy.run_path(str(EXAMPLES / "fine_tuning.py"))


def test_deviations_are_centred_per_test_set_and_scaled_by_the_clean_std():
    table = np.array([[0.90, 0.50, 0.40], [0.92, 0.60, 0.41], [0.88, 0.40, 0.45], [0.91, 0.55, 0.38]])
    dev = stress["scaled_deviations"](table)
    clean_std = np.std(table[:, 0], ddof=1)
    for j in range(table.shape[1]):
        for i in range(table.shape[0]):
            assert dev[i, j] == pytest.approx((table[i, j] - table[:, j].mean()) / clean_std, abs=1e-12)
    assert np.std(dev[:, 0], ddof=1) == pytest.approx(1.0, abs=1e-12)


def test_deviations_refuse_equal_clean_accuracies():
    with pytest.raises(ValueError, match="same clean accuracy"):
        stress["scaled_deviations"](np.array([[0.9, 0.5], [0.9, 0.6]]))


def test_std_ratio_interval_brackets_the_sample_ratio_and_moves_with_it():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1.0, 12), rng.normal(0, 3.0, 12)
    low, high = stress["std_ratio_interval"](a, b)
    ratio = b.std(ddof=1) / a.std(ddof=1)
    assert low < ratio < high
    low_swapped, high_swapped = stress["std_ratio_interval"](b, a)
    assert high_swapped < low  # a spread 3x smaller is told apart from one 3x larger with 12 seeds each


def test_classes_keeps_the_wanted_labels_and_relabels_from_zero():
    x = torch.arange(10.0).reshape(10, 1)
    y = torch.tensor([0, 5, 6, 9, 4, 5, 7, 8, 1, 9])
    xs, ys = fine_tuning["classes"](x, y, range(5, 10))
    assert xs.flatten().tolist() == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 9.0]
    assert ys.tolist() == [0, 1, 4, 0, 2, 3, 4]


def test_t_interval_matches_the_formula():
    values = np.array([1.0, 2.0, 4.0, 7.0])
    mean, half = fine_tuning["interval"](values)
    assert mean == pytest.approx(3.5)
    # t(0.975, 3) = 3.182446305284263
    assert half == pytest.approx(3.182446305284263 * np.std(values, ddof=1) / 2.0, rel=1e-12)


hessian = runpy.run_path(str(EXAMPLES / "hessian_during_training.py"))


def test_broadened_density_integrates_to_one_and_peaks_at_a_lone_node():
    grid = np.linspace(-10, 10, 20001)
    nodes, weights = np.array([-2.0, 0.5, 3.0]), np.array([0.2, 0.5, 0.3])
    density = hessian["broadened"](nodes, weights, grid, 0.1)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-9)
    # far from the others, each node's bump holds its weight
    near_three = (grid > 2.0) & (grid < 4.0)
    assert np.trapezoid(density[near_three], grid[near_three]) == pytest.approx(0.3, abs=1e-9)
    assert grid[np.argmax(density)] == pytest.approx(0.5, abs=1e-3)


def test_tracked_rows_refuses_a_run_without_densities(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "lambda_max": 2.0}\n')
    with pytest.raises(ValueError, match="--track-hessian"):
        hessian["tracked_rows"](tmp_path)
