"""``compare``: train a grid of optimizers x (lr, rho) x seeds, select on validation, report test error.

    for optimizer in optimizers:              rho grid only for sam/asam/msam, micro-batches only for msam
        for lr in lrs, rho in rhos, seed in seeds:
            train(config) -> OUT/runs/<optimizer>_lr<lr>_rho<rho>_seed<seed>/     (finished runs are reused)
    per optimizer: the (lr, rho) with the best mean validation accuracy (report.select_settings)
    OUT/results.csv     one row per run (status ok / diverged / collapsed)
    OUT/report.md       test error mean ± 95 % CI, Δ vs SGD, excluded runs, the selection table
    OUT/test_error.png  bars with CIs;  OUT/curves.png  mean test error per epoch
    (the runs' own folders hold their metrics.jsonl, checkpoint and summary, without PNGs)

The runs go one after another in this process; a killed compare continues where it stopped when run again
(finished runs are read back, an unfinished one resumes from its checkpoint).
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from samkit.experiments import plots, report
from samkit.experiments.config import SAM_OPTIMIZERS, TrainConfig
from samkit.experiments.files import read_jsonl, write_text
from samkit.experiments.rundir import METRICS
from samkit.experiments.status import OK
from samkit.experiments.trainer import train

CSV_COLUMNS = (
    "optimizer",
    "lr",
    "rho",
    "micro_batches",
    "seed",
    "status",
    "status_reason",
    "test_error",
    "test_accuracy",
    "test_loss",
    "val_accuracy",
    "train_loss",
    "epochs_completed",
    "wall_seconds",
    "selected",
    "run",
)


# `samkit compare` with no options, the README's main job: SGD vs SAM vs mSAM on digits, 3 seeds, with 40 % of
# the training labels flipped (the SAM paper's Table 4 setting; on clean digits every optimizer is within one or
# two of the 360 test images, see EXPERIMENTS.md). About 30 s of CPU per seed on this machine.
DEFAULT_BASE = TrainConfig(data="digits", model="mlp", epochs=30, batch_size=64, lr=0.05, label_noise=0.4)
DEFAULT_OPTIMIZERS = ("sgd", "sam", "msam")
DEFAULT_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class CompareResult:
    rows: list[dict[str, Any]]
    report_path: Path
    csv_path: Path
    plot_paths: list[Path]
    table: str  # the console table


def grid(
    base: TrainConfig,
    *,
    optimizers: Sequence[str],
    seeds: Sequence[int],
    lrs: Optional[Sequence[float]] = None,
    rhos: Optional[Sequence[float]] = None,
) -> list[TrainConfig]:
    """Every resolved config of the grid, checked before any training."""
    if not optimizers:
        raise ValueError("optimizers must name at least one optimizer, got none")
    if len(set(optimizers)) != len(optimizers):
        raise ValueError(f"optimizers lists a name twice: {list(optimizers)}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed, got none")
    configs = []
    for optimizer in optimizers:
        rho_grid = list(rhos) if rhos and optimizer in SAM_OPTIMIZERS else [None]
        micro_batches = base.micro_batches if optimizer == "msam" else None
        for lr in list(lrs) if lrs else [base.lr]:
            for rho in rho_grid:
                for seed in seeds:
                    changes = dict(optimizer=optimizer, lr=lr, rho=rho, seed=seed, micro_batches=micro_batches)
                    configs.append(base.replace(**changes).resolved())
    settings = {(c.optimizer, c.lr, c.rho) for c in configs}
    if base.val_fraction == 0 and len(settings) > len(optimizers):
        raise ValueError(
            "a list of lr or rho values needs a validation split to choose from (the SAM paper held out 10 %): "
            "pass --val-fraction 0.1"
        )
    return configs


def run_name(config: TrainConfig) -> str:
    rho = "" if config.rho is None else f"_rho{config.rho:g}"
    return f"{config.optimizer}_lr{config.lr:g}{rho}_seed{config.seed}"


def _row(config: TrainConfig, summary: dict[str, Any], name: str) -> dict[str, Any]:
    row = {key: summary.get(key) for key in CSV_COLUMNS if key in summary}
    row.update(
        optimizer=config.optimizer,
        lr=config.lr,
        rho=config.rho,
        micro_batches=config.micro_batches,
        seed=config.seed,
        run=name,
    )
    return row


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in CSV_COLUMNS})
    return buffer.getvalue()


def _mean_curves(out: Path, groups: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    curves = {}
    for optimizer, rows in groups.items():
        runs = [read_jsonl(out / "runs" / r["run"] / METRICS) for r in rows if r["status"] == OK]
        runs = [[row["test_acc"] for row in metrics] for metrics in runs if metrics]
        if runs:
            epochs = min(len(r) for r in runs)
            curves[report.DISPLAY.get(optimizer, optimizer)] = [
                100 * (1 - sum(r[e] for r in runs) / len(runs)) for e in range(epochs)
            ]
    return curves


def compare(
    base: TrainConfig,
    out: str | Path,
    *,
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    lrs: Optional[Sequence[float]] = None,
    rhos: Optional[Sequence[float]] = None,
    device: str = "auto",
    overwrite: bool = False,
    quiet: bool = False,
) -> CompareResult:
    """Run the grid (see the module doc) and write the report; return the rows and the paths."""
    out = Path(out)
    configs = grid(base, optimizers=optimizers, seeds=seeds, lrs=lrs, rhos=rhos)
    from samkit.experiments.trainer import check_names

    check_names(configs[0])
    rows = []
    started = time.perf_counter()
    for index, config in enumerate(configs, 1):
        name = run_name(config)
        if not quiet:
            print(f"[{index}/{len(configs)}] {name}", flush=True)
        summary = train(
            config,
            out / "runs" / name,
            device=device,
            resume=not overwrite,
            overwrite=overwrite,
            quiet=True,
            plot=False,
        )
        rows.append(_row(config, summary, name))
        if not quiet:
            error = summary["test_error"]
            status = "" if summary["status"] == OK else f" [{summary['status']}: {summary['status_reason']}]"
            print(f"    test error {100 * error:.2f} %{status} ({summary['wall_seconds']:.1f} s)", flush=True)

    chosen = report.select_settings(rows)
    for row in rows:
        row["selected"] = chosen[row["optimizer"]] == report.setting_of(row)
    groups = report.selected_rows(rows, chosen)
    table = report.summary_table(rows)
    plot_paths = []
    bars = [
        {"label": line["label"], "mean": 100 * line["error"].mean, "half_width": 100 * line["error"].half_width}
        for line in table
        if line["ok"]
    ]
    title = f"{', '.join(report.DISPLAY.get(o, o) for o in optimizers)} on {base.data}"
    if base.label_noise:
        title += f" with {base.label_noise:.0%} label noise"
    if bars:
        plot_paths.append(plots.error_bars(bars, out / "test_error.png", title=f"{title}: test error"))
    curves = _mean_curves(out, groups)
    if curves:
        plot_paths.append(plots.mean_curves(curves, out / "curves.png", title=f"{title}: mean over ok seeds"))

    csv_path = out / "results.csv"
    write_text(csv_path, _csv(rows))
    report_path = out / "report.md"
    elapsed = time.perf_counter() - started
    write_text(
        report_path,
        report.render_markdown(
            rows,
            title=f"{title} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
            setting=_setting_line(base, seeds, elapsed),
            plots=[p.name for p in plot_paths],
        ),
    )
    return CompareResult(rows, report_path, csv_path, plot_paths, report.console_table(rows))


def _setting_line(base: TrainConfig, seeds: Sequence[int], elapsed: float) -> str:
    parts = [
        f"data `{base.data}`" + (f" (subset {base.subset})" if base.subset else ""),
        f"model `{base.model}`",
        f"{base.epochs} epochs",
        f"batch {base.batch_size}",
        f"{base.schedule} schedule",
        f"weight decay {base.weight_decay:g}",
        f"augment {base.augment}",
    ]
    if base.label_noise:
        parts.append(f"label noise {base.label_noise:.0%}")
    if base.mixup:
        parts.append(f"mixup α={base.mixup:g}")
    if base.label_smoothing:
        parts.append(f"label smoothing {base.label_smoothing:g}")
    if base.val_fraction:
        parts.append(f"validation split {base.val_fraction:.0%}")
    parts.append(f"seeds {', '.join(map(str, seeds))}")
    return "Setting: " + ", ".join(parts) + f". This invocation took {elapsed:.0f} s."
