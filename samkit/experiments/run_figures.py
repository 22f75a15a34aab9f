"""PNG figures of runs and comparisons (matplotlib, Agg backend, written atomically).

learning_curves(metrics)      loss and error per epoch, train and test (and val)       DIR/curves.png
                              + SAM's step diagnostics per step when given (||g||, ||ε̂||, loss rise, cos)
hessian_evolution(metrics)    lambda_max and lambda_max / lambda_5 per epoch           DIR/hessian.png
                              (the SAM paper's Hessian spectrum figure, in two numbers)
error_bars(rows)              test error per optimizer, mean and 95 % CI               compare/test_error.png
mean_curves(curves)           mean test error per epoch per optimizer                  compare/curves.png
frontier(points)              test error against cost relative to SGD (passes; time)   compare/frontier.png
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from samkit.experiments.files import write_bytes_with

# matplotlib is imported by the first figure, not with this module: `import samkit.cli` stays light (~0.3 s less)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    write_bytes_with(Path(path), lambda handle: figure.savefig(handle, format="png", dpi=110))
    _pyplot().close(figure)
    return Path(path)


def _column(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(row[key]) if row.get(key) is not None else math.nan for row in rows]


def learning_curves(
    metrics: Sequence[dict[str, Any]], path: Path, *, title: str = "", steps: Sequence[dict[str, Any]] = ()
) -> Path:
    """Loss and error per epoch; with ``steps`` (the step rows of samkit.experiments.step_log) a second row of
    panels: the ascent's norms and the loss rise (with the gradient cosine when recorded) against the step."""
    epochs = [row["epoch"] for row in metrics]
    plt = _pyplot()
    steps = [row for row in steps if row.get("sam")]  # one-pass steps have no ascent to show
    if steps:
        figure, axes = plt.subplots(2, 2, figsize=(10, 7.5))
        (loss_axis, error_axis), (norm_axis, rise_axis) = axes
        _step_panels(steps, norm_axis, rise_axis)
    else:
        figure, (loss_axis, error_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val", "test"):
        if any(row.get(f"{split}_loss") is not None for row in metrics):
            loss_axis.plot(epochs, _column(metrics, f"{split}_loss"), marker=".", label=split)
            error_axis.plot(epochs, [100 * (1 - a) for a in _column(metrics, f"{split}_acc")], marker=".", label=split)
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    error_axis.set(xlabel="epoch", ylabel="error (%)", title="error")
    for axis in (loss_axis, error_axis):
        _integer_ticks(axis)
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _step_panels(steps: Sequence[dict[str, Any]], norm_axis, rise_axis) -> None:
    x = [row["step"] for row in steps]
    norm_axis.plot(x, _column(steps, "grad_norm"), label="‖g‖ (the ascent's norm)")
    norm_axis.plot(x, _column(steps, "eps_norm"), label="‖ε̂‖")
    norm_axis.set(xlabel="step", ylabel="norm", title="SAM ascent")
    if all(v > 0 for v in _column(steps, "grad_norm") + _column(steps, "eps_norm") if not math.isnan(v)):
        norm_axis.set_yscale("log")
    rise_axis.plot(x, _column(steps, "loss_rise"), color="tab:red", label="L(w + ε̂) - L(w)")
    rise_axis.axhline(0.0, color="black", linewidth=0.6)
    rise_axis.set(xlabel="step", ylabel="loss rise", title="SAM loss rise")
    if any(row.get("cosine") is not None for row in steps):
        cosine_axis = rise_axis.twinx()
        cosine_axis.plot(x, _column(steps, "cosine"), color="tab:green", label="cos(g, g_s)")
        cosine_axis.set_ylabel("cos(g, g_s)")
        cosine_axis.legend(loc="lower right")
    for axis in (norm_axis, rise_axis):
        axis.grid(alpha=0.3)
        axis.legend(loc="upper right")


def hessian_evolution(metrics: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    rows = [row for row in metrics if row.get("lambda_max") is not None]
    epochs = [row["epoch"] for row in rows]
    plt = _pyplot()
    figure, (max_axis, ratio_axis) = plt.subplots(1, 2, figsize=(10, 4))
    max_axis.plot(epochs, _column(rows, "lambda_max"), marker="o")
    max_axis.set(xlabel="epoch", ylabel="λmax", title="largest Hessian eigenvalue")
    ratio_axis.plot(epochs, _column(rows, "lambda_ratio"), marker="o", color="tab:orange")
    ratio_axis.set(xlabel="epoch", ylabel="λmax / λ5", title="λmax / λ5")
    for axis in (max_axis, ratio_axis):
        _integer_ticks(axis)
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def error_bars(rows: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """``rows``: dicts with ``label``, ``mean`` and ``half_width`` (test error in %, nan half-width for n=1)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(4, 1.4 * len(rows) + 2), 4))
    positions = range(len(rows))
    means = [row["mean"] for row in rows]
    errors = [0.0 if math.isnan(row["half_width"]) else row["half_width"] for row in rows]
    axis.bar(positions, means, yerr=errors, capsize=6, color="tab:blue", alpha=0.75)
    axis.set_xticks(list(positions), [row["label"] for row in rows])
    axis.set_ylabel("test error (%): mean, bars 95 % CI over seeds")
    axis.set_title(title or "test error, mean ± 95 % CI over seeds", fontsize=9)
    axis.set_ylim(0.0, None)  # bars start at zero: a cut axis would exaggerate the differences
    axis.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def mean_curves(curves: dict[str, list[float]], path: Path, *, ylabel: str = "test error (%)", title: str = "") -> Path:
    """``curves``: label -> one value per epoch (already averaged over seeds)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, values in curves.items():
        axis.plot(range(1, len(values) + 1), values, marker=".", label=label)
    axis.set(xlabel="epoch", ylabel=ylabel)
    axis.set_title(title or "mean over seeds", fontsize=9)
    _integer_ticks(axis)
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, path)


def frontier(points: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """The accuracy-cost frontier: test error (mean ± 95 % CI) against cost relative to SGD, one point per method.

    ``points``: dicts with ``label``, ``passes`` and ``time`` (ratios to SGD; time may be None), ``mean`` and
    ``half_width`` (test error in %), ``kind`` ("sgd", "sam" or "method"). Two panels: forward-backward passes
    per step, and training time per step. SGD and SAM are drawn as larger marked points."""
    panels = [("passes", "forward-backward passes per step / SGD's")]
    if any(point.get("time") is not None for point in points):
        panels.append(("time", "training time per step / SGD's"))
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    styles = {
        "sgd": dict(marker="s", color="black", markersize=9),
        "sam": dict(marker="D", color="tab:red", markersize=9),
    }
    for axis, (key, xlabel) in zip(axes[0], panels):
        for index, point in enumerate(points):
            if point.get(key) is None:
                continue
            style = styles.get(point["kind"], dict(marker="o", color=f"C{index % 10}", markersize=6))
            error = 0.0 if math.isnan(point["half_width"]) else point["half_width"]
            axis.errorbar(point[key], point["mean"], yerr=error, capsize=4, linestyle="none", **style)
            axis.annotate(
                point["label"], (point[key], point["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=7
            )
        axis.set(xlabel=xlabel, ylabel="test error (%)")
        axis.grid(alpha=0.3)
    figure.suptitle(title or "test error against cost, mean ± 95 % CI over seeds", fontsize=9)
    return _save(figure, path)
