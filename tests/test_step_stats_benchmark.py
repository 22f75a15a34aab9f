"""Smoke test of benchmarks/step_stats_cost.py: every row runs on tiny sizes and the JSON has its structure.

Nothing is timed or asserted about speed here (BENCHMARKS.md holds the measured table); what is checked: the
rows, that each is a finite number, the met flag agrees with the target, and the JSON is written and reads back.
"""

from __future__ import annotations

import json
import math

from benchmarks import step_stats_cost

TINY = dict(batch_size=4, block=1, step_repeats=1, width=1, ascent_repeats=1, warmup=0, tiny_repeats=3)
ROWS = (
    "step_stats_overhead_pct", "step_stats_overhead_read_pct", "step_stats_overhead_cosine_pct",
    "step_stats_overhead_noise_pct", "ascent_stats_overhead_pct", "ascent_stats_overhead_asam_pct",
    "ascent_stats_overhead_noise_pct", "recording_share_of_step_pct",
)


def test_every_row_runs_and_the_json_reads_back(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(step_stats_cost.PRESETS, "quick", TINY)
    path = tmp_path / "out" / "step_stats.json"
    assert step_stats_cost.main(["--quick", "--json", str(path)]) == 0
    document = json.loads(path.read_text())
    table = capsys.readouterr().out
    for key in ROWS:
        assert math.isfinite(document[key]) and document[key] > -100, key  # a ratio - 1 in %: above -100
        assert f"| {key} | {document[key]:+.2f} % |" in table, key
    assert math.isfinite(document["recording_us_per_step"])
    assert f"| recording_us_per_step | {document['recording_us_per_step']:+.2f} µs |" in table
    for key in ("step_stats_overhead_pct", "recording_share_of_step_pct"):
        assert document["met"][key] == (document[key] < 1.0), key
    assert document["meta"]["command"].endswith("--quick --json " + str(path))
    assert [p.name for p in path.parent.iterdir()] == ["step_stats.json"]  # no temporary file left behind
