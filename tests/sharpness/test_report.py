"""flatness_report: one call, plain JSON-able numbers, consistent with the individual measurements."""

from __future__ import annotations

import json

import pytest

from samkit.sharpness import flatness_report, hessian_eigenvalues, hessian_trace, m_sharpness
from tests.sharpness.reference import loss_fn, tiny_data, tiny_mlp, train


def test_report_matches_the_individual_calls():
    model = tiny_mlp()
    x, y = tiny_data(size=32)
    train(model, x, y, steps=200)
    report = flatness_report(model, loss_fn, (x, y), k=5, micro_batch_size=8, trace_samples=20, seed=3)
    json.dumps(report, allow_nan=False)  # plain numbers only
    values = hessian_eigenvalues(model, loss_fn, (x, y), k=5, tol=1e-4, seed=3)
    assert report["eigenvalues"] == values.tolist()
    assert report["lambda_max"] == values[0].item()
    assert report["lambda_ratio"] == pytest.approx(values[0].item() / values[4].item(), rel=1e-15)
    assert report["trace"] == hessian_trace(model, loss_fn, (x, y), samples=20, seed=3)
    worst = m_sharpness(model, loss_fn, (x, y), micro_batch_size=8, seed=3)
    average = m_sharpness(model, loss_fn, (x, y), micro_batch_size=8, kind="average", seed=3)
    assert report["m_sharpness_worst"] == worst and report["m_sharpness_average"] == average
    assert report["m_sharpness_worst"] >= report["m_sharpness_average"] >= 0
    assert report["hvps"] == report["hvps_eigenvalues"] + report["hvps_trace"]
    assert report["hvps_trace"] == 20 and report["micro_batches"] == 4 and report["num_parameters"] == 31
    assert report["eigenvalues_converged"] is True


def test_ratio_is_none_when_the_kth_eigenvalue_is_not_positive():
    # An untrained 31-parameter MLP's Hessian has zero and negative eigenvalues near the bottom.
    model = tiny_mlp()
    report = flatness_report(model, loss_fn, tiny_data(), k=31, micro_batch_size=8, trace_samples=2)
    assert report["eigenvalues"][-1] <= 0 and report["lambda_ratio"] is None
