"""`compare --micro-batch-sizes`: one method msam-m<m> per micro-batch size, m = the batch being SAM itself."""

import csv
import json

import pytest

from samkit.cli import main
from samkit.experiments.compare import grid_by_spec, micro_batch_sweep, run_name

from .conftest import TINY  # batch 32

CLI = ["--data", "synthetic", "--model", "mlp", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--quiet"]


def test_each_size_is_a_method_splitting_the_batch_into_batch_over_m_micro_batches():
    pairs = grid_by_spec(TINY, optimizers=["sgd", *micro_batch_sweep([4, 16, 32])], seeds=[0])
    assert [(spec.text, c.optimizer, c.micro_batches, c.rho) for spec, c in pairs] == [
        ("sgd", "sgd", 1, None),
        ("msam-m4", "msam", 8, 0.05),
        ("msam-m16", "msam", 2, 0.05),
        ("msam-m32", "sam", 1, 0.05),  # one micro-batch of the whole batch: SAM
    ]
    assert [run_name(c, spec) for spec, c in pairs] == [
        "sgd_lr0.05_seed0",
        "msam-m4_lr0.05_rho0.05_seed0",
        "msam-m16_lr0.05_rho0.05_seed0",
        "msam-m32_lr0.05_rho0.05_seed0",
    ]


def test_a_size_takes_its_own_rho_like_any_method():
    pairs = grid_by_spec(TINY, optimizers=["msam-m8:rho=0.2"], seeds=[0])
    assert [(c.optimizer, c.micro_batches, c.rho) for _, c in pairs] == [("msam", 4, 0.2)]


@pytest.mark.parametrize(
    "sizes, message",
    [
        ([5], "does not split into micro-batches of m=5"),
        ([0], "must be integers >= 1, got 0"),
        ([4, 4], "lists a size twice"),
        ([], "needs at least one size"),
    ],
)
def test_bad_sizes_are_refused_by_name(sizes, message):
    with pytest.raises(ValueError, match=message):
        grid_by_spec(TINY, optimizers=micro_batch_sweep(sizes), seeds=[0])


def test_the_cli_sweeps_m_and_m_equal_to_the_batch_trains_exactly_sam(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["compare", *CLI, "--micro-batch-sizes", "16,32", "--seeds", "0,", "--time-steps", "0", "--out", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["optimizer"], r["method"], r["micro_batches"]) for r in rows] == [
        ("sgd", "sgd", "1"),
        ("msam-m16", "msam", "2"),
        ("msam-m32", "sam", "1"),
    ]
    assert "msam-m16" in capsys.readouterr().out
    # the same grid through plain names: sam, and msam with 2 micro-batches, reach the very same test error
    plain = tmp_path / "plain"
    once = ["compare", *CLI, "--seeds", "0,", "--time-steps", "0"]
    assert main([*once, "--optimizers", "sam", "--out", str(plain)]) == 0
    assert main([*once, "--optimizers", "msam", "--micro-batches", "2", "--out", str(tmp_path / "msam2")]) == 0

    def test_loss(folder, name):
        return json.loads((folder / "runs" / name / "summary.json").read_text())["test_loss"]

    assert test_loss(out, "msam-m32_lr0.1_rho0.05_seed0") == test_loss(plain, "sam_lr0.1_rho0.05_seed0")
    assert test_loss(out, "msam-m16_lr0.1_rho0.05_seed0") == test_loss(tmp_path / "msam2", "msam_lr0.1_rho0.05_seed0")
