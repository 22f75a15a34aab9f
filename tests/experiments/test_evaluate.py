import json

import pytest
import torch

from samkit.data import corrupt, load_dataset
from samkit.experiments.evaluate import evaluate_run, format_evaluation
from samkit.experiments.runs import open_run


def test_corrupted_accuracy_matches_a_direct_computation(finished_run):
    out, summary = finished_run
    result = evaluate_run(out, corruptions=["contrast", "gaussian_noise"], severities=[1, 5], seed=3)
    assert result["test_accuracy"] == summary["test_accuracy"]
    assert [(r["corruption"], r["severity"]) for r in result["corruptions"]] == [
        ("contrast", 1),
        ("contrast", 5),
        ("gaussian_noise", 1),
        ("gaussian_noise", 5),
    ]
    dataset, model = load_dataset("synthetic"), open_run(out).model()
    x = corrupt(
        dataset.x_test,
        "gaussian_noise",
        5,
        generator=torch.Generator().manual_seed(3),
        mean=dataset.mean,
        std=dataset.std,
    )
    with torch.no_grad():
        expected = (model(x).argmax(1) == dataset.y_test).double().mean().item()
    assert result["corruptions"][-1]["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert (
        json.loads((out / "evaluation.json").read_text())["mean_corrupted_accuracy"]
        == result["mean_corrupted_accuracy"]
    )
    assert (out / "corruptions.csv").read_text().startswith("corruption,severity,accuracy\ncontrast,1,")
    assert "gaussian_noise" in format_evaluation(result)


def test_bad_requests_are_named(finished_run, tmp_path):
    out, _ = finished_run
    with pytest.raises(ValueError, match="unknown corruption 'fog'; valid: gaussian_noise"):
        evaluate_run(out, corruptions=["fog"])
    with pytest.raises(ValueError, match="severity must be in 1..5, got 6"):
        evaluate_run(out, corruptions=["blur"], severities=[6])
    with pytest.raises(FileNotFoundError, match="no run at"):
        evaluate_run(tmp_path / "nothing")
