"""Stress tests vary with the seed: does SAM narrow the seed-to-seed spread under corruptions?

Models that differ only in their random seed reach almost the same clean test accuracy, yet can differ much
more on shifted data (D'Amour et al. 2020, "Underspecification presents challenges for credibility in modern
machine learning", arXiv 2011.03395). This script trains S seeds each of SGD and SAM on one job, evaluates each
model clean and under every corruption of samkit.data at one severity, and draws the parallel-axis picture:

    one line per seed, one axis per test set (clean, then each corruption); a line's height on an axis is
    (accuracy of that seed − mean accuracy of the seeds) / std of the seeds' CLEAN accuracies

so a spread of 1 on an axis is as wide as the clean spread. SGD on the left, SAM on the right, on one scale.
The table gives, per test set and method, the mean accuracy and the standard deviation over seeds, and the
ratio std(SAM) / std(SGD) with a 95 % bootstrap interval (seeds resampled within each method).

    python examples/stress_test_seeds.py --out experiments/stress-fmnist-mlp-1k --seeds 10 \\
        -- --data fashion-mnist --model mlp --subset 1000 --epochs 100 --val-fraction 0.1 --threads 1

Arguments after ``--`` go to every ``samkit train`` (the job); ``--rho`` is SAM's radius. Runs already
finished in OUT/runs are reused, so an interrupted script continues where it stopped. Writes OUT/stress.png,
OUT/stress.md and OUT/stress.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

METHODS = ("sgd", "sam")


def train_runs(out: Path, seeds: int, rho: float, job: list[str]) -> dict[str, list[Path]]:
    """Train (or reuse) one run per method and seed; returns the run folders per method, in seed order."""
    runs: dict[str, list[Path]] = {method: [] for method in METHODS}
    for seed in range(seeds):
        for method in METHODS:
            run = out / "runs" / f"{method}_seed{seed}"
            summary = run / "summary.json"
            if not summary.exists():
                command = [sys.executable, "-m", "samkit", "train", "--optimizer", method, "--seed", str(seed),
                           "--out", str(run), "--quiet", *job]
                if method == "sam":
                    command += ["--rho", str(rho)]
                if run.exists():
                    command.append("--resume")
                print(" ".join(command), flush=True)
                subprocess.run(command, check=True)
            runs[method].append(run)
    return runs


def stress_accuracies(run: Path, severity: int) -> dict[str, float]:
    """``{"clean": acc, corruption: acc, ...}`` of one run at ``severity`` (cached in the run folder)."""
    cache = run / f"stress_severity{severity}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from samkit.data import CORRUPTIONS
    from samkit.experiments.evaluate_run import evaluate_run

    result = evaluate_run(run, corruptions=list(CORRUPTIONS), severities=(severity,))
    accuracies = {"clean": result["test_accuracy"]}
    accuracies.update({row["corruption"]: row["accuracy"] for row in result["corruptions"]})
    cache.write_text(json.dumps(accuracies, indent=1))
    return accuracies


def std_ratio_interval(a: np.ndarray, b: np.ndarray, *, draws: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of std(b) / std(a), seeds resampled within each group."""
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, len(a), size=(draws, len(a)))
    ib = rng.integers(0, len(b), size=(draws, len(b)))
    sa, sb = a[ia].std(axis=1, ddof=1), b[ib].std(axis=1, ddof=1)
    ratios = sb[sa > 0] / sa[sa > 0]
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def scaled_deviations(table: np.ndarray) -> np.ndarray:
    """(accuracy − mean over seeds) / std of the clean column (column 0); rows are seeds."""
    clean_std = table[:, 0].std(ddof=1)
    if clean_std == 0:
        raise ValueError("every seed has the same clean accuracy: the deviations cannot be scaled")
    return (table - table.mean(axis=0)) / clean_std


def plot(path: Path, names: list[str], tables: dict[str, np.ndarray], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deviations = {method: scaled_deviations(table) for method, table in tables.items()}
    limit = max(float(np.abs(d).max()) for d in deviations.values()) * 1.1
    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.2), sharey=True)
    for ax, (method, dev) in zip(np.atleast_1d(axes), deviations.items()):
        xs = np.arange(len(names))
        for row in dev:
            ax.plot(xs, row, marker="o", markersize=3, linewidth=1, alpha=0.8)
        for x in xs:
            ax.axvline(x, color="0.85", linewidth=0.8, zorder=0)
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.set_xticks(xs, names, rotation=30, ha="right")
        ax.set_ylim(-limit, limit)
        ax.set_title(f"{method.upper()} ({dev.shape[0]} seeds)")
    np.atleast_1d(axes)[0].set_ylabel("(acc − mean over seeds) / std of clean acc")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    job = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--severity", type=int, default=5)
    args = parser.parse_args(own)
    if args.seeds < 3:
        parser.error(f"--seeds must be at least 3 to measure a spread, got {args.seeds}")
    runs = train_runs(args.out, args.seeds, args.rho, job)
    results = {method: [stress_accuracies(run, args.severity) for run in paths] for method, paths in runs.items()}
    names = list(results["sgd"][0])
    tables = {method: np.array([[r[name] for name in names] for r in rows]) for method, rows in results.items()}

    lines = [f"Severity {args.severity}, {args.seeds} seeds per method; SAM rho {args.rho}; job: {' '.join(job)}", "",
             "| test set | SGD acc (%) | SGD std (pp) | SAM acc (%) | SAM std (pp) | std SAM / SGD [95 % CI] |"
             " SGD std / clean std | SAM std / clean std |",
             "|---|---|---|---|---|---|---|---|"]
    record = {"severity": args.severity, "seeds": args.seeds, "rho": args.rho, "job": job, "test_sets": {}}
    clean_std = {m: tables[m][:, 0].std(ddof=1) for m in METHODS}
    for j, name in enumerate(names):
        a, b = tables["sgd"][:, j], tables["sam"][:, j]
        sa, sb = a.std(ddof=1), b.std(ddof=1)
        low, high = std_ratio_interval(a, b)
        ratio = sb / sa if sa > 0 else float("inf")
        lines.append(f"| {name} | {100 * a.mean():.2f} | {100 * sa:.2f} | {100 * b.mean():.2f} | {100 * sb:.2f} | "
                     f"{ratio:.2f} [{low:.2f}, {high:.2f}] | {sa / clean_std['sgd']:.1f} | "
                     f"{sb / clean_std['sam']:.1f} |")
        record["test_sets"][name] = {"sgd": a.tolist(), "sam": b.tolist(), "std_ratio": ratio,
                                     "std_ratio_ci": [low, high]}
    corrupted = slice(1, None)
    mean_spread = {m: float(tables[m][:, corrupted].std(axis=0, ddof=1).mean()) for m in METHODS}
    lines += ["", f"Mean over corruptions of the seed-to-seed std: SGD {100 * mean_spread['sgd']:.2f} pp, "
              f"SAM {100 * mean_spread['sam']:.2f} pp (ratio {mean_spread['sam'] / mean_spread['sgd']:.2f})."]
    record["mean_corrupted_std"] = mean_spread
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stress.md").write_text("\n".join(lines) + "\n")
    (args.out / "stress.json").write_text(json.dumps(record, indent=1))
    plot(args.out / "stress.png", names, tables, f"Stress tests at severity {args.severity}: each seed's deviation")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
