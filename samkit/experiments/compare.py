"""``compare``: train a grid of methods x (lr, rho, own options) x seeds, select on validation, report test error
and cost.

    for spec in optimizers:                   a name, or name:option=value[:option=v1|v2...] (a grid over v1, v2);
                                              msam-m<m>: mSAM with micro-batches of m examples (m = batch: SAM)
        for lr in lrs, rho in rhos, option values, seed in seeds:      rho grid only for the SAM family
            train(config) -> OUT/runs/<name>[_<option><value>]_lr<lr>_rho<rho>_seed<seed>/   (finished runs reused)
    per spec: the (lr, rho, options) with the best mean validation accuracy (compare_report.select_settings)
    OUT/results.csv     one row per run (status ok / diverged / collapsed)
    OUT/report.md       test error mean ± 95 % CI, Δ vs SGD, excluded runs, the selection table
    OUT/test_error.png  bars with CIs;  OUT/curves.png  mean test error per epoch
    OUT/frontier.png    test error against cost (passes per step, and training time per step) relative to SGD
    (the runs' own folders hold their metrics.jsonl, checkpoint and summary, without PNGs)

The runs go one after another in this process; a killed compare continues where it stopped when run again
(finished runs are read back, an unfinished one resumes from its checkpoint).
"""

from __future__ import annotations

import csv
import io
import itertools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from samkit.experiments import compare_report, run_figures
from samkit.experiments.config import OPTIMIZERS, SAM_OPTIMIZERS, TrainConfig
from samkit.experiments.errors import checking
from samkit.experiments.files import read_jsonl, write_text
from samkit.experiments.methods import METHODS
from samkit.experiments.run_status import OK
from samkit.experiments.rundir import METRICS
from samkit.experiments.step_log import epoch_rows
from samkit.experiments.trainer import train

CSV_COLUMNS = (
    "optimizer",
    "method",
    "options",
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
    "passes_per_step",
    "extra_forwards_per_step",
    "seconds_per_step",
    "reused",
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


@dataclass(frozen=True)
class MethodSpec:
    """One entry of --optimizers: a method, options fixed for it, and options to choose on validation."""

    text: str
    name: str
    fixed: dict
    grid: dict  # option -> list of values (strings, parsed by the method's registry entry)
    micro_batch_size: Optional[int] = None  # msam-m<m>: mSAM with micro-batches of m examples (m = batch: SAM)


# msam-m16: mSAM whose micro-batches hold 16 examples each, i.e. batch_size / 16 micro-batches (the m of
# m-sharpness, Foret et al. 2021 §4.2); the run is SAM itself when m is the whole batch
MICRO_BATCH_METHOD = re.compile(r"msam-m(\d+)")


def micro_batch_sweep(sizes: Sequence[int]) -> list[str]:
    """``--micro-batch-sizes 4,8`` -> ["msam-m4", "msam-m8"], one method of the grid per micro-batch size m."""
    if not sizes:
        raise ValueError("--micro-batch-sizes needs at least one size, e.g. 4,8,16,32,64,128")
    bad = [m for m in sizes if isinstance(m, bool) or not isinstance(m, int) or m < 1]
    if bad:
        raise ValueError(f"micro-batch sizes must be integers >= 1, got {bad[0]!r} (e.g. 4,8,16,32,64,128)")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"--micro-batch-sizes lists a size twice: {list(sizes)}")
    return [f"msam-m{m}" for m in sizes]


def parse_spec(text: str) -> MethodSpec:
    """``looksam:k=2|5:alpha=0.7`` -> looksam with alpha fixed at 0.7 and k chosen from {2, 5} on validation.

    ``rho`` may be named too (``asam:rho=0.2|0.5|1``): that spec's own rho grid, in place of --rho."""
    name, *parts = [part.strip() for part in text.split(":")]
    sized = MICRO_BATCH_METHOD.fullmatch(name)
    micro_batch_size = int(sized.group(1)) if sized else None
    if sized:
        name = "msam"
        if micro_batch_size < 1:
            raise ValueError(f"{text!r}: the micro-batch size m must be >= 1 (msam-m4 is mSAM with 4 examples each)")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} in {text!r}; valid: {', '.join(OPTIMIZERS)}")
    fixed, choices = {}, {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value:
            raise ValueError(f"{text!r}: expected option=value after ':', got {part!r} (e.g. looksam:k=5)")
        if key in fixed or key in choices:
            raise ValueError(f"{text!r} sets {key} twice")
        values = [v.strip() for v in value.split("|") if v.strip()]
        (choices.__setitem__(key, values) if len(values) > 1 else fixed.__setitem__(key, values[0]))
    if (fixed or choices) and name not in METHODS:
        raise ValueError(f"{text!r}: {name} has no options; options belong to a method of samkit.experiments.methods")
    return MethodSpec(text, name, fixed, choices, micro_batch_size)


def _method_and_micro_batches(spec: MethodSpec, base: TrainConfig) -> tuple[str, Optional[int]]:
    """The optimizer and micro-batch count a spec trains with: msam-m<m> splits the batch into batch / m."""
    m = spec.micro_batch_size
    if m is None:
        return spec.name, base.micro_batches if spec.name == "msam" else None
    if base.batch_size % m:
        raise ValueError(
            f"{spec.text!r}: the batch of {base.batch_size} does not split into micro-batches of m={m} examples; "
            f"pick an m that divides --batch-size (e.g. {', '.join(str(d) for d in _divisors(base.batch_size))})"
        )
    count = base.batch_size // m
    return ("sam", None) if count == 1 else ("msam", count)  # one micro-batch of the whole batch is SAM


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def grid(
    base: TrainConfig,
    *,
    optimizers: Sequence[str],
    seeds: Sequence[int],
    lrs: Optional[Sequence[float]] = None,
    rhos: Optional[Sequence[float]] = None,
) -> list[TrainConfig]:
    """Every resolved config of the grid, checked before any training."""
    return [config for _, config in grid_by_spec(base, optimizers=optimizers, seeds=seeds, lrs=lrs, rhos=rhos)]


def grid_by_spec(
    base: TrainConfig,
    *,
    optimizers: Sequence[str],
    seeds: Sequence[int],
    lrs: Optional[Sequence[float]] = None,
    rhos: Optional[Sequence[float]] = None,
) -> list[tuple[MethodSpec, TrainConfig]]:
    """``grid`` with the spec each config belongs to."""
    if not optimizers:
        raise ValueError("optimizers must name at least one optimizer, got none")
    if len(set(optimizers)) != len(optimizers):
        raise ValueError(f"optimizers lists a name twice: {list(optimizers)}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed, got none")
    configs = []
    for spec in map(parse_spec, optimizers):
        rho_grid = list(rhos) if rhos and spec.name in SAM_OPTIMIZERS else [None]
        own_rho = spec.grid.get("rho") or ([spec.fixed["rho"]] if "rho" in spec.fixed else None)
        if own_rho is not None:
            if spec.name not in SAM_OPTIMIZERS:
                raise ValueError(f"{spec.text!r}: {spec.name} has no rho")
            rho_grid = [float(value) for value in own_rho]
        method, micro_batches = _method_and_micro_batches(spec, base)
        keys = [key for key in spec.grid if key != "rho"]
        for lr in list(lrs) if lrs else [base.lr]:
            for rho in rho_grid:
                for values in itertools.product(*(spec.grid[k] for k in keys)):
                    fixed = {k: v for k, v in spec.fixed.items() if k != "rho"}
                    options = {**fixed, **dict(zip(keys, values))} or None
                    for seed in seeds:
                        changes = dict(
                            optimizer=method, lr=lr, rho=rho, seed=seed, micro_batches=micro_batches, options=options
                        )
                        configs.append((spec, base.replace(**changes).resolved()))
    settings = {(spec.text, c.lr, c.rho, _options_text(spec, c)) for spec, c in configs}
    if base.val_fraction == 0 and len(settings) > len(optimizers):
        raise ValueError(
            "a list of lr, rho or option values needs a validation split to choose from (the SAM paper held out "
            "10 %): pass --val-fraction 0.1"
        )
    return configs


def _format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _options_text(spec: MethodSpec, config: TrainConfig) -> str:
    """The values of the spec's grid options in this config (what selection chooses among), e.g. "k=5"."""
    return ",".join(f"{k}={_format_value(config.options[k])}" for k in spec.grid if k != "rho")


def run_name(config: TrainConfig, spec: Optional[MethodSpec] = None) -> str:
    """The run's folder name: method, the options the spec names (fixed and grid), lr, rho, seed."""
    named = [] if spec is None else [k for k in (*spec.fixed, *spec.grid) if k != "rho"]
    options = "".join(f"_{k}{_format_value(config.options[k])}" for k in named)
    rho = "" if config.rho is None else f"_rho{config.rho:g}"
    head = config.optimizer if spec is None or spec.micro_batch_size is None else f"msam-m{spec.micro_batch_size}"
    return f"{head}{options}_lr{config.lr:g}{rho}_seed{config.seed}"


def _row(config: TrainConfig, summary: dict[str, Any], name: str, spec: MethodSpec, reused: bool) -> dict[str, Any]:
    row = {key: summary.get(key) for key in CSV_COLUMNS if key in summary}
    cost = summary.get("cost") or {}
    row.update(
        optimizer=spec.text,
        method=config.optimizer,
        options=_options_text(spec, config),
        lr=config.lr,
        rho=config.rho,
        micro_batches=config.micro_batches,
        seed=config.seed,
        passes_per_step=cost.get("passes_per_step"),
        extra_forwards_per_step=cost.get("extra_forwards_per_step"),
        seconds_per_step=cost.get("seconds_per_step"),
        reused=reused,
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
        runs = [[row["test_acc"] for row in epoch_rows(metrics)] for metrics in runs if metrics]
        if runs:
            epochs = min(len(r) for r in runs)
            curves[compare_report.label(optimizer)] = [
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
    time_steps: int = 20,
) -> CompareResult:
    """Run the grid (see the module doc) and write the report; return the rows and the paths.

    ``time_steps`` > 0 times every method's selected setting again after training, side by side in this process
    (``samkit.experiments.timing``: blocks of that many steps, 5 interleaved rounds), for the report's time
    column; 0 reports the runs' own training seconds per step instead."""
    out = Path(out)
    from samkit.experiments.training.model_init import check_names

    with checking():  # bad input, before any training
        _check_time_steps(time_steps)
        configs = grid_by_spec(base, optimizers=optimizers, seeds=seeds, lrs=lrs, rhos=rhos)
        check_names(configs[0][1])
        names = [run_name(config, spec) for spec, config in configs]
        if len(set(names)) != len(names):
            raise ValueError("two entries of --optimizers give the same runs: name each method's options once")
    rows = []
    started = time.perf_counter()
    for index, ((spec, config), name) in enumerate(zip(configs, names), 1):
        if not quiet:
            print(f"[{index}/{len(configs)}] {name}", flush=True)
        reused = (out / "runs" / name / "summary.json").exists() and not overwrite
        summary = train(
            config,
            out / "runs" / name,
            device=device,
            resume=not overwrite,
            overwrite=overwrite,
            quiet=True,
            plot=False,
        )
        rows.append(_row(config, summary, name, spec, reused))
        if not quiet:
            error = summary["test_error"]
            status = "" if summary["status"] == OK else f" [{summary['status']}: {summary['status_reason']}]"
            print(f"    test error {100 * error:.2f} %{status} ({summary['wall_seconds']:.1f} s)", flush=True)

    chosen = compare_report.select_settings(rows)
    for row in rows:
        row["selected"] = chosen[row["optimizer"]] == compare_report.setting_of(row)
    groups = compare_report.selected_rows(rows, chosen)
    timing = _time_selected(configs, rows, time_steps, device, quiet) if time_steps else None
    table = compare_report.summary_table(rows, timing=timing)
    plot_paths = []
    bars = [
        {"label": line["label"], "mean": 100 * line["error"].mean, "half_width": 100 * line["error"].half_width}
        for line in table
        if line["ok"]
    ]
    title = _title(base, optimizers, rows)
    if bars:
        plot_paths.append(run_figures.error_bars(bars, out / "test_error.png", title=f"{title}: test error"))
    points = compare_report.frontier_points(table)
    if points:
        plot_paths.append(run_figures.frontier(points, out / "frontier.png", title=f"{title}: error against cost"))
    curves = _mean_curves(out, groups)
    if curves:
        plot_paths.append(run_figures.mean_curves(curves, out / "curves.png", title=f"{title}: mean over ok seeds"))

    csv_path = out / "results.csv"
    write_text(csv_path, _csv(rows))
    report_path = out / "report.md"
    elapsed = time.perf_counter() - started
    write_text(
        report_path,
        compare_report.render_markdown(
            rows,
            title=f"{title} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
            setting=_setting_line(base, seeds, elapsed),
            plots=[p.name for p in plot_paths],
            timing=timing,
        ),
    )
    return CompareResult(rows, report_path, csv_path, plot_paths, compare_report.console_table(rows, timing=timing))


def _title(base: TrainConfig, optimizers: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """What ran: the methods with at least one ok run (the figures show only those), and those that failed."""
    ran = [o for o in optimizers if any(r["optimizer"] == o and r["status"] == OK for r in rows)]
    failed = [o for o in optimizers if o not in ran]
    title = f"{', '.join(compare_report.label(o) for o in ran) or 'no method'} on {base.data}"
    if len(ran) > 4:
        title = f"{len(ran)} methods on {base.data}"
    if base.label_noise:
        title += f" with {base.label_noise:.0%} label noise"
    if failed:
        title += f" ({', '.join(compare_report.label(o) for o in failed)}: no run ended ok)"
    return title


def _check_time_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"time_steps must be an integer >= 0 (0: use the runs' own times), got {steps!r}")


def _time_selected(configs, rows, steps: int, device: str, quiet: bool) -> dict[str, float]:
    """Seconds per step of each group's selected setting, timed side by side now (its first seed's config)."""
    from samkit.experiments.distributed import resolve_device
    from samkit.experiments.timing import time_methods

    _check_time_steps(steps)
    selected = {}
    for (spec, config), row in zip(configs, rows):
        if row["selected"] and spec.text not in selected:
            selected[spec.text] = config
    if not quiet:
        print(f"timing {len(selected)} methods side by side ({steps} steps a block, 5 rounds)", flush=True)
    timed = time_methods(selected, steps=steps, repeats=5, device=str(resolve_device(device)))
    return {group: result["seconds_per_step"] for group, result in timed.items()}


def describe_job(base: TrainConfig) -> str:
    """The training setting every run of the grid shares, in words (printed before a compare starts)."""
    parts = _setting_parts(base)
    if base.lr is not None:
        parts.insert(4, f"lr {base.lr:g}")
    return ", ".join(parts).replace("`", "")


def _setting_line(base: TrainConfig, seeds: Sequence[int], elapsed: float) -> str:
    parts = _setting_parts(base)
    parts.append(f"seeds {', '.join(map(str, seeds))}")
    return "Setting: " + ", ".join(parts) + f". This invocation took {elapsed:.0f} s."


def _setting_parts(base: TrainConfig) -> list[str]:
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
    return parts
