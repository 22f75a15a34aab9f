"""SAM's first_step + restore at an earlier git revision against the working tree, side by side.

    python benchmarks/revision_ab.py REV [--repeats 101] [--keep-freed-memory]

How BENCHMARKS.md's before/after table was made. The revision's ``samkit/optim/perturbation.py`` and
``samkit/optim/sam.py`` are loaded as separate modules (the old sam.py pointed at the old perturbation.py),
and both SAMs, plus an SGD(momentum) step, are timed interleaved on the same parameters::

    for each parameter set (WRN-16-4's 2.7M in 44 tensors; 800 small tensors):
        old/SGD, new/SGD, old/new = medians of per-round ratios; minor page faults per call of each
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `samkit` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.allocator import keep_freed_memory, minor_page_faults  # noqa: E402
from benchmarks.timing import check_count, interleaved, median_ratio, threads  # noqa: E402
from benchmarks.workloads import small_parameters, wide_parameters  # noqa: E402
from samkit import SAM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PERTURBATION_IMPORT = "from samkit.optim.perturbation import"


def load_sam_class(perturbation_source: str, sam_source: str, folder: Path) -> type:
    """The SAM class defined by these two sources, imported from ``folder`` under private module names."""
    if PERTURBATION_IMPORT not in sam_source:
        raise ValueError(f"sam.py does not contain {PERTURBATION_IMPORT!r}: cannot point it at the old module")
    tag = "_samkit_revision_" + hashlib.sha1((perturbation_source + sam_source).encode()).hexdigest()[:12]
    (folder / f"{tag}_perturbation.py").write_text(perturbation_source)
    (folder / f"{tag}_sam.py").write_text(sam_source.replace(PERTURBATION_IMPORT, f"from {tag}_perturbation import"))
    sys.path.insert(0, str(folder))
    try:
        module = _import(f"{tag}_sam", folder / f"{tag}_sam.py")
    finally:
        sys.path.remove(str(folder))
    return module.SAM


def compare(old_sam: type, *, repeats: int = 101, warmup: int = 3, width: int = 4, count: int = 800) -> dict:
    """{parameter set: {"old_over_sgd", "new_over_sgd", "old_over_new", "minor_page_faults_per_call"}}."""
    check_count("repeats", repeats, minimum=1)
    rows = {}
    parameter_sets = {f"wrn-16-{width}": wide_parameters(width=width), f"{count} small": small_parameters(count)}
    for name, params in parameter_sets.items():
        sgd = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        sgd.step()
        optimizers = {"old": old_sam(params, torch.optim.SGD, lr=0.01, momentum=0.9),
                      "new": SAM(params, torch.optim.SGD, lr=0.01, momentum=0.9)}
        variants = {"sgd": sgd.step, **{key: _ascent_and_restore(opt) for key, opt in optimizers.items()}}
        times = interleaved(variants, repeats=repeats, warmup=warmup)
        rows[name] = {
            "old_over_sgd": median_ratio(times, "old", "sgd"),
            "new_over_sgd": median_ratio(times, "new", "sgd"),
            "old_over_new": median_ratio(times, "old", "new"),
            "minor_page_faults_per_call": {key: minor_page_faults(run) for key, run in variants.items()},
        }
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="a git revision of this repository, e.g. 78bdb1a")
    parser.add_argument("--repeats", type=int, default=101)
    parser.add_argument("--keep-freed-memory", action="store_true", help="as in benchmarks/run.py")
    args = parser.parse_args(argv)
    sources = [_git_show(args.revision, f"samkit/optim/{name}.py") for name in ("perturbation", "sam")]
    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory needs glibc (mallopt), which this platform does not have")
    with tempfile.TemporaryDirectory() as folder, threads(1):
        rows = compare(load_sam_class(*sources, Path(folder)), repeats=args.repeats)
    print("| parameters | old / SGD | new / SGD | old / new | minor page faults per call (sgd, old, new) |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        faults = ", ".join("n/a" if v is None else f"{v:.0f}" for v in row["minor_page_faults_per_call"].values())
        ratios = " | ".join(f"{row[key]:.2f}" for key in ("old_over_sgd", "new_over_sgd", "old_over_new"))
        print(f"| {name} | {ratios} | {faults} |")
    return 0


def _ascent_and_restore(optimizer):
    def run() -> None:
        optimizer.first_step()
        optimizer.restore()

    return run


def _git_show(revision: str, path: str) -> str:
    result = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"cannot read {path} at revision {revision!r}: {result.stderr.strip()}")
    return result.stdout


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.exit(main())
