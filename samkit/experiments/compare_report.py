"""Turn a grid of finished runs into the paper-style table: test error mean ± 95 % CI, and the gain over SGD.

    per optimizer, over the seeds of its selected (lr, rho):
        ok runs        -> test error mean ± t_{0.975, n-1} s / sqrt(n)            (intervals.mean_ci)
        Δ vs baseline  -> mean ± CI of the per-seed differences (paired: same seed = same init and data order)
        diverged / collapsed runs are left out of both and listed under "Excluded runs"
    selection (when a grid has several lr / rho): the value with the best mean validation accuracy over its
    seeds (a collapsed seed counts with its own accuracy, a diverged one as 0; a value with an ok run always
    beats one without), as the SAM paper tuned rho on a held-out 10 % of the training set.

    cost            -> passes per step (counted by the optimizer) and training seconds per step, both as
                       ratios to SGD's (the same runs' means)
    share of SAM's gain -> mean(Δ_method) / mean(Δ_SAM) over the seeds where SGD, SAM and the method are all ok
                       (Δ = error − SGD's error, paired by seed), with a percentile-bootstrap interval over seeds;
                       "undefined" when SAM's own Δ is 0 or its 95 % CI includes 0 (no gain to take a share of)

Rows are plain dicts (one per run) with at least: optimizer (the --optimizers entry the run belongs to), lr,
rho, seed, status, status_reason, test_error, val_accuracy, run (a label), so the table can be rebuilt from
results.csv alone; options (the values chosen among on validation), passes_per_step and seconds_per_step when
the run recorded them.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from samkit.experiments.intervals import MeanCI, RatioCI, mean_ci, ratio_of_means_ci
from samkit.experiments.methods import METHODS
from samkit.experiments.run_status import DIVERGED, OK

Row = dict[str, Any]
Setting = tuple[Optional[float], Optional[float], str]  # (lr, rho, the grid options' values)

DISPLAY = {"sgd": "SGD", "adam": "Adam", **{name: method.label for name, method in METHODS.items()}}
KEEPS_GAIN, AT_MOST_COST = 0.9, 1.15  # the question the report answers: >= 90 % of SAM's gain at <= 1.15x SGD's time


def label(group: str) -> str:
    """The display name of an --optimizers entry: "LookSAM (k=2)" for looksam:k=2, "LookSAM" for looksam:k=2|5
    (a grid is chosen on validation; the chosen values are in the table's own columns)."""
    name, *parts = group.split(":")
    fixed = [part for part in parts if "|" not in part]
    shown = DISPLAY.get(name, name)
    return f"{shown} ({', '.join(fixed)})" if fixed else shown


def plain(group: str, name: str) -> bool:
    """Whether an --optimizers entry is method ``name`` with no option but (perhaps) its rho grid: "sam",
    "sam:rho=0.05|0.1" are SAM itself, the reference of "share of SAM's gain"; "sam:interval=5" is not."""
    head, *parts = group.split(":")
    return head == name and all(part.startswith("rho=") for part in parts)


def _find(groups, name: str) -> Optional[str]:
    return next((group for group in groups if plain(group, name)), None)


def setting_of(row: Row) -> Setting:
    return (row["lr"], row["rho"], row.get("options") or "")


def _ok(rows: Sequence[Row]) -> list[Row]:
    return [row for row in rows if row["status"] == OK]


def _selection_score(rows: Sequence[Row], setting: Setting) -> tuple[bool, float]:
    """(has an ok run, mean validation accuracy over ALL the setting's seeds).

    A collapsed run counts with the validation accuracy it measured, a diverged one (or one without a finite
    value) with 0: a value that fails on some seeds must not win on the strength of its survivors alone.
    -inf when an ok run has no validation accuracy (no validation split).
    """
    mine = [r for r in rows if setting_of(r) == setting]
    ok = _ok(mine)
    if not ok or any(r.get("val_accuracy") is None for r in ok):
        return bool(ok), -math.inf

    def score(row: Row) -> float:
        value = row.get("val_accuracy")
        usable = row["status"] != DIVERGED and value is not None and math.isfinite(float(value))
        return float(value) if usable else 0.0

    return True, sum(score(r) for r in mine) / len(mine)


def select_settings(rows: Sequence[Row]) -> dict[str, Setting]:
    """Per optimizer, the (lr, rho) with the best mean validation accuracy over its seeds.

    With a single setting it is chosen whatever happened. A setting with no ok run is never chosen over one
    with ok runs, and failed runs count in the mean (see ``_selection_score``); missing validation accuracy
    (no val split) only works for single settings.
    """
    chosen: dict[str, Setting] = {}
    for optimizer in dict.fromkeys(row["optimizer"] for row in rows):
        mine = [row for row in rows if row["optimizer"] == optimizer]
        settings = list(dict.fromkeys(setting_of(row) for row in mine))
        if len(settings) == 1:
            chosen[optimizer] = settings[0]
            continue

        scores = {setting: _selection_score(mine, setting) for setting in settings}
        best = max(settings, key=scores.__getitem__)  # max keeps the first of equals: the grid order decides ties
        if scores[best][1] == -math.inf and any(r.get("val_accuracy") is None for r in mine):
            raise ValueError(
                f"{optimizer} has {len(settings)} lr/rho settings but no validation accuracy to choose between "
                "them: set a validation split (--val-fraction 0.1)"
            )
        chosen[optimizer] = best
    return chosen


def selected_rows(rows: Sequence[Row], chosen: dict[str, Setting]) -> dict[str, list[Row]]:
    return {opt: [r for r in rows if r["optimizer"] == opt and setting_of(r) == s] for opt, s in chosen.items()}


def paired_difference(rows: Sequence[Row], baseline: Sequence[Row]) -> MeanCI:
    """Mean ± CI of (error - baseline error) over the seeds where both runs are ok."""
    base = {r["seed"]: r["test_error"] for r in _ok(baseline)}
    return mean_ci([r["test_error"] - base[r["seed"]] for r in _ok(rows) if r["seed"] in base])


UNDEFINED_SHARE = "undefined"


def gain_is_defined(sam_delta: MeanCI) -> bool:
    """Whether SAM's Δ vs the baseline is a gain (or loss) at all: nonzero, and its 95 % CI excludes 0."""
    if sam_delta.n == 0 or sam_delta.mean == 0:
        return False
    return math.isnan(sam_delta.half_width) or abs(sam_delta.mean) > sam_delta.half_width


def share_of_gain(rows: Sequence[Row], sam: Sequence[Row], baseline: Sequence[Row]) -> RatioCI:
    """mean(error − baseline error) / mean(SAM's error − baseline error), paired by seed (all three ok)."""
    base = {r["seed"]: r["test_error"] for r in _ok(baseline)}
    reference = {r["seed"]: r["test_error"] for r in _ok(sam)}
    mine = [(r["test_error"], r["seed"]) for r in _ok(rows) if r["seed"] in base and r["seed"] in reference]
    return ratio_of_means_ci([e - base[s] for e, s in mine], [reference[s] - base[s] for _, s in mine])


def _mean_of(rows: Sequence[Row], key: str) -> Optional[float]:
    values = [float(r[key]) for r in _ok(rows) if r.get(key) not in (None, "")]
    return sum(values) / len(values) if values else None


def _ratio(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    return value / reference if value is not None and reference else None


def summary_table(
    rows: Sequence[Row], *, baseline: Optional[str] = None, timing: Optional[dict[str, float]] = None
) -> list[Row]:
    """One line per optimizer: label, error (MeanCI), delta (MeanCI or None), ok/total counts, lr, rho, options,
    the cost ratios to the baseline (passes and time per step) and the share of SAM's gain (RatioCI or None).

    ``timing`` (group -> seconds per step, timed side by side) gives the time ratios; without it they come from
    the runs' own training seconds per step."""
    chosen = select_settings(rows)
    groups = selected_rows(rows, chosen)
    if baseline is None:
        baseline = _find(groups, "sgd") or next(iter(groups), None)
    sam = _find(groups, "sam")
    sam_gain = sam is not None and baseline is not None and sam != baseline
    sam_gain = sam_gain and gain_is_defined(paired_difference(groups[sam], groups[baseline]))
    base_passes = _mean_of(groups[baseline], "passes_per_step") if baseline else None
    base_seconds = _mean_of(groups[baseline], "seconds_per_step") if baseline else None
    table = []
    for optimizer, mine in groups.items():
        ok = _ok(mine)
        share, share_note = None, None
        if sam is not None and optimizer not in (baseline, sam):
            if sam_gain:
                share = share_of_gain(mine, groups[sam], groups[baseline])
            else:
                share_note = UNDEFINED_SHARE
        table.append(
            {
                "optimizer": optimizer,
                "label": label(optimizer),
                "error": mean_ci([r["test_error"] for r in ok]),
                "delta": None if optimizer == baseline else paired_difference(mine, groups[baseline]),
                "share": share,
                "share_note": share_note,  # "undefined" when SAM has no gain to share (gain_is_defined)
                "passes": _ratio(_mean_of(mine, "passes_per_step"), base_passes),
                "extra_forwards": _mean_of(mine, "extra_forwards_per_step") or 0.0,
                "time": (
                    _ratio(timing.get(optimizer), timing.get(baseline))
                    if timing
                    else _ratio(_mean_of(mine, "seconds_per_step"), base_seconds)
                ),
                "reused": sum(1 for r in mine if str(r.get("reused")) == "True"),
                "ok": len(ok),
                "total": len(mine),
                "lr": chosen[optimizer][0],
                "rho": chosen[optimizer][1],
                "options": chosen[optimizer][2],
                "micro_batches": mine[0].get("micro_batches"),
            }
        )
    return table


def frontier_points(table: Sequence[Row]) -> list[Row]:
    """One point per method with a measured cost: (label, passes ratio, time ratio, error mean and half-width)."""
    points = []
    for line in table:
        if not line["ok"] or line["passes"] is None:
            continue
        kind = next((name for name in ("sgd", "sam") if plain(line["optimizer"], name)), "method")
        points.append(
            {
                "label": line["label"],
                "passes": line["passes"],
                "time": line["time"],
                "mean": 100 * line["error"].mean,
                "half_width": 100 * line["error"].half_width,
                "kind": kind,
            }
        )
    return points


def verdict(table: Sequence[Row]) -> list[str]:
    """Which methods keep >= 90 % of SAM's gain at <= 1.15x SGD's training time per step, and which do not."""
    judged = [line for line in table if line["share"] is not None and line["share"].n]
    if not judged:
        return []
    keeps = [
        line
        for line in judged
        if line["share"].value >= KEEPS_GAIN and line["time"] is not None and line["time"] <= AT_MOST_COST
    ]
    others = [line for line in judged if line not in keeps]

    def name(line: Row) -> str:
        time = "time n/a" if line["time"] is None else f"{line['time']:.2f}x time"
        return f"{line['label']} ({line['share'].format(scale=100)} % of the gain, {time})"

    lines = [
        "",
        f"Keep >= {KEEPS_GAIN:.0%} of SAM's gain at <= {AT_MOST_COST:.2f}x SGD's training time per step "
        "(point estimates; the intervals say how firm each is):",
        "",
        "- yes: " + ("; ".join(name(line) for line in keeps) if keeps else "none"),
        "- no: " + ("; ".join(name(line) for line in others) if others else "none"),
    ]
    return lines


def _number(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:g}"


def render_markdown(
    rows: Sequence[Row],
    *,
    title: str,
    setting: str,
    plots: Sequence[str] = (),
    timing: Optional[dict[str, float]] = None,
) -> str:
    """The whole report.md (see the module doc)."""
    table = summary_table(rows, timing=timing)
    baseline = next((line["label"] for line in table if line["delta"] is None), "the first optimizer")
    lines = [f"# {title}", "", setting, ""]
    lines += [
        f"| Optimizer | Test error (%) | Δ vs {baseline} (pp) | share of SAM's gain (%) | passes / step | "
        f"time / step vs {baseline} | ok runs | lr | ρ | options | micro-batches |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in table:
        error = line["error"].format(scale=100) if line["ok"] else "all runs failed"
        delta = "—" if line["delta"] is None else line["delta"].format(scale=100)
        if line["delta"] is not None and line["delta"].n:
            delta = ("+" if line["delta"].mean > 0 else "") + delta
        share = (line["share_note"] or "—") if line["share"] is None else line["share"].format(scale=100)
        passes = "—" if line["passes"] is None else f"{line['passes']:.2f}"
        if line["extra_forwards"]:
            passes += f" + {line['extra_forwards']:.2f} fwd"
        time = "—" if line["time"] is None else f"{line['time']:.2f}x"
        lines.append(
            f"| {line['label']} | {error} | {delta} | {share} | {passes} | {time} | {line['ok']}/{line['total']} "
            f"| {_number(line['lr'])} | {_number(line['rho'])} | {line['options'] or '—'} | "
            f"{line['micro_batches'] or 1} |"
        )
    reused = sum(line["reused"] for line in table)
    lines += [
        "",
        "Test error: mean ± 95 % confidence interval over seeds (Student t, n − 1 degrees of freedom). "
        f"Δ: per-seed difference to {baseline} (same seed = same initialisation and data order), mean ± 95 % CI; "
        "negative is better. Share of SAM's gain: mean Δ of the method / mean Δ of SAM, over the seeds where "
        "both ran ok, with a 95 % percentile-bootstrap interval over the seeds (rough with few seeds; over 100 "
        "means more than SAM's gain; undefined when SAM's own Δ is 0 or its 95 % CI includes 0, as a share of "
        "no gain means nothing). Passes: forward-backward passes per step over the whole batch, counted by "
        f"the optimizer, relative to {baseline}'s one (+ fwd: extra forwards without backward, MESA's EMA "
        "model). Time: "
        + (
            "seconds per training step of each method's selected setting, timed side by side in this invocation "
            f"after training (blocks of steps interleaved over 5 rounds), relative to {baseline}'s."
            if timing
            else f"the runs' training seconds per step (evaluation excluded), mean over seeds, relative to "
            f"{baseline}'s"
            + (
                f"; {reused} of the selected runs were reused from an earlier invocation, so their time was "
                "measured then (machine load may differ)."
                if reused
                else ", all measured in this invocation."
            )
        ),
    ]
    lines += verdict(table)
    failed = [r for r in rows if r["status"] != OK]
    if failed:
        lines += ["", "## Excluded runs", "", "Diverged or collapsed runs are not averaged in:", ""]
        lines += ["| run | status | why |", "|---|---|---|"]
        lines += [f"| {r['run']} | {r['status']} | {r['status_reason']} |" for r in failed]
    lines += _grid_section(rows)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _grid_section(rows: Sequence[Row]) -> list[str]:
    chosen = select_settings(rows)
    multi = [opt for opt in chosen if len({setting_of(r) for r in rows if r["optimizer"] == opt}) > 1]
    if not multi:
        return []
    lines = ["", "## Selection on the validation split", ""]
    lines += [
        "Each optimizer takes the setting with the best validation accuracy averaged over all its seeds (a "
        "collapsed seed counts with its own accuracy, a diverged one as 0). The columns below average the ok "
        "runs only.",
        "",
    ]
    lines += [
        "| Optimizer | lr | ρ | options | val accuracy (%) | test error (%) | ok runs | selected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for optimizer in multi:
        for setting in dict.fromkeys(setting_of(r) for r in rows if r["optimizer"] == optimizer):
            mine = [r for r in rows if r["optimizer"] == optimizer and setting_of(r) == setting]
            ok = _ok(mine)
            val = mean_ci([r["val_accuracy"] for r in ok if r.get("val_accuracy") is not None])
            test = mean_ci([r["test_error"] for r in ok])
            lines.append(
                f"| {label(optimizer)} | {_number(setting[0])} | {_number(setting[1])} | {setting[2] or '—'} | "
                f"{val.format(scale=100)} | {test.format(scale=100)} | {len(ok)}/{len(mine)} | "
                f"{'yes' if chosen[optimizer] == setting else ''} |"
            )
    return lines


def console_table(rows: Sequence[Row], *, timing: Optional[dict[str, float]] = None) -> str:
    """The summary table as aligned plain text, for the terminal."""
    table = summary_table(rows, timing=timing)
    header = ("optimizer", "test error (%)", "Δ (pp)", "gain kept (%)", "passes", "time", "ok", "lr", "rho")
    body = [
        (
            line["label"],
            line["error"].format(scale=100) if line["ok"] else "all failed",
            "—" if line["delta"] is None else line["delta"].format(scale=100),
            (line["share_note"] or "—") if line["share"] is None else line["share"].format(scale=100),
            "—" if line["passes"] is None else f"{line['passes']:.2f}",
            "—" if line["time"] is None else f"{line['time']:.2f}x",
            f"{line['ok']}/{line['total']}",
            _number(line["lr"]),
            _number(line["rho"]) + (f" {line['options']}" if line["options"] else ""),
        )
        for line in table
    ]
    widths = [max(len(str(cells[i])) for cells in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *body])
