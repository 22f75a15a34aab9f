"""What recording ``last_step_stats`` costs: the same SAM step with the recording off, on, on + a read, on + cosine.

    python benchmarks/step_stats_cost.py [--quick] [--threads 1] [--device cpu] [--json PATH]

Every variant runs the SAME model and optimizer, switched by ``record_step_stats`` right before its turn (copies
of a model differ in where their memory lies, which on a CPU moved the timings by a few % on its own); the
variants are timed interleaved (``benchmarks.timing``: the order alternates round by round, each ratio is the
median of the per-round ratios). ``off_again`` is the same as ``off``: its ratio is the noise floor of the run::

    step_stats_overhead_pct         a block of sam_step calls on samkit's MLP (784 -> 256 -> 256 -> 10 on 1x28x28),
                                    batch 128: the whole step (2 passes, ascent, restore, SGD(momentum)).
                                    A small model, so a fixed per-step cost shows at its largest.
                                    100 (t_on / t_off - 1)                                    target < 1 %
    ... _read_pct                   the same, reading last_step_stats after every step (one device copy each)
    ... _cosine_pct                 with record_step_stats(cosine=True) (a copy of g, a dot product)
    ... _noise_pct                  off_again against off: what a difference of zero measures as
    ascent_stats_overhead_pct       first_step + restore + second_step alone on a WRN-16-4's parameters (2.7M in
                                    44 tensors, gradients set): the optimizer's part, where the share is largest
    ... _asam_pct                   the same under ASAM (adaptive: ||ε̂|| is measured on ε̂, one extra read)
    ... _noise_pct                  its off_again against off
    recording_us_per_step           the recording's own time per step, measured where nothing else hides it:
                                    first_step + restore + second_step on a 4-tensor model (8 -> 8 -> 2),
                                    median of t_on - t_off over many rounds, in µs
    recording_share_of_step_pct     that time over the median sam_step of the first row: the fixed cost's share
                                    of a whole step, with no timing noise of the big step in it   target < 1 %

On a shared machine the full-step rows move by a few % from run to run (see their noise row); the last two
rows bound the recording's cost without that noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `samkit` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.timing import check_count, interleaved, median_ratio, medians, threads  # noqa: E402
from benchmarks.workloads import fashion_batch, wide_parameters  # noqa: E402
from samkit import SAM, sam_step  # noqa: E402
from samkit.models import build_model  # noqa: E402

LR, MOMENTUM, RHO = 0.01, 0.9, 0.05
TARGET_PCT = 1.0
TARGETED = ("step_stats_overhead_pct", "recording_share_of_step_pct")
PRESETS = {
    "full": dict(batch_size=128, block=5, step_repeats=101, width=4, ascent_repeats=151, warmup=2, tiny_repeats=4001),
    "quick": dict(batch_size=128, block=3, step_repeats=31, width=4, ascent_repeats=41, warmup=1, tiny_repeats=1001),
}
RECORDINGS = {  # variant -> (record_step_stats(...) arguments, read the stats after every step)
    "off": (dict(enabled=False), False),
    "on": (dict(enabled=True), False),
    "off_again": (dict(enabled=False), False),
    "on_read": (dict(enabled=True), True),
    "on_cosine": (dict(enabled=True, cosine=True), False),
}


def _percent(times, variant: str, baseline: str = "off") -> float:
    return 100.0 * (median_ratio(times, variant, baseline) - 1.0)


def step_stats_overhead(*, batch_size=128, block=5, repeats=101, warmup=2, device="cpu") -> dict:
    """Rows ``step_stats_overhead_pct`` (+ ``_read_pct``, ``_cosine_pct``, ``_noise_pct``): the whole sam_step."""
    check_count("block", block, minimum=1)
    model = build_model("mlp", in_channels=1, num_classes=10, image_size=28).to(device)
    inputs, targets = fashion_batch(batch_size, device=device)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)

    def variant(options: dict, read: bool) -> Callable[[], None]:
        def run() -> None:
            opt.record_step_stats(**options)
            for _ in range(block):
                sam_step(opt, model, F.cross_entropy, inputs, targets)
                if read:
                    opt.last_step_stats  # noqa: B018 (the read is what is timed)

        return run

    times = interleaved({k: variant(*v) for k, v in RECORDINGS.items()}, repeats=repeats, warmup=warmup)
    return {
        "step_stats_overhead_pct": _percent(times, "on"),
        "step_stats_overhead_read_pct": _percent(times, "on_read"),
        "step_stats_overhead_cosine_pct": _percent(times, "on_cosine"),
        "step_stats_overhead_noise_pct": _percent(times, "off_again"),
        "details": {
            "model": "samkit mlp on 1x28x28, 10 classes",
            "parameters": sum(p.numel() for p in model.parameters()),
            "batch_size": batch_size,
            "steps_per_block": block,
            "repeats": repeats,
            "median_seconds_per_step": {k: v / block for k, v in medians(times).items()},
        },
    }


def ascent_stats_overhead(*, width=4, repeats=151, warmup=2, device="cpu") -> dict:
    """Rows ``ascent_stats_overhead_pct`` (+ ``_asam_pct``, ``_noise_pct``): the optimizer's part of a step."""
    params = [t.detach().clone().requires_grad_(True) for t in wide_parameters(width=width, device=device)]
    grads = [torch.randn_like(t) * 1e-3 for t in params]
    sam = SAM(params, torch.optim.SGD, rho=RHO, lr=0.0, momentum=MOMENTUM)
    asam = SAM(params, torch.optim.SGD, rho=RHO, lr=0.0, momentum=MOMENTUM, adaptive=True)

    variants = {
        "sam_off": _ascent_step(sam, params, grads, False),
        "sam_on": _ascent_step(sam, params, grads, True),
        "sam_off_again": _ascent_step(sam, params, grads, False),
        "asam_off": _ascent_step(asam, params, grads, False),
        "asam_on": _ascent_step(asam, params, grads, True),
    }
    times = interleaved(variants, repeats=repeats, warmup=warmup)
    return {
        "ascent_stats_overhead_pct": _percent(times, "sam_on", "sam_off"),
        "ascent_stats_overhead_asam_pct": _percent(times, "asam_on", "asam_off"),
        "ascent_stats_overhead_noise_pct": _percent(times, "sam_off_again", "sam_off"),
        "details": {
            "what": "first_step + restore + second_step, gradients preset, SGD(momentum) with lr 0",
            "parameters": sum(t.numel() for t in params),
            "tensors": len(params),
            "repeats": repeats,
            "median_seconds": medians(times),
        },
    }


def _ascent_step(opt: SAM, params: list, grads: list, enabled: bool) -> Callable[[], None]:
    """One timed call: recording switched as asked, gradients preset, first_step + restore + second_step."""

    def run() -> None:
        opt.record_step_stats(enabled)
        for t, g in zip(params, grads):
            t.grad = g
        opt.first_step()
        opt.restore()
        opt.second_step()

    return run


def recording_cost(*, repeats=2001, warmup=20, device="cpu") -> dict:
    """Row ``recording_us_per_step``: the fixed per-step time of the recording, on a model too small to hide it."""
    torch.manual_seed(0)
    params = [torch.randn(8, 8), torch.randn(8), torch.randn(2, 8), torch.randn(2)]
    params = [t.to(device).requires_grad_(True) for t in params]
    grads = [torch.randn_like(t) for t in params]
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=0.0, momentum=MOMENTUM)

    def variant(enabled: bool) -> Callable[[], None]:
        return _ascent_step(opt, params, grads, enabled)

    times = interleaved(
        {"off": variant(False), "on": variant(True), "off_again": variant(False)}, repeats=repeats, warmup=warmup
    )
    difference = statistics.median(a - b for a, b in zip(times["on"], times["off"]))
    noise = statistics.median(a - b for a, b in zip(times["off_again"], times["off"]))
    return {
        "recording_us_per_step": 1e6 * difference,
        "details": {"noise_us": 1e6 * noise, "repeats": repeats, "median_seconds": medians(times)},
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, the same sizes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here (atomically)")
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    with threads(args.threads):
        step = step_stats_overhead(
            batch_size=preset["batch_size"],
            block=preset["block"],
            repeats=preset["step_repeats"],
            warmup=preset["warmup"],
            device=args.device,
        )
        ascent = ascent_stats_overhead(
            width=preset["width"], repeats=preset["ascent_repeats"], warmup=preset["warmup"], device=args.device
        )
        fixed = recording_cost(repeats=preset["tiny_repeats"], warmup=preset["warmup"], device=args.device)
    step_seconds = step["details"]["median_seconds_per_step"]["off"]
    fixed["recording_share_of_step_pct"] = 100.0 * fixed["recording_us_per_step"] * 1e-6 / step_seconds
    rows = {k: v for part in (step, ascent, fixed) for k, v in part.items() if k != "details"}
    print("| row | value | target |")
    print("|---|---|---|")
    for key, value in rows.items():
        target = f"< {TARGET_PCT:g} %" if key in TARGETED else "report"
        unit = "µs" if key.endswith("_us_per_step") else "%"
        print(f"| {key} | {value:+.2f} {unit} | {target} |")
    if args.json is not None:
        given = sys.argv[1:] if argv is None else argv
        document = {
            **rows,
            "met": {key: rows[key] < TARGET_PCT for key in TARGETED},
            "details": {"step": step["details"], "ascent": ascent["details"], "recording": fixed["details"]},
            "meta": {
                "command": " ".join(["python benchmarks/step_stats_cost.py", *given]),
                "torch": torch.__version__,
                "machine": platform.platform(),
                "threads": args.threads,
                "device": args.device,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
        }
        _write_atomically(args.json, json.dumps(document, indent=2, sort_keys=True) + "\n")
    return 0


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


if __name__ == "__main__":
    sys.exit(main())
