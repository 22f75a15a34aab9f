"""Side-by-side timing: variants interleaved round by round, the median of the per-round ratios.

Other processes share the machine, so absolute times drift; a ratio of two timings taken back to back
drifts far less. One round runs every variant once, in an order that alternates (A B, then B A) so that
neither variant always runs on a warm or a cold cache::

    warm up: each variant `warmup` times
    for r in 1..repeats:
        for v in (variants if r is odd else reversed(variants)):  t[v][r] = time of one call of v
    ratio(A, B) = median_r t[A][r] / t[B][r]
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch

from samkit.experiments.timing import interleaved, synchronize  # noqa: F401  (the one implementation; re-exported)


def check_count(name: str, value: object, *, minimum: int) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def median_ratio(times: Mapping[str, list[float]], numerator: str, denominator: str) -> float:
    """The median over rounds of times[numerator][r] / times[denominator][r]."""
    for name in (numerator, denominator):
        if name not in times:
            raise KeyError(f"no timings for {name!r}; have {sorted(times)}")
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    """The median seconds per call of each variant (for the details, not for the ratios)."""
    return {name: statistics.median(values) for name, values in times.items()}


@contextmanager
def threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)`` (1 gives stable ratios on a shared machine)."""
    check_count("threads", count, minimum=1)
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
