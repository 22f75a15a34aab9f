"""``evaluate``: a saved run's test accuracy, clean and under common corruptions (the stress test).

    clean accuracy on the test set
    for kind in CORRUPTIONS (gaussian_noise, blur, contrast, brightness, pixelate), severity in 1..5:
        x' = corrupt(x_test, kind, severity, generator(seed))     (samkit.data, after Hendrycks & Dietterich 2019)
        accuracy(model, x', y_test)
    mean corrupted accuracy = mean over kinds and severities
    -> RUN/evaluation.json, RUN/corruptions.csv

Models of equal clean accuracy can differ much more under such shifts (D'Amour et al. 2020,
"Underspecification presents challenges for credibility in modern machine learning"); a flatter minimum is
expected to degrade more gently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from samkit.experiments.distributed import resolve_device
from samkit.experiments.errors import checking
from samkit.experiments.files import write_json, write_text
from samkit.experiments.inputs import load_config_dataset
from samkit.experiments.metrics import evaluate
from samkit.experiments.rundir import CORRUPTIONS_CSV, EVALUATION
from samkit.experiments.saved_runs import open_run, trained_weights

SEVERITIES = (1, 2, 3, 4, 5)


def evaluate_run(
    run_path: str | Path,
    *,
    corruptions: Optional[Sequence[str]] = None,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    device: str = "cpu",
    write: bool = True,
) -> dict[str, Any]:
    """Clean test accuracy (and, with ``corruptions``, accuracy per corruption and severity) of a saved run.

    ``result["weights"]`` says which weights were evaluated (a diverged run is refused, an unfinished one warned
    about: ``runs.trained_weights``). ``write=False`` leaves the files to ``write_evaluation``."""
    from samkit.data import CORRUPTIONS, corrupt

    with checking():  # bad requests, a missing or foreign run, its data: bad input (exit 2)
        for kind in corruptions or ():
            if kind not in CORRUPTIONS:
                raise ValueError(f"unknown corruption {kind!r}; valid: {', '.join(CORRUPTIONS)}")
        for severity in severities:
            if severity not in SEVERITIES:
                raise ValueError(f"severity must be in 1..5, got {severity!r}")
        run = open_run(run_path)
        weights = trained_weights(run, "evaluate")
        config = run.config
        resolved = resolve_device(device)  # "auto", or a clear error when CUDA is asked for and missing
        dataset = load_config_dataset(config)
        model = run.model(device=resolved)
    common = {"num_classes": dataset.num_classes, "device": resolved}
    clean = evaluate(model, dataset.x_test, dataset.y_test, **common)
    result: dict[str, Any] = {
        "run": str(run.path),
        "weights": weights,
        "epochs_completed": run.epochs_completed,
        "test_accuracy": clean.accuracy,
        "test_loss": clean.loss,
        "seed": seed,
    }
    if corruptions:
        table = []
        for kind in corruptions:
            for severity in severities:
                generator = torch.Generator().manual_seed(seed)
                x = corrupt(dataset.x_test, kind, severity, generator=generator, mean=dataset.mean, std=dataset.std)
                accuracy = evaluate(model, x, dataset.y_test, **common).accuracy
                table.append({"corruption": kind, "severity": severity, "accuracy": accuracy})
        result["corruptions"] = table
        result["mean_corrupted_accuracy"] = sum(row["accuracy"] for row in table) / len(table)
    if write:
        write_evaluation(result)
    return result


def write_evaluation(result: dict[str, Any]) -> list[Path]:
    """RUN/evaluation.json (and RUN/corruptions.csv with corruptions) of ``evaluate_run``'s result."""
    folder = Path(result["run"])
    written = []
    table = result.get("corruptions")
    if table:
        csv_lines = ["corruption,severity,accuracy"] + [
            f"{r['corruption']},{r['severity']},{r['accuracy']}" for r in table
        ]
        write_text(folder / CORRUPTIONS_CSV, "\n".join(csv_lines) + "\n")
        written.append(folder / CORRUPTIONS_CSV)
    write_json(folder / EVALUATION, result)
    return [*written, folder / EVALUATION]


def format_evaluation(result: dict[str, Any]) -> str:
    """A plain-text table: one row per corruption, one column per severity (accuracy in %)."""
    lines = [f"clean test accuracy: {100 * result['test_accuracy']:.2f} %"]
    if result.get("weights"):
        lines.insert(0, f"weights: {result['weights']}")
    rows = result.get("corruptions")
    if not rows:
        return "\n".join(lines)
    severities = sorted({row["severity"] for row in rows})
    kinds = list(dict.fromkeys(row["corruption"] for row in rows))
    width = max(len(kind) for kind in kinds)
    lines.append(" " * width + "  " + "  ".join(f"sev {s}" for s in severities))
    for kind in kinds:
        cells = {row["severity"]: row["accuracy"] for row in rows if row["corruption"] == kind}
        lines.append(kind.ljust(width) + "  " + "  ".join(f"{100 * cells[s]:5.1f}" for s in severities))
    lines.append(f"mean corrupted accuracy: {100 * result['mean_corrupted_accuracy']:.2f} %")
    return "\n".join(lines)
