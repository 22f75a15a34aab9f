"""The arithmetic of examples/stress_test_seeds.py and examples/fine_tuning.py, checked against plain numpy."""

from __future__ import annotations

import csv
import json
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


curve = runpy.run_path(str(EXAMPLES / "m_sharpness_curve.py"))


def _fake_sweep(root: Path) -> dict[str, dict[int, float]]:
    """A compare folder of sgd, msam-m4 and msam-m8 (3 seeds each) with cached m-sharpness; plus rows the
    curve must ignore (an unselected rho, a diverged seed, another method)."""
    rng = np.random.default_rng(1)
    columns = ["optimizer", "seed", "status", "selected", "test_error", "rho", "micro_batches", "run"]
    rows, truth = [], {}
    for group, k in (("sgd", 1), ("msam-m4", 2), ("msam-m8", 1)):
        for seed in range(3):
            name = f"{group}_seed{seed}"
            rows.append([group, seed, "ok", "True", rng.uniform(0.05, 0.2), "" if group == "sgd" else 0.05, k, name])
            truth[name] = {4: float(rng.uniform(0, 0.1)), 8: float(rng.uniform(0, 0.1))}
            (root / "runs" / name).mkdir(parents=True)
            settings = {"rho": 0.05, "examples": 1024, "steps": 5, "kind": "worst"}
            values = {str(m): v for m, v in truth[name].items()}
            (root / "runs" / name / "m_sharpness.json").write_text(json.dumps({"settings": settings, "values": values}))
    rows.append(["msam-m4", 0, "ok", "False", 0.9, 0.1, 2, "unselected"])
    rows.append(["msam-m8", 3, "diverged", "True", 0.9, 0.05, 1, "diverged"])
    rows.append(["sam", 0, "ok", "True", 0.9, 0.05, 1, "other"])
    with (root / "results.csv").open("w") as handle:
        handle.write(",".join(columns) + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return truth


def test_m_sharpness_curve_matches_numpy_on_a_fake_sweep(tmp_path):
    truth = _fake_sweep(tmp_path)
    curve["main"]([str(tmp_path)])
    result = json.loads((tmp_path / "m_sharpness_curve.json").read_text())
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    t2 = 4.302652729911275  # t(0.975, 2 degrees of freedom); the script finds it by bisection to ~1e-11

    def interval(values):
        values = np.asarray(values)
        return [values.mean(), t2 * values.std(ddof=1) / np.sqrt(3)]

    def errors(group):
        return np.array([float(r["test_error"]) for r in rows[:9] if r["optimizer"] == group])

    assert result["sizes"] == [4, 8]
    assert result["sgd_error"] == pytest.approx(interval(errors("sgd")), rel=1e-9)
    for line, m in zip(result["lines"], (4, 8)):
        assert line["m"] == m and line["seeds"] == 3
        assert line["error"] == pytest.approx(interval(errors(f"msam-m{m}")), rel=1e-9)
        assert line["delta"] == pytest.approx(interval(errors(f"msam-m{m}") - errors("sgd")), rel=1e-9)
        if m == 4:  # the largest m of the sweep (8) is the reference of the second Δ
            assert line["delta_largest"] == pytest.approx(interval(errors("msam-m4") - errors("msam-m8")), rel=1e-9)
        else:
            assert line["delta_largest"] == [0.0, 0.0]
        own = [truth[f"msam-m{m}_seed{s}"][m] for s in range(3)]
        assert line["sharpness"] == pytest.approx(interval(own), rel=1e-9)
        assert line["sgd_sharpness"] == pytest.approx(interval([truth[f"sgd_seed{s}"][m] for s in range(3)]), rel=1e-9)
    assert result["measured"]["msam-m4"]["8"] == pytest.approx(
        interval([truth[f"msam-m4_seed{s}"][8] for s in range(3)]), rel=1e-9
    )
    assert (tmp_path / "m_sharpness_curve.png").stat().st_size > 1000
    assert "| 4 | 2 | 3 |" in (tmp_path / "m_sharpness_curve.md").read_text()


def test_m_sharpness_curve_needs_sgd_and_a_sweep(tmp_path):
    (tmp_path / "results.csv").write_text("optimizer,seed,status,selected,test_error,run\nsam,0,ok,True,0.1,a\n")
    with pytest.raises(ValueError, match="needs ok runs of sgd"):
        curve["read_rows"](tmp_path)


line_table = runpy.run_path(str(EXAMPLES / "line_table.py"))


def test_line_table_matches_numpy_on_fake_line_runs(tmp_path):
    rng = np.random.default_rng(2)
    along = rng.uniform(0.7, 0.9, size=(3, 5))
    lines = ["optimizer,seed,status,selected,test_error,run"]
    for seed in range(3):
        name = f"sam_seed{seed}"
        record = {
            "test_accuracy_along": dict(zip(["0", "0.25", "0.5", "0.75", "1"], along[seed].tolist())),
            "endpoints_mean_test_accuracy": (along[seed, 0] + along[seed, 4]) / 2,
            "ensemble_test_accuracy": 0.95 - 0.01 * seed,
            "cos_squared": 0.001 * seed,
            "length": 10.0 + seed,
        }
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "summary.json").write_text(json.dumps({"subspace": record}))
        lines.append(f"sam,{seed},ok,True,0.1,{name}")
    lines.append("sam,9,diverged,True,0.9,missing")  # no summary: must not be read
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    table = line_table["line_rows"](tmp_path)["sam"]
    t2 = 4.302652729911275
    midpoint = 100 * (1 - along[:, 2])
    assert table["α=0.5"] == pytest.approx([midpoint.mean(), t2 * midpoint.std(ddof=1) / np.sqrt(3)], rel=1e-9)
    assert table["ensemble"][0] == pytest.approx(100 * (1 - np.mean([0.95, 0.94, 0.93])), rel=1e-12)
    assert table["length"][0] == pytest.approx(11.0)
