"""examples/flatness.py runs end to end (one epoch, a 3×3 grid) and writes both side-by-side PNGs."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flatness.py"


def test_example_prints_both_columns_and_writes_pngs(tmp_path, monkeypatch, capsys):
    argv = ["--epochs", "1", "--steps", "3", "--trace-samples", "2", "--out", str(tmp_path)]
    # pass the current thread count so that the example's set_num_threads leaves this process as it was
    monkeypatch.setattr(sys, "argv", ["flatness.py", *argv, "--threads", str(torch.get_num_threads())])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "SGD" in out and "SAM" in out and "λ1/λ5" in out and "m-sharpness worst" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landscape_1d_sgd_vs_sam.png", "landscape_2d_sgd_vs_sam.png"]
