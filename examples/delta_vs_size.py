"""Test-error Δ against SGD as the training set grows: one panel per model, one line per method.

Reads ``samkit compare`` folders (their results.csv, and runs/<run>/config.json for the model and --subset) and,
per folder and method, takes the runs compare selected (the ``selected`` column: the ρ chosen on validation, or
the only one run), then

    Δ = test error − SGD's test error, paired by seed (seeds where both runs are ok), mean ± 95 % Student-t
        half-width over the seeds (samkit.experiments.compare_report.paired_difference)

and draws Δ (percentage points) against N = --subset, with the intervals as error bars.

    python examples/delta_vs_size.py --out experiments/fmnist-clean-delta-vs-n \\
        experiments/fmnist-clean-mlp-1k experiments/fmnist-clean-mlp-4k \\
        experiments/fmnist-clean-mlp-bn-1k experiments/fmnist-clean-mlp-bn-4k

Writes OUT/delta_vs_size.png and OUT/delta_vs_size.md (the table behind the figure).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samkit.experiments.compare_report import paired_difference
from samkit.experiments.intervals import MeanCI, mean_ci

BASELINE = "sgd"
LABELS = {"sgd": "SGD", "sam": "SAM", "msam": "mSAM", "asam": "ASAM"}


@dataclass(frozen=True)
class Cell:
    """One method in one compare folder, against that folder's SGD."""

    model: str
    size: int
    method: str
    rho: float | None
    error: MeanCI  # the method's test error over its ok seeds
    baseline: MeanCI  # SGD's
    delta: MeanCI  # paired per-seed difference, method − SGD


def _number(text: str) -> float | None:
    return float(text) if text not in ("", "None", "nan") else None


def read_rows(folder: Path) -> list[dict[str, Any]]:
    """The runs of a compare folder's results.csv, typed (seed int, test_error and rho float, selected bool)."""
    path = folder / "results.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass the folder a `samkit compare --out` wrote")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path} has no runs")
    missing = {"optimizer", "method", "seed", "status", "test_error", "rho", "selected", "run"} - set(rows[0])
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}: write it with `samkit compare`")
    for row in rows:
        row["seed"] = int(row["seed"])
        row["test_error"] = _number(row["test_error"])
        row["rho"] = _number(row["rho"])
        row["selected"] = row["selected"] == "True"
    return rows


def job_of(folder: Path, rows: list[dict[str, Any]]) -> tuple[str, int]:
    """(model, --subset) of the folder's runs, from their config.json; every run must agree."""
    jobs = set()
    for row in rows:
        config_path = folder / "runs" / row["run"] / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} does not exist: the folder's runs/ must be kept with it")
        config = json.loads(config_path.read_text())
        jobs.add((config["model"], config["subset"]))
    if len(jobs) != 1:
        raise ValueError(f"{folder} mixes models or sizes: {sorted(jobs, key=str)}; one job per folder")
    model, size = jobs.pop()
    if size is None:
        raise ValueError(f"{folder} ran on the whole training set (no --subset): its size is not recorded")
    return model, int(size)


def cells(folder: Path) -> list[Cell]:
    """Δ vs SGD for every method of one compare folder, in the folder's order."""
    rows = read_rows(folder)
    model, size = job_of(folder, rows)
    chosen = [row for row in rows if row["selected"]]
    methods = list(dict.fromkeys(row["method"] for row in chosen))
    if BASELINE not in methods:
        raise ValueError(f"{folder} has no selected {BASELINE} runs to compare with")
    out = []
    baseline = [row for row in chosen if row["method"] == BASELINE]
    base_error = mean_ci([row["test_error"] for row in baseline if row["status"] == "ok"])
    for method in methods:
        if method == BASELINE:
            continue
        mine = [row for row in chosen if row["method"] == method]
        groups = {row["optimizer"] for row in mine}
        if len(groups) > 1:
            raise ValueError(f"{folder}: {method} appears as {sorted(groups)}; one entry per method")
        rhos = {row["rho"] for row in mine}
        rho = rhos.pop() if len(rhos) == 1 else None
        error = mean_ci([row["test_error"] for row in mine if row["status"] == "ok"])
        out.append(Cell(model, size, method, rho, error, base_error, paired_difference(mine, baseline)))
    return out


def table(all_cells: list[Cell]) -> str:
    lines = ["| model | N | method (ρ) | seeds | SGD test error (%) | test error (%) | Δ vs SGD (pp) |",
             "|---|---|---|---|---|---|---|"]
    for cell in sorted(all_cells, key=lambda c: (c.model, c.size, list(LABELS).index(c.method)
                                                     if c.method in LABELS else len(LABELS))):
        delta = cell.delta.format(scale=100)
        if cell.delta.n > 1 and abs(cell.delta.mean) > cell.delta.half_width:
            delta = f"**{delta}**"
        rho = "" if cell.rho is None else f" ({cell.rho:g})"
        lines.append(f"| {cell.model} | {cell.size} | {LABELS.get(cell.method, cell.method)}{rho} | "
                     f"{cell.delta.n} | {cell.baseline.format(scale=100)} | {cell.error.format(scale=100)} | "
                     f"{delta} |")
    lines += ["", "Mean ± 95 % Student-t half-width over the seeds; Δ paired by seed; **bold**: Δ's interval "
              "excludes 0."]
    return "\n".join(lines) + "\n"


def draw(all_cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(cell.model for cell in all_cells))
    methods = list(dict.fromkeys(cell.method for cell in all_cells))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        sizes = sorted({cell.size for cell in all_cells if cell.model == model})
        for k, method in enumerate(methods):
            mine = sorted((c for c in all_cells if c.model == model and c.method == method), key=lambda c: c.size)
            if not mine:
                continue
            shift = 1.0 + 0.04 * (k - (len(methods) - 1) / 2)  # side by side on the log axis
            half = [100 * c.delta.half_width if not math.isnan(c.delta.half_width) else 0.0 for c in mine]
            rhos = ", ".join(f"{r:g}" for r in sorted({c.rho for c in mine if c.rho is not None}))
            ax.errorbar([c.size * shift for c in mine], [100 * c.delta.mean for c in mine], yerr=half,
                        marker="o", capsize=3, label=f"{LABELS.get(method, method)} (ρ {rhos})")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(size) for size in sizes])
        ax.minorticks_off()
        ax.set(title=model, xlabel="N (training subset, 10 % held out for validation)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("Δ test error vs SGD (pp), 95 % interval")
    fig.suptitle("Test-error difference to SGD, paired by seed (negative: better than SGD)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="samkit compare output folders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    all_cells = [cell for folder in args.folders for cell in cells(folder)]
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(all_cells)
    (args.out / "delta_vs_size.md").write_text(text)
    draw(all_cells, args.out / "delta_vs_size.png")
    print(text)


if __name__ == "__main__":
    main()
