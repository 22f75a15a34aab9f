"""--track-hessian during training, and the sharpness / landscape commands on a saved run."""

import json

import numpy as np
import pytest
import torch

from samkit.data import load_dataset
from samkit.experiments.flatness import run_landscape, run_sharpness
from samkit.experiments.saved_runs import open_run
from samkit.experiments.trainer import train

from .conftest import TINY


def dense_top_eigenvalues(model, x, y, k):
    """The dense Hessian of the mean cross-entropy in float64, by autograd: an independent reference."""
    model = model.double().eval()
    params = [p for p in model.parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.detach().flatten() for p in params])

    def loss(vector):
        tensors = [t.view(s) for t, s in zip(vector.split(sizes), shapes)]
        output = torch.func.functional_call(
            model, dict(zip([n for n, _ in model.named_parameters()], tensors)), (x.double(),)
        )
        return torch.nn.functional.cross_entropy(output, y)

    hessian = torch.autograd.functional.hessian(loss, flat)
    return np.sort(np.linalg.eigvalsh(hessian.numpy()))[::-1][:k]


def test_track_hessian_records_lambda_max_and_plots_it(tmp_path):
    config = TINY.replace(subset=64, epochs=2, batch_size=16, track_hessian=1)
    train(config, tmp_path / "h", device="cpu", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert all("lambda_max" in row and "lambda_ratio" in row for row in rows)
    assert (tmp_path / "h" / "hessian.png").stat().st_size > 1000


def test_lambda_max_of_a_small_model_matches_the_dense_hessian(tmp_path):
    from samkit.experiments.flatness import hessian_summary

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))
    dataset = load_dataset("synthetic")
    x, y = dataset.x_train[:100], dataset.y_train[:100]
    summary = hessian_summary(model, torch.nn.functional.cross_entropy, x, y)
    n = sum(p.numel() for p in model.parameters())
    every = dense_top_eigenvalues(model, x, y, n)  # the whole spectrum, descending
    top = every[:5]
    assert summary["lambda_max"] == pytest.approx(top[0], rel=2e-3)
    assert summary["lambda_ratio"] == pytest.approx(top[0] / top[4], rel=1e-2)
    assert summary["lambdas"] == pytest.approx(list(top), rel=1e-2)
    # the SLQ density: weights sum to 1; Ritz values lie inside the spectrum, and 60 Lanczos steps find its top
    nodes, weights = summary["density_nodes"], summary["density_weights"]
    assert len(nodes) == len(weights) == 60 and sum(weights) == pytest.approx(1.0, abs=1e-9)
    spread = every[0] - every[-1]
    assert min(nodes) >= every[-1] - 1e-4 * spread and max(nodes) <= every[0] + 1e-4 * spread
    assert max(nodes) == pytest.approx(every[0], rel=1e-3)


def test_sharpness_and_landscape_commands_write_their_files(finished_run):
    out, _ = finished_run
    report = run_sharpness(out, examples=64, k=2)
    assert len(report["eigenvalues"]) == 2 and report["examples"] == 64
    assert json.loads((out / "sharpness.json").read_text())["eigenvalues"] == report["eigenvalues"]
    path = run_landscape(out, examples=64, steps=5)
    assert path == open_run(out).path / "landscape.png" and path.stat().st_size > 1000


def test_samkit_sharpness_and_landscape_commands(finished_run, capsys):
    from samkit.cli import main

    out, _ = finished_run
    assert main(["sharpness", str(out), "--examples", "64", "--k", "3", "--micro-batch-size", "16"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "sharpness.json").read_text())
    assert len(saved["eigenvalues"]) == 3 and saved["micro_batch_size"] == 16 and saved["examples"] == 64
    for key in ("eigenvalues", "lambda_ratio", "trace", "m_sharpness_worst", "m_sharpness_average", "hvps"):
        assert f"{key}: " in printed
    assert saved["eigenvalues"] == sorted(saved["eigenvalues"], reverse=True)
    assert saved["m_sharpness_worst"] >= saved["m_sharpness_average"] >= 0
    assert main(["landscape", str(out), "--examples", "64", "--steps", "5"]) == 0
    path = open_run(out).path / "landscape.png"
    assert f"landscape: {path}" in capsys.readouterr().out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
