"""The m-sharpness curve: test error against SAM's micro-batch size m, and the trained models' m-sharpness.

Foret et al. (SAM, arXiv 2010.01412, §4.2 and Fig. 3) and Behdin et al. (mSAM, arXiv 2302.09693): SAM computed
on micro-batches of m examples, each with its own ε̂, generalises better as m shrinks. This script reads a
`samkit compare` run of the sweep

    samkit compare ... --batch-size 128 --micro-batch-sizes 4,8,16,32,64,128 --seeds 5 --out OUT

(one method msam-m<m> per m, m = 128 being SAM; SGD as the reference) and

    measures each selected ok run's m-sharpness (samkit.sharpness.m_sharpness, kind "worst", the sweep's ρ) at
    every m of the sweep, on the first --examples training examples and the labels it trained on (cached as
    OUT/runs/<run>/m_sharpness.json, so a second call measures nothing)
    left panel:  test error (mean ± 95 % t interval over seeds) against m, log scale, with SGD's mean ± interval
                 as a horizontal band
    right panel: the mean m-sharpness measured at m' against m', one line per trained method (SGD, each m)
    table:       per m, test error, Δ vs SGD and Δ vs the largest m (SAM), paired by seed, and the m-sharpness at
                 the model's own m next to SGD's at the same m

    python examples/m_sharpness_curve.py OUT [--examples 1024] [--steps 5] [--threads 1]

Writes OUT/m_sharpness_curve.png, .md and .json. ``--train-mode``: BatchNorm normalises each micro-batch by its own
statistics during the measurement, as in mSAM's training passes (cached apart, written as
OUT/m_sharpness_curve_train_mode.*). Measuring needs the runs' checkpoint.pt files (kept in the run
folders by `compare`, not committed); the cached values are enough to redraw.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

SWEEP = re.compile(r"msam-m(\d+)")
CACHE = "m_sharpness.json"
TRAIN_MODE_CACHE = "m_sharpness_train_mode.json"


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % Student-t interval); half-width nan for a single value."""
    from samkit.experiments.intervals import t_quantile

    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    if array.size == 1:
        return float(array[0]), math.nan
    return float(array.mean()), t_quantile(0.95, array.size - 1) * float(array.std(ddof=1)) / math.sqrt(array.size)


def read_rows(out: Path) -> dict[str, list[dict[str, str]]]:
    """The selected, ok rows of results.csv per group: "sgd" and each msam-m<m> (other groups are ignored)."""
    path = out / "results.csv"
    if not path.exists():
        raise FileNotFoundError(f"no {path}: run `samkit compare ... --micro-batch-sizes 4,8,... --out {out}` first")
    groups: dict[str, list[dict[str, str]]] = {}
    for row in csv.DictReader(path.open()):
        if row["selected"] != "True" or row["status"] != "ok":
            continue
        if row["optimizer"] == "sgd" or SWEEP.fullmatch(row["optimizer"]):
            groups.setdefault(row["optimizer"], []).append(row)
    if "sgd" not in groups or len(groups) < 2:
        raise ValueError(f"{path} needs ok runs of sgd and of at least one msam-m<m>, found {sorted(groups)}")
    return groups


def sizes_of(groups: dict[str, Any]) -> list[int]:
    return sorted(int(SWEEP.fullmatch(name).group(1)) for name in groups if SWEEP.fullmatch(name))


def measure(
    run: Path, sizes: list[int], rho: float, examples: int, steps: int, train_mode: bool = False
) -> dict[int, float]:
    """m-sharpness of the run's model at each m, cached in the run folder (recomputed if the settings differ).

    ``train_mode``: BatchNorm normalises each micro-batch with its own statistics, as in mSAM's training passes
    (eval mode, the default, uses the running statistics)."""
    settings = {"rho": rho, "examples": examples, "steps": steps, "kind": "worst"}
    cache = run / (TRAIN_MODE_CACHE if train_mode else CACHE)
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored["settings"] == settings and all(str(m) in stored["values"] for m in sizes):
            return {m: float(stored["values"][str(m)]) for m in sizes}
    import torch

    from samkit.experiments.inputs import load_run_data
    from samkit.experiments.saved_runs import open_run
    from samkit.experiments.train_step import make_loss_fn
    from samkit.sharpness import m_sharpness

    saved = open_run(run)
    data = load_run_data(saved.config, device=torch.device("cpu"))
    model = saved.model(device="cpu")
    batch = max(sizes)
    count = (min(examples, data.train_labels.shape[0]) // batch) * batch
    if count == 0:
        raise ValueError(f"{run}: fewer than {batch} training examples to measure on; lower the largest m")
    x, y = data.dataset.x_train[:count], data.train_labels[:count]
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, count, batch)]
    loss = make_loss_fn(0.0)
    values = {
        m: float(m_sharpness(model, loss, batches, rho=rho, micro_batch_size=m, steps=steps, train_mode=train_mode))
        for m in sizes
    }
    cache.write_text(json.dumps({"settings": settings, "values": {str(m): v for m, v in values.items()}}, indent=1))
    return values


def curve(groups: dict[str, list[dict[str, str]]], sharpness: dict[str, dict[int, float]]) -> dict[str, Any]:
    """The numbers of the figure and the table, from the rows and each run's measured m-sharpness."""
    sizes = sizes_of(groups)
    sgd = {int(r["seed"]): float(r["test_error"]) for r in groups["sgd"]}
    sam = {int(r["seed"]): float(r["test_error"]) for r in groups[f"msam-m{sizes[-1]}"]}  # the largest m
    lines = []
    for m in sizes:
        rows = groups[f"msam-m{m}"]
        errors = [float(r["test_error"]) for r in rows]
        deltas = [float(r["test_error"]) - sgd[int(r["seed"])] for r in rows if int(r["seed"]) in sgd]
        to_largest = [float(r["test_error"]) - sam[int(r["seed"])] for r in rows if int(r["seed"]) in sam]
        own = [sharpness[r["run"]][m] for r in rows]
        sgd_at_m = [sharpness[r["run"]][m] for r in groups["sgd"]]
        lines.append(
            {
                "m": m,
                "micro_batches": int(rows[0]["micro_batches"]),
                "seeds": len(rows),
                "error": t_interval(errors),
                "delta": t_interval(deltas),
                "delta_largest": t_interval(to_largest),
                "sharpness": t_interval(own),
                "sgd_sharpness": t_interval(sgd_at_m),
            }
        )
    measured = {
        group: {m: t_interval([sharpness[r["run"]][m] for r in rows]) for m in sizes} for group, rows in groups.items()
    }
    return {
        "sizes": sizes,
        "sgd_error": t_interval(list(sgd.values())),
        "lines": lines,
        "measured": measured,
    }


def _pm(pair: tuple[float, float], scale: float = 1.0, digits: int = 2) -> str:
    mean, half = pair
    return f"{scale * mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {scale * half:.{digits}f}")


def markdown(result: dict[str, Any], setting: str) -> str:
    lines = [
        setting,
        "",
        f"SGD: test error {_pm(result['sgd_error'], 100)} %.",
        "",
        f"| m | micro-batches | seeds | test error (%) | Δ vs SGD (pp) | Δ vs m = {result['sizes'][-1]} (pp) | "
        "m-sharpness at m (×1e3) | SGD's m-sharpness at m (×1e3) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for line in result["lines"]:
        lines.append(
            f"| {line['m']} | {line['micro_batches']} | {line['seeds']} | {_pm(line['error'], 100)} | "
            f"{_pm(line['delta'], 100)} | {_pm(line['delta_largest'], 100)} | {_pm(line['sharpness'], 1e3, 3)} | "
            f"{_pm(line['sgd_sharpness'], 1e3, 3)} |"
        )
    return "\n".join(lines) + "\n"


def plot(path: Path, result: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    mean, half = result["sgd_error"]
    half = 0.0 if math.isnan(half) else half
    left.axhspan(100 * (mean - half), 100 * (mean + half), color="0.85", label="SGD (mean ± 95 % CI)")
    left.axhline(100 * mean, color="0.5", linewidth=1)
    errors = np.array([line["error"] for line in result["lines"]])
    left.errorbar(sizes, 100 * errors[:, 0], yerr=100 * np.nan_to_num(errors[:, 1]), marker="o", capsize=3,
                  label="SAM on micro-batches of m")
    left.set_xscale("log", base=2)
    left.set_xticks(sizes, [str(m) for m in sizes])
    left.set_xlabel(f"m (examples per micro-batch; m = {sizes[-1]}: SAM)")
    left.set_ylabel("test error (%)")
    left.legend()
    left.set_title("test error against m")
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(sizes)))
    for group, by_m in result["measured"].items():
        values = [by_m[m][0] for m in sizes]
        style = dict(color="black", linestyle="--", marker="s") if group == "sgd" else dict(
            color=colors[sizes.index(int(SWEEP.fullmatch(group).group(1)))], marker="o")
        right.plot(sizes, values, label="SGD" if group == "sgd" else f"trained with m = {group[len('msam-m'):]}",
                   **style)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xticks(sizes, [str(m) for m in sizes])
    right.set_xlabel("m' (micro-batch size of the measurement)")
    right.set_ylabel("m'-sharpness (mean over seeds)")
    right.legend(fontsize=7)
    right.set_title("measured m'-sharpness of the trained models")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the folder of a `samkit compare --micro-batch-sizes ...` run")
    parser.add_argument("--examples", type=int, default=1024, help="training examples to measure on")
    parser.add_argument("--steps", type=int, default=5, help="ascent steps of the worst-case m-sharpness")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small models: 1 is fastest)")
    parser.add_argument(
        "--train-mode", action="store_true", help="measure with BatchNorm in train mode (each micro-batch's statistics)"
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    groups = read_rows(args.out)
    rhos = {float(r["rho"]) for name, rows in groups.items() if name != "sgd" for r in rows}
    if len(rhos) != 1:
        raise ValueError(f"the sweep's methods use several rho {sorted(rhos)}: measure at one; rerun with one rho")
    rho = rhos.pop()
    sizes = sizes_of(groups)
    sharpness = {}
    for rows in groups.values():
        for row in rows:
            run = args.out / "runs" / row["run"]
            sharpness[row["run"]] = measure(run, sizes, rho, args.examples, args.steps, args.train_mode)
            print(f"{row['run']}: " + ", ".join(f"m={m} {v:.4g}" for m, v in sharpness[row["run"]].items()), flush=True)
    result = curve(groups, sharpness)
    mode = "BatchNorm in train mode, " if args.train_mode else ""
    setting = (f"m-sharpness ({mode}worst case, {args.steps} ascent steps, ρ = {rho:g}) on the first {args.examples} "
               f"training examples (rounded down to whole batches of {sizes[-1]}); test error and Δ: mean ± 95 % t "
               "interval over seeds, Δ paired by seed.")
    stem = "m_sharpness_curve_train_mode" if args.train_mode else "m_sharpness_curve"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(markdown(result, setting))
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"rho": rho, "examples": args.examples, "steps": args.steps, "sizes": sizes, "sgd_error": result["sgd_error"],
         "lines": result["lines"], "measured": {g: {str(m): v for m, v in by.items()} for g, by in
                                                result["measured"].items()}}, indent=1))
    plot(args.out / f"{stem}.png", result, f"m-sharpness curve: {args.out.name}" + (" (BN train mode)" if mode else ""))
    print(markdown(result, setting))


if __name__ == "__main__":
    main()
