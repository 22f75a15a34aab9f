"""Test error along trained lines of networks, per optimizer: the table of a `samkit compare --subspace line` run.

    samkit compare ... --optimizers sgd,sam --subspace line --seeds 3 --out OUT
    python examples/line_table.py OUT [--ordinary OUT2]

For every optimizer of OUT/results.csv (its selected ok runs), from each run's summary.json "subspace" record:
test error at α = 0, 0.25, 0.5, 0.75, 1, the mean of the two endpoints, and the endpoints' ensemble, each as
mean ± 95 % t interval over seeds, plus cos²(w1, w2) and ||w2 − w1||. ``--ordinary OUT2``: a compare run of the same
job without --subspace, whose test error is added as a column (ordinary training, one network). Writes
OUT/line_table.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

ALPHAS = ("0", "0.25", "0.5", "0.75", "1")


def t_interval(values: list[float]) -> tuple[float, float]:
    from samkit.experiments.intervals import t_quantile

    array = np.asarray(values, dtype=float)
    if array.size < 2:
        return float(array.mean()) if array.size else math.nan, math.nan
    return float(array.mean()), t_quantile(0.95, array.size - 1) * float(array.std(ddof=1)) / math.sqrt(array.size)


def selected(out: Path) -> dict[str, list[dict[str, str]]]:
    groups: dict[str, list[dict[str, str]]] = {}
    for row in csv.DictReader((out / "results.csv").open()):
        if row["selected"] == "True" and row["status"] == "ok":
            groups.setdefault(row["optimizer"], []).append(row)
    return groups


def line_rows(out: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """Per optimizer: column -> (mean, half-width) of test error (%) along the line, and the line's shape."""
    table = {}
    for optimizer, rows in selected(out).items():
        records = [json.loads((out / "runs" / r["run"] / "summary.json").read_text())["subspace"] for r in rows]
        columns = {f"α={a}": [100 * (1 - rec["test_accuracy_along"][a]) for rec in records] for a in ALPHAS}
        columns["endpoints (mean)"] = [100 * (1 - rec["endpoints_mean_test_accuracy"]) for rec in records]
        columns["ensemble"] = [100 * (1 - rec["ensemble_test_accuracy"]) for rec in records]
        columns["cos²"] = [rec["cos_squared"] for rec in records]
        columns["length"] = [rec["length"] for rec in records]
        table[optimizer] = {name: t_interval(values) for name, values in columns.items()}
    return table


def markdown(table, ordinary: Optional[dict[str, tuple[float, float]]] = None) -> str:
    names = list(next(iter(table.values())))
    head = ["optimizer", *(["ordinary run"] if ordinary else []), *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(pair, digits=2):
        mean, half = pair
        return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")

    for optimizer, columns in table.items():
        cells = [optimizer]
        if ordinary:
            cells.append(cell(ordinary[optimizer]) if optimizer in ordinary else "—")
        cells += [cell(columns[n], 4 if n == "cos²" else 2) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--ordinary", type=Path, help="a compare run of the same job without --subspace")
    args = parser.parse_args(argv)
    ordinary = None
    if args.ordinary:
        groups = selected(args.ordinary)
        ordinary = {o: t_interval([100 * float(r["test_error"]) for r in rows]) for o, rows in groups.items()}
    text = "Test error (%) along the line, mean ± 95 % t interval over seeds.\n\n"
    text += markdown(line_rows(args.out), ordinary)
    (args.out / "line_table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
