"""The methods registry: every SAM-family method trains from the CLI's config, with its options checked and
recorded; compare's method specs, cost columns, share of SAM's gain and frontier."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from samkit.experiments.compare import compare, grid_by_spec, parse_spec, run_name
from samkit.experiments.compare_report import share_of_gain, summary_table, verdict
from samkit.experiments.config import TrainConfig
from samkit.experiments.intervals import ratio_of_means_ci
from samkit.experiments.methods import METHODS, resolve_options
from samkit.experiments.optimizers import build_optimizer
from samkit.experiments.trainer import train
from samkit.models import build_model

from .conftest import TINY


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_and_records_its_cost(name, tmp_path):
    model = "cnn-bn" if name == "sam-on" else "mlp"  # SAM-ON perturbs normalization layers only
    config = TINY.replace(optimizer=name, model=model, epochs=2)
    summary = train(config, tmp_path / name, device="cpu", quiet=True)
    assert summary["status"] == "ok" and math.isfinite(summary["test_loss"])
    cost = summary["cost"]
    steps = (256 // 32) * 2
    assert cost["steps"] == steps and cost["seconds_per_step"] > 0
    if name in ("esam", "ksam"):  # a second pass (and K-SAM's first) over part of the batch, a ranking forward
        assert 0.0 < cost["passes_per_step"] < 2.0
    else:
        assert cost["passes"] == steps + cost["sam_steps"] and 1.0 <= cost["passes_per_step"] <= 2.0
    recorded = json.loads((tmp_path / name / "config.json").read_text())["options"]
    assert recorded == resolve_options(name, None)  # every option of the method, defaults filled in


def test_passes_follow_each_rule_exactly():
    net = build_model("mlp", in_channels=1, num_classes=4, image_size=8)
    looksam = build_optimizer(net, TINY.replace(optimizer="looksam", options={"k": "4"}).resolved(), total_steps=16)
    late = build_optimizer(
        net, TINY.replace(optimizer="late-sam", options={"sam_fraction": 0.25}).resolved(), total_steps=16
    )
    interval = build_optimizer(net, TINY.replace(optimizer="sam", options={"interval": 3}).resolved(), total_steps=16)
    assert (looksam.k, looksam.alpha) == (4, 0.7)
    assert late.will_perturb is False and interval.interval == 3
    from samkit import sam_step

    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    for optimizer in (looksam, late, interval):
        for _ in range(16):
            sam_step(optimizer, net, torch.nn.functional.cross_entropy, x, y)
    assert looksam.passes == 16 + 4  # steps 0, 4, 8, 12
    assert late.passes == 16 + 4  # the last quarter: steps 12..15
    assert interval.passes == 16 + 6  # steps 0, 3, ..., 15


def test_bad_options_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match="looksam has no option 'kk'; its options: k, alpha, layerwise"):
        TINY.replace(optimizer="looksam", options={"kk": 5}).resolved()
    with pytest.raises(ValueError, match="option k='five'"):
        TINY.replace(optimizer="looksam", options={"k": "five"}).resolved()
    with pytest.raises(ValueError, match="schedule must be one of"):
        TINY.replace(optimizer="rst", options={"schedule": "stairs"}).resolved()
    with pytest.raises(ValueError, match="only apply to a SAM-family method"):
        TINY.replace(optimizer="sgd", options={"k": 5}).resolved()
    with pytest.raises(ValueError, match="k must be"):
        net = build_model("mlp", in_channels=1, num_classes=4, image_size=8)
        build_optimizer(net, TINY.replace(optimizer="looksam", options={"k": 0}).resolved())


def test_specs_parse_fixed_and_grid_options():
    spec = parse_spec("looksam:k=2|5:alpha=0.5")
    assert (spec.name, spec.fixed, spec.grid) == ("looksam", {"alpha": "0.5"}, {"k": ["2", "5"]})
    with pytest.raises(ValueError, match="unknown optimizer 'lookesam'"):
        parse_spec("lookesam:k=2")
    with pytest.raises(ValueError, match="expected option=value"):
        parse_spec("looksam:k")
    with pytest.raises(ValueError, match="sgd has no options"):
        parse_spec("sgd:k=2")
    base = TINY.replace(val_fraction=0.25)
    configs = grid_by_spec(base, optimizers=["sam:interval=5", "looksam:k=2|5"], seeds=[0])
    names = [run_name(config, spec) for spec, config in configs]
    assert names == [
        "sam_interval5_lr0.05_rho0.05_seed0",
        "looksam_k2_lr0.05_rho0.05_seed0",
        "looksam_k5_lr0.05_rho0.05_seed0",
    ]
    with pytest.raises(ValueError, match="needs a validation split"):
        grid_by_spec(TINY, optimizers=["looksam:k=2|5"], seeds=[0])
    own = grid_by_spec(base, optimizers=["asam:rho=0.2|1", "sam"], seeds=[0], rhos=[0.05, 0.1])
    assert [(c.optimizer, c.rho) for _, c in own] == [("asam", 0.2), ("asam", 1.0), ("sam", 0.05), ("sam", 0.1)]
    with pytest.raises(ValueError, match="mesa has no rho"):
        grid_by_spec(base, optimizers=["mesa:rho=0.1"], seeds=[0])


def test_ratio_of_means_interval_by_hand():
    value = ratio_of_means_ci([-1.0, -2.0, -3.0], [-2.0, -2.0, -2.0])
    assert value.value == pytest.approx(1.0) and value.n == 3
    # every resample's ratio lies in [0.5, 1.5] (the means of the numerators over a constant denominator)
    assert 0.5 <= value.low <= value.value <= value.high <= 1.5
    assert ratio_of_means_ci([1.0], [2.0]).format(scale=100) == "50 (n=1)"


def rows_for(errors: dict[str, list[float]], passes: dict[str, float], seconds: dict[str, float]):
    return [
        {
            "optimizer": name,
            "lr": 0.1,
            "rho": None,
            "seed": seed,
            "status": "ok",
            "status_reason": "",
            "test_error": error,
            "val_accuracy": None,
            "run": f"{name}{seed}",
            "passes_per_step": passes[name],
            "seconds_per_step": seconds[name],
            "options": "",
        }
        for name, values in errors.items()
        for seed, error in enumerate(values)
    ]


def test_share_of_gain_cost_ratios_and_verdict():
    errors = {
        "sgd": [0.20, 0.22, 0.21],
        "sam": [0.14, 0.15, 0.15],
        "rst": [0.15, 0.15, 0.15],
        "looksam": [0.19, 0.21, 0.20],
    }
    rows = rows_for(
        errors,
        {"sgd": 1.0, "sam": 2.0, "rst": 1.5, "looksam": 1.2},
        {"sgd": 0.1, "sam": 0.2, "rst": 0.11, "looksam": 0.12},
    )
    sam_gain = sum(s - b for s, b in zip(errors["sam"], errors["sgd"]))
    rst_gain = sum(s - b for s, b in zip(errors["rst"], errors["sgd"]))
    share = share_of_gain(
        [r for r in rows if r["optimizer"] == "rst"],
        [r for r in rows if r["optimizer"] == "sam"],
        [r for r in rows if r["optimizer"] == "sgd"],
    )
    assert share.value == pytest.approx(rst_gain / sam_gain)
    table = {line["optimizer"]: line for line in summary_table(rows)}
    assert table["rst"]["passes"] == 1.5 and table["rst"]["time"] == pytest.approx(1.1)
    assert table["sam"]["share"] is None and table["sgd"]["share"] is None
    text = "\n".join(verdict(list(table.values())))
    assert "- yes: RST" in text and "- no: LookSAM" in text  # 18/19 of the gain at 1.10x; 3/19 at 1.20x
    assert table["rst"]["share"].value >= 0.9 > table["looksam"]["share"].value


def test_compare_reports_cost_and_draws_the_frontier(tmp_path):
    base = TrainConfig(data="synthetic", model="mlp", epochs=2, batch_size=32, lr=0.05, val_fraction=0.25)
    result = compare(base, tmp_path, optimizers=["sgd", "sam", "looksam:k=2|4"], seeds=[0], device="cpu", quiet=True)
    rows = list(csv.DictReader(result.csv_path.open()))
    assert {r["options"] for r in rows if r["optimizer"] == "looksam:k=2|4"} == {"k=2", "k=4"}
    assert {float(r["passes_per_step"]) for r in rows if r["optimizer"] == "sam"} == {2.0}
    report = result.report_path.read_text()
    assert "share of SAM's gain" in report and "| LookSAM |" in report
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    assert "timed side by side in this invocation" in report
    again = compare(
        base, tmp_path, optimizers=["sgd", "sam", "looksam:k=2|4"], seeds=[0], device="cpu", quiet=True, time_steps=0
    )
    assert all(str(r["reused"]) == "True" for r in again.rows)
    assert "were reused from an earlier invocation" in again.report_path.read_text()


def test_side_by_side_timing_counts_each_methods_passes():
    from samkit.experiments.timing import time_methods

    configs = {
        name: TINY.replace(optimizer=name, options=options).resolved()
        for name, options in (("sgd", None), ("sam", None), ("looksam", {"k": 4}), ("mesa", None))
    }
    timed = time_methods(configs, steps=4, repeats=2, warmup=1)
    assert timed["sgd"]["passes_per_step"] == 1.0 and timed["sam"]["passes_per_step"] == 2.0
    assert timed["looksam"]["passes_per_step"] == 1.25  # 12 steps, SAM on 0, 4, 8
    assert all(result["seconds_per_step"] > 0 for result in timed.values())
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        time_methods(configs, steps=0)


def test_the_sam_reference_is_sam_with_at_most_a_rho_grid():
    from samkit.experiments.compare_report import plain

    assert plain("sam", "sam") and plain("sam:rho=0.05|0.1", "sam") and plain("sgd", "sgd")
    assert not plain("sam:interval=5", "sam") and not plain("sam:rho=0.1:interval=5", "sam")
    assert not plain("msam", "sam")
