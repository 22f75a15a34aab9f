"""The arithmetic of examples/delta_vs_size.py on a small fake compare folder, checked against plain numpy."""

from __future__ import annotations

import csv
import json
import runpy
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
delta_vs_size = runpy.run_path(str(EXAMPLES / "delta_vs_size.py"))

# t_{0.975, df} from scipy.stats.t.ppf
T975 = {2: 4.302652729749462, 3: 3.1824463052837078}
SGD = [0.20, 0.21, 0.19, 0.22]
SAM = [0.18, 0.205, None, 0.20]  # seed 2 diverged: left out of the pairing
SAM_OTHER_RHO = [0.10, 0.10, 0.10, 0.10]  # not selected: must not count
MSAM = [0.195, 0.20, 0.185, 0.225]


def fake_compare(folder: Path, *, model: str = "mlp", subset: int | None = 500, sizes: dict | None = None) -> Path:
    rows = []
    for optimizer, method, rho, errors, selected in [
        ("sgd", "sgd", "", SGD, True),
        ("sam:rho=0.05|0.1", "sam", "0.05", SAM_OTHER_RHO, False),
        ("sam:rho=0.05|0.1", "sam", "0.1", SAM, True),
        ("msam:rho=0.02", "msam", "0.02", MSAM, True),
    ]:
        for seed, error in enumerate(errors):
            run = f"{method}_rho{rho}_seed{seed}"
            rows.append({"optimizer": optimizer, "method": method, "rho": rho, "seed": seed,
                         "status": "ok" if error is not None else "diverged",
                         "test_error": "nan" if error is None else repr(error), "selected": str(selected),
                         "run": run})
            (folder / "runs" / run).mkdir(parents=True)
            size = (sizes or {}).get(run, subset)
            (folder / "runs" / run / "config.json").write_text(json.dumps({"model": model, "subset": size}))
    with (folder / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_delta_is_the_paired_per_seed_difference_with_a_student_t_interval(tmp_path):
    cells = {cell.method: cell for cell in delta_vs_size["cells"](fake_compare(tmp_path))}
    assert sorted(cells) == ["msam", "sam"]
    sam, msam = cells["sam"], cells["msam"]
    assert (sam.model, sam.size, sam.rho, msam.rho) == ("mlp", 500, 0.1, 0.02)

    diff = np.array([SAM[0] - SGD[0], SAM[1] - SGD[1], SAM[3] - SGD[3]])  # seed 2 has no SAM run to pair
    assert sam.delta.n == 3
    assert sam.delta.mean == pytest.approx(diff.mean(), abs=1e-15)
    assert sam.delta.half_width == pytest.approx(T975[2] * diff.std(ddof=1) / np.sqrt(3), rel=1e-9)

    diff = np.array(MSAM) - np.array(SGD)
    assert msam.delta.n == 4
    assert msam.delta.mean == pytest.approx(diff.mean(), abs=1e-15)
    assert msam.delta.half_width == pytest.approx(T975[3] * diff.std(ddof=1) / 2.0, rel=1e-9)
    assert msam.baseline.mean == pytest.approx(np.mean(SGD), abs=1e-15)
    assert msam.error.mean == pytest.approx(np.mean(MSAM), abs=1e-15)

    text = delta_vs_size["table"](list(cells.values()))
    assert f"| mlp | 500 | mSAM (0.02) | 4 | 20.50 ± {100 * T975[3] * np.std(SGD, ddof=1) / 2:.2f} |" in text


def test_the_figure_and_table_are_written(tmp_path):
    fake_compare(tmp_path / "small")
    fake_compare(tmp_path / "large", subset=2000)
    delta_vs_size["main"]([str(tmp_path / "small"), str(tmp_path / "large"), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "delta_vs_size.png").stat().st_size > 0
    table = (tmp_path / "out" / "delta_vs_size.md").read_text()
    assert "| mlp | 500 | SAM (0.1) | 3 |" in table and "| mlp | 2000 | SAM (0.1) | 3 |" in table


def test_a_folder_that_mixes_sizes_or_has_no_size_is_refused(tmp_path):
    fake_compare(tmp_path / "mixed", sizes={"sam_rho0.1_seed1": 1000})
    with pytest.raises(ValueError, match="mixes models or sizes"):
        delta_vs_size["cells"](tmp_path / "mixed")
    fake_compare(tmp_path / "whole", subset=None)
    with pytest.raises(ValueError, match="no --subset"):
        delta_vs_size["cells"](tmp_path / "whole")
    with pytest.raises(FileNotFoundError, match="samkit compare --out"):
        delta_vs_size["cells"](tmp_path / "nothing")
