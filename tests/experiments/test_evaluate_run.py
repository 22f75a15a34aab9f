import json

import pytest
import torch

from samkit.data import corrupt, load_dataset
from samkit.experiments.evaluate_run import evaluate_run, format_evaluation
from samkit.experiments.saved_runs import open_run


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


def test_momentum_sam_runs_are_saved_and_evaluated_at_the_unperturbed_weights(tmp_path):
    # Momentum-SAM keeps its weights at the ascent point w - rho m/||m|| between steps; the trainer calls
    # optimizer.eval() before evaluating and saving, so the checkpoint, the summary and `samkit evaluate` see w
    from samkit.experiments.checkpoint import load_checkpoint
    from samkit.experiments.trainer import train

    from .conftest import TINY

    summary = train(TINY.replace(optimizer="momentum-sam", epochs=2), tmp_path / "msam", device="cpu", quiet=True)
    assert evaluate_run(tmp_path / "msam")["test_accuracy"] == summary["test_accuracy"]
    payload = load_checkpoint(tmp_path / "msam")
    assert payload["optimizer"]["sam"]["memory"]["training"] is False  # saved in eval mode, at w
    # the ascent point differs from w by rho (3.0) along the momentum: the summary's test loss is the loss at w
    dataset = load_dataset("synthetic")
    model = open_run(tmp_path / "msam").model()
    state = payload["optimizer"]["state"]
    buffers = [state[i]["momentum_buffer"] for i in sorted(state)]
    norm = torch.sqrt(sum((b**2).sum() for b in buffers))
    with torch.no_grad():
        at_w = torch.nn.functional.cross_entropy(model(dataset.x_test), dataset.y_test).item()
        for parameter, buffer in zip(model.parameters(), buffers):
            parameter.sub_(3.0 * buffer / norm)
        at_ascent_point = torch.nn.functional.cross_entropy(model(dataset.x_test), dataset.y_test).item()
    assert at_w == pytest.approx(summary["test_loss"], rel=1e-5)
    assert abs(at_ascent_point - at_w) > 1e-3
