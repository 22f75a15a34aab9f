import numpy as np
import pytest
from scipy import stats

from samkit.experiments.compare_report import render_markdown, select_settings, summary_table


def row(optimizer, seed, test_error, *, lr=0.1, rho=None, status="ok", val=None, reason=""):
    return {
        "optimizer": optimizer,
        "lr": lr,
        "rho": rho,
        "seed": seed,
        "status": status,
        "status_reason": reason,
        "test_error": test_error,
        "val_accuracy": val,
        "run": f"{optimizer}_rho{rho}_seed{seed}",
        "micro_batches": 1,
    }


def test_each_optimizer_takes_the_setting_with_the_best_mean_validation_accuracy():
    rows = [row("sgd", s, 0.1) for s in range(2)]
    rows += [row("sam", s, 0.08, rho=0.05, val=0.80 + s / 100) for s in range(2)]
    rows += [row("sam", s, 0.09, rho=0.01, val=0.90) for s in range(2)]
    # the best validation score belongs to a collapsed run: it must not win
    rows += [row("sam", 0, 0.9, rho=0.5, val=0.99, status="collapsed"), row("sam", 1, 0.9, rho=0.5, status="collapsed")]
    assert select_settings(rows) == {"sgd": (0.1, None, ""), "sam": (0.1, 0.01, "")}


def test_a_value_that_fails_on_most_seeds_does_not_win_on_its_survivor():
    rows = [row("sam", 0, 0.05, rho=0.05, val=0.95)]  # the one seed where rho 0.05 learned
    rows += [row("sam", s, 0.9, rho=0.05, val=0.10, status="collapsed") for s in (1, 2)]
    rows += [row("sam", s, 0.08, rho=0.01, val=0.60) for s in range(3)]  # every seed learns, less well
    assert select_settings(rows) == {"sam": (0.1, 0.01, "")}
    # a diverged seed counts as 0, whatever accuracy its NaN weights happened to score
    rows = [row("sam", 0, 0.05, rho=0.05, val=0.95), row("sam", 1, float("nan"), rho=0.05, val=0.9, status="diverged")]
    rows += [row("sam", s, 0.08, rho=0.01, val=0.60) for s in range(2)]
    assert select_settings(rows) == {"sam": (0.1, 0.01, "")}
    assert "averaged over all its seeds" in render_markdown(rows, title="t", setting="s")


def test_a_grid_without_validation_scores_is_refused():
    rows = [row("sam", 0, 0.1, rho=0.01), row("sam", 0, 0.1, rho=0.05)]
    with pytest.raises(ValueError, match="--val-fraction 0.1"):
        select_settings(rows)


def test_table_excludes_failed_runs_and_pairs_the_difference_by_seed():
    sgd = [0.050, 0.046, 0.048, 0.047]
    sam = [0.041, 0.040, 0.044, 0.90]  # seed 3 collapsed
    rows = [row("sgd", s, e) for s, e in enumerate(sgd)]
    rows += [row("sam", s, e, rho=0.05, status="collapsed" if s == 3 else "ok", reason="x") for s, e in enumerate(sam)]
    table = {line["optimizer"]: line for line in summary_table(rows)}
    ok_sam = np.array(sam[:3])
    assert table["sam"]["ok"] == 3 and table["sam"]["total"] == 4
    assert table["sam"]["error"].mean == pytest.approx(ok_sam.mean(), rel=1e-12)
    differences = ok_sam - np.array(sgd[:3])
    half = stats.t.ppf(0.975, 2) * differences.std(ddof=1) / np.sqrt(3)
    assert table["sam"]["delta"].mean == pytest.approx(differences.mean(), rel=1e-12)
    assert table["sam"]["delta"].half_width == pytest.approx(half, rel=1e-9)
    assert table["sgd"]["delta"] is None

    markdown = render_markdown(rows, title="t", setting="s", plots=["test_error.png"])
    assert "| SAM | 4.17 ± " in markdown
    assert "| sam_rho0.05_seed3 | collapsed | x |" in markdown
    assert "not averaged in" in markdown
    assert "![test_error.png](test_error.png)" in markdown


def test_an_optimizer_whose_runs_all_failed_says_so():
    rows = [row("sgd", 0, 0.1), row("sam", 0, float("nan"), rho=0.05, status="diverged", reason="non-finite loss")]
    assert "| SAM | all runs failed |" in render_markdown(rows, title="t", setting="s")


def test_the_share_of_sams_gain_is_undefined_when_sams_own_gain_may_be_zero():
    from samkit.experiments.compare_report import console_table

    sgd = [0.100, 0.100, 0.100]
    method = [0.090, 0.092, 0.091]
    # SAM's per-seed differences to SGD: +0.002, -0.003, +0.0015: mean ≈ 0.00017, and its 95 % CI includes 0
    flat_sam = [0.102, 0.097, 0.1015]
    rows = [row("sgd", s, e) for s, e in enumerate(sgd)]
    rows += [row("looksam", s, e) for s, e in enumerate(method)]
    rows += [row("sam", s, e, rho=0.05) for s, e in enumerate(flat_sam)]
    table = {line["optimizer"]: line for line in summary_table(rows)}
    assert table["looksam"]["share"] is None and table["looksam"]["share_note"] == "undefined"
    markdown = render_markdown(rows, title="t", setting="s")
    assert "| LookSAM | 9.10 ± " in markdown and " | undefined | " in markdown
    assert "undefined when SAM's own Δ is 0 or its 95 % CI includes 0" in markdown
    (looksam_line,) = [line for line in console_table(rows).splitlines() if line.startswith("LookSAM")]
    assert "undefined" in looksam_line
    # a clear gain: the share is the ratio of the mean differences, 9 / 10
    clear_sam = [0.090, 0.090, 0.090]
    rows = [r for r in rows if r["optimizer"] != "sam"] + [row("sam", s, e, rho=0.05) for s, e in enumerate(clear_sam)]
    share = {line["optimizer"]: line for line in summary_table(rows)}["looksam"]["share"]
    assert share.value == pytest.approx(0.009 / 0.010, rel=1e-9)
