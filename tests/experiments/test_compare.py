"""A tiny compare grid on `synthetic`: rows, selection on validation, files, reuse of finished runs."""

import csv

import pytest

from samkit.experiments.compare import compare, grid
from samkit.experiments.config import TrainConfig

from .conftest import TINY


def test_grid_applies_rho_to_sam_only_and_micro_batches_to_msam_only():
    configs = grid(
        TINY.replace(micro_batches=2, val_fraction=0.25), optimizers=["sgd", "msam"], seeds=[0, 1], rhos=[0.01, 0.05]
    )
    assert [(c.optimizer, c.rho, c.micro_batches, c.seed) for c in configs] == [
        ("sgd", None, 1, 0),
        ("sgd", None, 1, 1),
        ("msam", 0.01, 2, 0),
        ("msam", 0.01, 2, 1),
        ("msam", 0.05, 2, 0),
        ("msam", 0.05, 2, 1),
    ]


def test_a_grid_needs_a_validation_split_and_valid_names():
    with pytest.raises(ValueError, match="--val-fraction 0.1"):
        grid(TINY, optimizers=["sam"], seeds=[0], rhos=[0.01, 0.05])
    with pytest.raises(ValueError, match="unknown optimizer 'sgdd'"):
        grid(TINY, optimizers=["sgdd"], seeds=[0])
    with pytest.raises(ValueError, match="lists a name twice"):
        grid(TINY, optimizers=["sgd", "sgd"], seeds=[0])


def test_compare_writes_the_report_and_reuses_finished_runs(tmp_path):
    base = TrainConfig(data="synthetic", model="mlp", epochs=1, batch_size=32, lr=0.05, val_fraction=0.25)
    result = compare(
        base, tmp_path, optimizers=["sgd", "sam"], seeds=[0, 1], rhos=[0.01, 0.05], device="cpu", quiet=True
    )
    rows = list(csv.DictReader(result.csv_path.open()))
    assert len(rows) == 2 + 4
    selected = [r for r in rows if r["optimizer"] == "sam" and r["selected"] == "True"]
    assert len(selected) == 2 and len({r["rho"] for r in selected}) == 1
    # the chosen rho has the best mean validation accuracy among the two
    by_rho = {}
    for r in rows:
        if r["optimizer"] == "sam":
            by_rho.setdefault(r["rho"], []).append(float(r["val_accuracy"]))
    assert max(by_rho, key=lambda rho: sum(by_rho[rho])) == selected[0]["rho"]

    report = result.report_path.read_text()
    assert "| Optimizer | Test error (%) | Δ vs SGD (pp) |" in report
    assert "## Selection on the validation split" in report
    assert sorted(p.name for p in result.plot_paths) == ["curves.png", "frontier.png", "test_error.png"]
    assert all(p.stat().st_size > 1000 for p in result.plot_paths)
    assert "SGD" in result.table and "SAM" in result.table

    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/checkpoint.pt")}
    again = compare(
        base, tmp_path, optimizers=["sgd", "sam"], seeds=[0, 1], rhos=[0.01, 0.05], device="cpu", quiet=True
    )
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/checkpoint.pt")} == stamps  # nothing retrained
    assert [r["test_error"] for r in again.rows] == [float(r["test_error"]) for r in rows]


def test_titles_name_the_methods_that_ran_and_those_that_failed():
    from samkit.experiments.compare import _title

    base = TrainConfig(data="digits", label_noise=0.4)
    rows = [{"optimizer": "sgd", "status": "ok"}, {"optimizer": "sam", "status": "ok"}]
    rows += [{"optimizer": "msam", "status": status} for status in ("diverged", "collapsed")]
    title = _title(base, ["sgd", "sam", "msam"], rows)
    assert title == "SGD, SAM on digits with 40% label noise (mSAM: no run ended ok)"
