"""Smoke test of the benchmarks: every row runs on tiny sizes and the JSON has the documented structure.

Nothing here times anything or asserts a speed: the ratios of a one-repeat run on a busy machine mean
nothing. What is checked: the keys, that every value is a finite positive number, that the targets and
the met flags agree with the values, that the JSON file is written (atomically) and reads back, and the
pieces with exact answers (the per-tensor reference's ascent and restore, the HVP-count ratio's
definition, the byte counting of the memory row, the median of paired ratios).
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks import revision_ab, run
from benchmarks.allocator import minor_page_faults
from benchmarks.memory import step_peak_bytes, tensor_bytes
from benchmarks.reference_sam import LoopSAMPerturbation
from benchmarks.timing import interleaved, median_ratio
from samkit import SAM

TINY = dict(
    batch_size=8, warmup=0, step_repeats=1, perturb_width=1, small_tensors=6, perturb_repeats=1,
    msam_repeats=1, vmap_micro_batches=4, vmap_repeats={"cnn": 1, "mlp": 1},
    hessian_seeds=1, hessian_examples=32, hessian_train_steps=2, hessian_max_iter=10,
    hessian_lanczos_max_iter=5, memory_batch_size=8, family_block=2, family_repeats=1,
)
REQUIRED = (
    "sam_over_sgd_step", "perturb_over_sgd_step", "perturb_over_sgd_step_swap", "loop_over_foreach_small",
    "msam4_over_sam", "hvps_power_over_lanczos", "peak_memory_over_sgd",
)


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    """One tiny run of the whole CLI (``--quick`` with the sizes shrunk), read back from its JSON.

    Power iteration may stop at hessian_max_iter unconverged here (a RuntimeWarning): the count is still a count.
    """
    path = tmp_path_factory.mktemp("bench") / "out" / "bench.json"
    quick = run.PRESETS["quick"]
    run.PRESETS["quick"] = TINY
    try:
        with run.threads(1), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "hessian_eigenvalues .* stopped", RuntimeWarning)
            assert run.main(["--quick", "--json", str(path)]) == 0
    finally:
        run.PRESETS["quick"] = quick
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporary file left behind
    return json.loads(path.read_text())


def test_every_row_is_a_finite_positive_number(document):
    assert set(REQUIRED) <= set(run.ROWS)
    for key in run.ROWS:
        value = document[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)


def test_targets_met_flags_and_details_agree_with_the_values(document):
    for key, (_, target) in run.ROWS.items():
        met = document["met"][key]
        if target is None:
            assert document["targets"][key] == "report" and met is None
        else:
            comparison, bound = target
            assert document["targets"][key] == f"{comparison} {bound}"
            assert met == (document[key] <= bound if comparison == "<=" else document[key] >= bound)
        assert isinstance(document["details"][key], dict)
    assert document["msam4_over_sam"] == document["msam4_over_sam_loop"]
    for field in ("command", "torch", "machine", "threads", "device", "date", "settings"):
        assert field in document["meta"]
    assert document["meta"]["torch"] == torch.__version__ and document["meta"]["quick"] is True


def test_hvp_ratio_is_power_over_lanczos_hvps(document):
    (only,) = document["details"]["hvps_power_over_lanczos"]["runs"]
    assert document["hvps_power_over_lanczos"] == only["power"]["hvps"] / only["lanczos"]["hvps"]


def test_memory_row_is_the_ratio_of_the_two_peaks(document):
    peaks = document["details"]["peak_memory_over_sgd"]["bytes"]
    assert document["peak_memory_over_sgd"] == peaks["sam"]["peak"] / peaks["sgd"]["peak"]
    for name in ("sgd", "sam"):
        assert peaks[name]["peak"] == peaks[name]["start"] + peaks[name]["climb"] and peaks[name]["climb"] > 0


def test_sam_costs_one_copy_of_the_weights_more_than_sgd(document):
    """The analytic prediction (benchmarks/memory.py): the saved weights, and nothing else parameter-sized."""
    for key in ("peak_memory_over_sgd", "peak_memory_over_sgd_mlp"):
        details = document["details"][key]
        weights = details["weights_bytes"]
        assert abs(details["measured_difference_bytes"] - weights) <= 0.01 * weights, (key, details)


def test_step_peak_bytes_follows_allocations_and_frees():
    def step():
        a = torch.empty(1000, dtype=torch.float64)
        b = torch.empty(500, dtype=torch.float64)
        del a
        c = torch.empty(200, dtype=torch.float64)
        return b, c

    kept = torch.zeros(10, dtype=torch.float32)
    measured = step_peak_bytes(step, [kept], device="cpu")
    assert measured["start"] == 40 and measured["climb"] == 8000 + 4000 and measured["peak"] == 12040


def test_format_table_marks_a_missed_target():
    rows = {key: {"value": 1.0, "details": {}} for key in run.ROWS}
    rows["sam_over_sgd_step"]["value"] = 2.5
    table = run.format_table(rows).splitlines()
    assert len(table) == 2 + len(run.ROWS)
    line = next(line for line in table if "`sam_over_sgd_step`" in line)
    assert "2.500" in line and "**no**" in line


def test_reference_loop_ascends_by_rho_along_the_gradient_and_restores_exactly():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64)), torch.nn.Parameter(torch.randn(4))]
    params[0].grad = torch.randn(3, 2, dtype=torch.float64)
    params[1].grad = None  # neither perturbed nor restored
    before = [p.detach().clone() for p in params]
    reference = LoopSAMPerturbation(params, rho=0.3)
    reference.first_step()
    step = params[0].detach() - before[0]
    expected = 0.3 * params[0].grad / params[0].grad.norm()
    torch.testing.assert_close(step, expected, rtol=1e-12, atol=0)
    assert torch.equal(params[1], before[1])
    reference.restore()
    assert all(torch.equal(p, w) for p, w in zip(params, before))


def test_tensor_bytes_counts_a_shared_storage_once():
    base = torch.zeros(10, dtype=torch.float64)
    assert tensor_bytes([base, base[2:5], base.view(2, 5), torch.zeros(3, dtype=torch.float32)]) == 80 + 12


def test_page_faults_are_reported_per_step(document):
    faults = document["details"]["vmap_over_loop_k32_mlp"]["minor_page_faults_per_step"]
    assert set(faults) == {"loop", "vmap"} and all(v is None or v >= 0 for v in faults.values())


def test_keep_freed_memory_works_on_glibc_and_declines_elsewhere():
    """In a subprocess: mallopt changes the whole process, which the rest of the test session shares."""
    code = "from benchmarks.allocator import keep_freed_memory; print(keep_freed_memory())"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(platform.libc_ver()[0] == "glibc")


def test_revision_ab_loads_a_second_sam_and_compares(tmp_path):
    """The working tree's own sources as the 'old' revision: a distinct class that behaves the same."""
    optim = Path(__file__).resolve().parent.parent / "samkit" / "optim"
    sources = [(optim / f"{name}.py").read_text() for name in ("perturbation", "sam")]
    old = revision_ab.load_sam_class(*sources, tmp_path)
    assert old is not SAM and old.__module__.startswith("_samkit_revision_")
    rows = revision_ab.compare(old, repeats=1, warmup=0, width=1, count=4)
    assert set(rows) == {"wrn-16-1", "4 small"}
    for row in rows.values():
        assert all(row[key] > 0 for key in ("old_over_sgd", "new_over_sgd", "old_over_new"))
    with pytest.raises(ValueError, match="does not contain 'from samkit.optim.perturbation import'"):
        revision_ab.load_sam_class(sources[0], "import torch\n", tmp_path)


def test_median_ratio_pairs_rounds():
    times = {"a": [2.0, 9.0, 3.0], "b": [1.0, 3.0, 1.0]}
    assert median_ratio(times, "a", "b") == 3.0  # per-round ratios 2, 3, 3 (the ratio of medians is 3 / 1)
    calls = []
    out = interleaved({"x": lambda: calls.append("x"), "y": lambda: calls.append("y")}, repeats=3, warmup=1)
    assert calls == ["x", "y", "x", "y", "y", "x", "x", "y"] and [len(v) for v in out.values()] == [3, 3]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: interleaved({"x": lambda: None}, repeats=0), "repeats must be an integer >= 1, got 0"),
        (lambda: LoopSAMPerturbation([], rho=-0.1), "rho must be > 0, got -0.1"),
        (lambda: run.measure({}), "settings lacks"),
        (lambda: minor_page_faults(lambda: None, calls=0), "calls must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_name_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
