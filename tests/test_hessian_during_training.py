"""The ratios examples/hessian_during_training.py reports over seeds, checked against plain numpy."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
hessian = runpy.run_path(str(EXAMPLES / "hessian_during_training.py"))


def _tracked(epoch: int, lambda_max: float) -> dict:
    return {"epoch": epoch, "lambda_max": lambda_max, "lambda_ratio": 2.0}


def test_final_ratios_divide_each_seeds_last_sgd_lambda_max_by_sams():
    runs = {
        0: {"sgd": [_tracked(10, 9.0), _tracked(20, 3.0)], "sam": [_tracked(10, 1.0), _tracked(20, 1.5)]},
        4: {"sgd": [_tracked(10, 1.0), _tracked(20, 5.0)], "sam": [_tracked(10, 7.0), _tracked(20, 0.5)]},
        7: {"sgd": [_tracked(20, 2.0)], "sam": [_tracked(20, 4.0)]},
    }
    ratios = hessian["final_ratios"](runs)
    assert ratios == {0: pytest.approx(2.0, abs=1e-15), 4: pytest.approx(10.0, abs=1e-15), 7: 0.5}
    summary = hessian["ratio_summary"](ratios)
    values = np.array([2.0, 10.0, 0.5])
    assert summary.n == 3
    assert summary.mean == pytest.approx(values.mean(), abs=1e-12)
    # t(0.975, 2) = 4.302652729749462 (scipy.stats.t.ppf)
    assert summary.half_width == pytest.approx(4.302652729749462 * values.std(ddof=1) / np.sqrt(3), rel=1e-9)


def test_final_ratios_refuse_runs_that_end_at_different_epochs():
    runs = {3: {"sgd": [_tracked(10, 9.0), _tracked(20, 3.0)], "sam": [_tracked(10, 1.0)]}}
    with pytest.raises(ValueError, match="seed 3: SGD's last tracked epoch is 20, SAM's 10"):
        hessian["final_ratios"](runs)


def test_ratios_by_epoch_pair_the_epochs_every_seed_tracked():
    runs = {
        0: {"sgd": [_tracked(10, 9.0), _tracked(20, 3.0)], "sam": [_tracked(10, 3.0), _tracked(20, 1.5)]},
        1: {"sgd": [_tracked(10, 4.0), _tracked(20, 1.0), _tracked(25, 1.0)],
            "sam": [_tracked(10, 8.0), _tracked(20, 4.0), _tracked(25, 2.0)]},
    }
    assert hessian["ratios_by_epoch"](runs) == {10: [3.0, 0.5], 20: [2.0, 0.25]}
