"""The Hessian spectrum during training, SGD beside SAM (the SAM paper's "flatness" figure, at this scale).

Trains an SGD and a SAM run of the same job per seed with ``samkit train --track-hessian N`` (λ1..λ5 by
Lanczos and the SLQ spectral density of the training-loss Hessian, on the first 1000 training examples, every N
epochs and at the last), then draws:

    top row     the spectral density at each tracked epoch of the first seed (log scale, darker = later),
                SGD left, SAM right, on one eigenvalue axis
    bottom row  λmax over epochs and λ1/λ5 over epochs (both methods, one line per seed)

and prints λmax(SGD) / λmax(SAM) at the last epoch per seed, with the mean of those ratios and its 95 % Student-t
interval over the seeds (the paper, WRN on CIFAR-10 at epoch 300: 24.2 / 1.0).

    python examples/hessian_during_training.py --out experiments/hessian-fmnist-mlp-1k --every 10 \\
        -- --data fashion-mnist --model mlp --subset 1000 --epochs 100 --threads 1

Arguments after ``--`` go to every ``samkit train`` run; ``--rho`` is SAM's radius; ``--seeds K`` runs seeds
``--seed`` .. ``--seed`` + K - 1 (SGD and SAM share each seed: same initialisation and data order). Runs live
in OUT/runs/seed<s>/<method>; finished runs are reused. Writes OUT/hessian_spectrum.png and
OUT/hessian_spectrum.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from samkit.experiments.intervals import MeanCI, mean_ci

METHODS = ("sgd", "sam")


def tracked_rows(run: Path) -> list[dict]:
    """The metrics.jsonl rows that carry a Hessian measurement, in epoch order."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tracked = [row for row in rows if row.get("density_nodes")]
    if not tracked:
        raise ValueError(f"{run} has no Hessian densities in metrics.jsonl: train it with --track-hessian N")
    return tracked


def broadened(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """Σ_i w_i N(t; θ_i, σ²) on ``grid``: the SLQ density with Gaussian broadening."""
    diff = grid[:, None] - nodes[None, :]
    return (weights[None, :] * np.exp(-(diff**2) / (2 * sigma**2))).sum(axis=1) / (sigma * np.sqrt(2 * np.pi))


def final_ratios(runs: dict[int, dict[str, list[dict]]]) -> dict[int, float]:
    """λmax(SGD) / λmax(SAM) at each seed's last tracked epoch (the two runs must end at the same epoch)."""
    ratios = {}
    for seed, by_method in runs.items():
        sgd, sam = by_method["sgd"][-1], by_method["sam"][-1]
        if sgd["epoch"] != sam["epoch"]:
            raise ValueError(f"seed {seed}: SGD's last tracked epoch is {sgd['epoch']}, SAM's {sam['epoch']}; "
                             "finish both runs (rerun the script: it resumes them)")
        ratios[seed] = sgd["lambda_max"] / sam["lambda_max"]
    return ratios


def ratios_by_epoch(runs: dict[int, dict[str, list[dict]]]) -> dict[int, list[float]]:
    """λmax(SGD) / λmax(SAM) at every epoch tracked in both runs of every seed, one value per seed (seed order)."""
    per_seed = []
    for by_method in runs.values():
        sam = {row["epoch"]: row["lambda_max"] for row in by_method["sam"]}
        per_seed.append({row["epoch"]: row["lambda_max"] / sam[row["epoch"]]
                         for row in by_method["sgd"] if row["epoch"] in sam})
    common = sorted(set.intersection(*(set(ratios) for ratios in per_seed))) if per_seed else []
    return {epoch: [ratios[epoch] for ratios in per_seed] for epoch in common}


def ratio_summary(ratios: dict[int, float]) -> MeanCI:
    """The mean of the per-seed ratios and its 95 % Student-t half-width (nan with one seed)."""
    return mean_ci(list(ratios.values()))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    job = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--every", type=int, default=10, help="track the Hessian every N epochs")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds (from --seed on)")
    args = parser.parse_args(own)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    by_seed: dict[int, dict[str, list[dict]]] = {}
    for seed in seeds:
        by_seed[seed] = {}
        for method in METHODS:
            run = args.out / "runs" / f"seed{seed}" / method
            if not (run / "summary.json").exists():
                command = [sys.executable, "-m", "samkit", "train", "--optimizer", method, "--seed", str(seed),
                           "--track-hessian", str(args.every), "--out", str(run), "--quiet", *job]
                if method == "sam":
                    command += ["--rho", str(args.rho)]
                if run.exists():
                    command.append("--resume")
                print(" ".join(command), flush=True)
                subprocess.run(command, check=True)
            by_seed[seed][method] = tracked_rows(run)
    runs = by_seed[seeds[0]]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every_node = np.concatenate([np.array(r["density_nodes"]) for rows in runs.values() for r in rows])
    low, high = float(every_node.min()), float(every_node.max())
    sigma = 0.01 * (high - low)
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, 1500)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, method in zip(axes[0], METHODS):
        rows = runs[method]
        colours = plt.cm.viridis(np.linspace(0.9, 0.0, len(rows)))
        for row, colour in zip(rows, colours):
            density = broadened(np.array(row["density_nodes"]), np.array(row["density_weights"]), grid, sigma)
            ax.semilogy(grid, np.maximum(density, 1e-12), color=colour, label=f"epoch {row['epoch']}")
        ax.set(title=f"{method.upper()}: Hessian spectral density", xlabel="eigenvalue", ylabel="density (log)",
               ylim=(1e-6, None))
        ax.legend(fontsize=7, ncol=2)
    count = f"{len(seeds)} seed" + ("s" if len(seeds) > 1 else "")
    for colour, method in zip(("C0", "C1"), METHODS):
        for k, seed in enumerate(seeds):
            rows = by_seed[seed][method]
            epochs = [row["epoch"] for row in rows]
            shown = {"color": colour, "marker": "o", "markersize": 3, "alpha": 0.8,
                     "label": method.upper() if k == 0 else None}
            axes[1, 0].semilogy(epochs, [row["lambda_max"] for row in rows], **shown)
            axes[1, 1].plot(epochs, [row["lambda_ratio"] for row in rows], **shown)
    axes[1, 0].set(xlabel="epoch", ylabel="λmax (log)", title=f"largest eigenvalue ({count})")
    axes[1, 1].set(xlabel="epoch", ylabel="λ1 / λ5", title=f"λ1 / λ5 ({count})")
    for ax in axes[1]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Hessian of the training loss during training ({' '.join(job)}; SAM rho {args.rho}; "
                 f"densities: seed {seeds[0]})", fontsize=9)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "hessian_spectrum.png", dpi=130)
    plt.close(fig)

    ratios = final_ratios(by_seed)
    lines = []
    for seed in seeds:
        runs = by_seed[seed]
        lines += [f"Seed {seed}:", "",
                  "| epoch | " + " | ".join(f"{m.upper()} λmax | {m.upper()} λ1/λ5" for m in METHODS) + " |",
                  "|---|" + "---|---|" * len(METHODS)]
        for row_sgd, row_sam in zip(runs["sgd"], runs["sam"]):
            lines.append(f"| {row_sgd['epoch']} | {row_sgd['lambda_max']:.3g} | {row_sgd['lambda_ratio']:.3g} | "
                         f"{row_sam['lambda_max']:.3g} | {row_sam['lambda_ratio']:.3g} |")
        lines.append("")
    lines += [f"λmax(SGD) / λmax(SAM) at each tracked epoch (SAM rho {args.rho}), per seed and the mean:", "",
              "| epoch | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean |",
              "|---|" + "---|" * (len(seeds) + 1)]
    for epoch, values in ratios_by_epoch(by_seed).items():
        lines.append(f"| {epoch} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {mean_ci(values).format()} |")
    lines += ["", f"At the last epoch, λmax(SGD) / λmax(SAM) (SAM rho {args.rho}):", "",
              "| seed | SGD λmax | SAM λmax | ratio | SGD train loss (epoch mean) | SAM train loss (epoch mean) |",
              "|---|---|---|---|---|---|"]
    for seed in seeds:
        sgd, sam = by_seed[seed]["sgd"][-1], by_seed[seed]["sam"][-1]
        lines.append(f"| {seed} | {sgd['lambda_max']:.3g} | {sam['lambda_max']:.3g} | {ratios[seed]:.2f} | "
                     f"{sgd.get('train_loss', math.nan):.2g} | {sam.get('train_loss', math.nan):.2g} |")
    summary = ratio_summary(ratios)
    lines += ["", f"Mean of the per-seed ratios: {summary.format()} (95 % Student-t interval over {summary.n} "
              "seeds)" if summary.n > 1 else f"Ratio: {summary.mean:.2f} (one seed)"]
    (args.out / "hessian_spectrum.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
