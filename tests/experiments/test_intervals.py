import math

import numpy as np
import pytest
from scipy import stats

from samkit.experiments.intervals import mean_ci, t_quantile, t_two_sided_probability


@pytest.mark.parametrize("df", list(range(1, 31)) + [50, 120])
def test_t_quantile_matches_scipy(df):
    assert t_quantile(0.95, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-10)
    assert t_quantile(0.99, df) == pytest.approx(stats.t.ppf(0.995, df), rel=1e-10)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.0])
def test_two_sided_probability_matches_scipy(df, t):
    expected = stats.t.cdf(t, df) - stats.t.cdf(-t, df)
    assert t_two_sided_probability(t, df) == pytest.approx(expected, abs=1e-13)


def test_mean_ci_matches_the_textbook_interval():
    values = [0.0457, 0.0449, 0.0466, 0.0451]
    ci = mean_ci(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert ci.n == 4
    assert ci.mean == pytest.approx(np.mean(values), rel=1e-15)
    assert ci.half_width == pytest.approx((high - low) / 2, rel=1e-10)


def test_one_value_has_no_interval_and_non_finite_values_are_refused():
    assert math.isnan(mean_ci([0.5]).half_width)
    assert mean_ci([0.5]).format(scale=100) == "50.00 (n=1)"
    assert mean_ci([]).format() == "n/a"
    with pytest.raises(ValueError, match="values must be finite to average, got nan"):
        mean_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="df must be an integer >= 1, got 0"):
        t_quantile(0.95, 0)
