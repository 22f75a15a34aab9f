"""Run every benchmark, print the markdown table, optionally write the numbers as JSON.

    python benchmarks/run.py [--quick] [--json PATH] [--threads 1] [--device cpu] [--keep-freed-memory]

Every ratio is measured side by side in one process (variants interleaved, medians of repeats; see
``benchmarks/timing.py``), with ``torch.set_num_threads(--threads)``: one thread by default, because on a
shared machine a ratio of single-threaded timings is far more stable than one of multi-threaded timings.
``--quick`` uses fewer repeats and seeds (under 2 minutes on 2 cores) and the same sizes.
``--keep-freed-memory`` tells glibc to keep freed memory (no page faults on reallocation); by default the
allocator is left as users have it, and the page-fault counts in the details show where that matters.

JSON (written atomically): the keys of the table at the top level, each a number, plus ``targets``
(key -> "<= 2.05" ...), ``met`` (key -> true / false / null), ``details`` (key -> what was measured, medians
of the raw timings, sizes) and ``meta`` (command, torch version, machine, threads, device, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `samkit` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.allocator import keep_freed_memory  # noqa: E402
from benchmarks.family_cost import SKIPPED, family_over_sgd  # noqa: E402
from benchmarks.hessian_cost import hvps_power_over_lanczos  # noqa: E402
from benchmarks.memory import peak_memory_over_sgd  # noqa: E402
from benchmarks.msam_cost import msam_over_sam, vmap_over_loop  # noqa: E402
from benchmarks.perturb_cost import loop_over_foreach_small, perturb_over_sgd_step  # noqa: E402
from benchmarks.step_cost import sam_over_sgd_step  # noqa: E402
from benchmarks.timing import check_count, threads  # noqa: E402
from samkit.experiments.methods import METHODS  # noqa: E402

# key -> (what, target as (comparison, bound) or None for "report")
ROWS = {
    "sam_over_sgd_step": ("full step time, SAM / SGD, small CNN, batch 128", ("<=", 2.05)),
    "perturb_over_sgd_step": ("first_step + restore / one SGD(momentum) step, WRN-16-4 (2.7M params)", ("<=", 1.5)),
    "perturb_over_sgd_step_swap": (
        'the same with SAM(restore_by="swap"): w + ε̂ swapped in, no copy back',
        ("<=", 1.5),
    ),
    "loop_over_foreach_small": ("per-tensor-loop perturb+restore / samkit's, 800 small tensors", (">=", 1.5)),
    "msam4_over_sam": ("sam_step k=4 / k=1, batch 128 (loop backend)", ("<=", 1.15)),
    "msam4_over_sam_loop": ("sam_step k=4 / k=1, loop backend", ("<=", 1.15)),
    "msam4_over_sam_vmap": ("sam_step k=4 vmap / k=1 (loop)", ("<=", 1.15)),
    "accumulate4_over_sgd": ("floor: 4 x fwd-bwd on 32 + step / SGD step on 128", None),
    "vmap_over_loop_k32_cnn": ("sam_step k=32 (m=4): vmap / loop, small CNN", None),
    "vmap_over_loop_k32_mlp": ("sam_step k=32 (m=4): vmap / loop, MLP", None),
    "hvps_power_over_lanczos": ("HVPs to λmax at 1e-4 relative: power / Lanczos", (">=", 2.0)),
    "peak_memory_over_sgd": ("peak memory, SAM step / SGD step, small CNN, batch 128", None),
    "peak_memory_over_sgd_mlp": ("peak memory, SAM step / SGD step, MLP (weights dominate), batch 128", None),
}
# one row per method of the SAM family: its training time / SGD's over the same blocks of steps (family_cost.py)
# the one-pass methods claim SAM's gain at about SGD's cost: their step must stay within 1.15x SGD's
FAMILY_TARGETS: dict[str, tuple] = {"momentum-sam": ("<=", 1.15), "mesa": ("<=", 1.15), "saf": ("<=", 1.15)}
for _name in METHODS:
    if _name not in SKIPPED:
        ROWS[f"{_name}_over_sgd"] = (
            f"{METHODS[_name].label} (default options) / SGD, blocks of 10 steps, small BN CNN, batch 128",
            FAMILY_TARGETS.get(_name),
        )

# repeats and sizes; "quick" keeps the sizes of "full" (the rows mean the same) and repeats less
PRESETS = {
    "full": dict(
        batch_size=128, warmup=2, step_repeats=21, perturb_width=4, small_tensors=800, perturb_repeats=101,
        msam_repeats=11, vmap_micro_batches=32, vmap_repeats={"cnn": 7, "mlp": 41}, family_block=10, family_repeats=7,
        hessian_seeds=5, hessian_examples=512, hessian_train_steps=100, hessian_max_iter=2000,
        hessian_lanczos_max_iter=200, memory_batch_size=128,
    ),
    "quick": dict(
        batch_size=128, warmup=1, step_repeats=5, perturb_width=4, small_tensors=800, perturb_repeats=41,
        msam_repeats=3, vmap_micro_batches=32, vmap_repeats={"cnn": 2, "mlp": 15}, family_block=10, family_repeats=2,
        hessian_seeds=3, hessian_examples=512, hessian_train_steps=100, hessian_max_iter=2000,
        hessian_lanczos_max_iter=200, memory_batch_size=128,
    ),
}


def measure(settings: dict, *, device: str = "cpu", log: Callable[[str], None] = print) -> dict[str, dict]:
    """Every row: {key: {"value": number, "details": {...}}}, with the repeats and sizes in ``settings``."""
    missing = sorted(set(PRESETS["full"]) - set(settings))
    if missing:
        raise ValueError(f"settings lacks {missing}: start from a copy of PRESETS['full']")
    s = settings
    batch, warmup = s["batch_size"], s["warmup"]
    rows: dict[str, dict] = {}

    def timed(key: str, make: Callable[[], dict]) -> dict:
        start = time.perf_counter()
        result = make()
        log(f"  {key}: {time.perf_counter() - start:.1f} s")
        return result

    rows["sam_over_sgd_step"] = timed(
        "sam_over_sgd_step",
        lambda: sam_over_sgd_step(batch_size=batch, repeats=s["step_repeats"], warmup=warmup, device=device),
    )
    perturb = timed(
        "perturb_over_sgd_step",
        lambda: perturb_over_sgd_step(
            width=s["perturb_width"], repeats=s["perturb_repeats"], warmup=warmup + 1, device=device
        ),
    )
    rows["perturb_over_sgd_step"] = {"value": perturb["value"], "details": perturb["details"]}
    rows["perturb_over_sgd_step_swap"] = {
        "value": perturb["swap"],
        "details": {"measured_with": "perturb_over_sgd_step (same run, interleaved; see its details)"},
    }
    rows["loop_over_foreach_small"] = timed(
        "loop_over_foreach_small",
        lambda: loop_over_foreach_small(
            count=s["small_tensors"], repeats=s["perturb_repeats"], warmup=warmup + 1, device=device
        ),
    )
    rows.update(
        timed(
            "msam4",
            lambda: msam_over_sam(batch_size=batch, repeats=s["msam_repeats"], warmup=warmup, device=device),
        )
    )
    rows["msam4_over_sam"] = {
        "value": rows["msam4_over_sam_loop"]["value"],
        "details": {"backend": "loop (the default backend; the vmap ratio is msam4_over_sam_vmap)"},
    }
    for model in ("cnn", "mlp"):
        rows[f"vmap_over_loop_k32_{model}"] = timed(
            f"vmap_over_loop_k32_{model}",
            lambda model=model: vmap_over_loop(
                model_name=model,
                batch_size=batch,
                micro_batches=s["vmap_micro_batches"],
                repeats=s["vmap_repeats"][model],
                warmup=warmup,
                device=device,
            ),
        )
    rows["hvps_power_over_lanczos"] = timed(
        "hvps_power_over_lanczos",
        lambda: hvps_power_over_lanczos(
            seeds=s["hessian_seeds"],
            examples=s["hessian_examples"],
            train_steps=s["hessian_train_steps"],
            max_iter=s["hessian_max_iter"],
            lanczos_max_iter=s["hessian_lanczos_max_iter"],
        ),
    )
    for key, model in (("peak_memory_over_sgd", "cnn"), ("peak_memory_over_sgd_mlp", "mlp")):
        rows[key] = timed(
            key,
            lambda model=model: peak_memory_over_sgd(
                model_name=model, batch_size=s["memory_batch_size"], device=device
            ),
        )
    rows.update(
        timed(
            "family",
            lambda: family_over_sgd(
                batch_size=batch, block=s["family_block"], repeats=s["family_repeats"], warmup=warmup, device=device
            ),
        )
    )
    return {key: rows[key] for key in ROWS}


def target_met(key: str, value: float) -> Optional[bool]:
    target = ROWS[key][1]
    if target is None:
        return None
    comparison, bound = target
    return value <= bound if comparison == "<=" else value >= bound


def format_table(rows: dict[str, dict]) -> str:
    """The markdown table: key, what, value, target, met."""
    lines = ["| key | what | value | target | met |", "|---|---|---|---|---|"]
    for key, row in rows.items():
        what, target = ROWS[key]
        met = target_met(key, row["value"])
        target_text = "report" if target is None else f"{target[0]} {target[1]}"
        met_text = "" if met is None else ("yes" if met else "**no**")
        passes = row["details"].get("passes_per_step") if isinstance(row.get("details"), dict) else None
        if passes is not None:
            what = f"{what}; {passes:.2f} passes per step"
        lines.append(f"| `{key}` | {what} | {row['value']:.3f} | {target_text} | {met_text} |")
    return "\n".join(lines)


def report(rows: dict[str, dict], meta: dict) -> dict:
    """The JSON document (see the module docstring)."""
    document: dict = {key: row["value"] for key, row in rows.items()}
    document["targets"] = {k: ("report" if ROWS[k][1] is None else f"{ROWS[k][1][0]} {ROWS[k][1][1]}") for k in rows}
    document["met"] = {key: target_met(key, row["value"]) for key, row in rows.items()}
    document["details"] = {key: row["details"] for key, row in rows.items()}
    document["meta"] = meta
    return document


def write_json_atomic(path: Path, document: dict) -> None:
    """Write ``document`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(document, stream, indent=2, default=str)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as stream:
            names = [line.split(":", 1)[1].strip() for line in stream if line.startswith("model name")]
        cpu = f"{names[0]} x {len(names)}" if names else cpu
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} logical CPUs"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and seeds (under 2 minutes on 2 cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the run (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory (mallopt: no trim, no mmap), so reallocations do not page-fault",
    )
    args = parser.parse_args(argv)
    check_count("--threads", args.threads, minimum=1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} was asked for, but torch.cuda.is_available() is False: use --device cpu")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    allocator = "default"
    if args.keep_freed_memory:
        if not keep_freed_memory():
            parser.error("--keep-freed-memory needs glibc (mallopt), which this platform does not have")
        allocator = "glibc keeps freed memory (M_TRIM_THRESHOLD 2^31-1, M_MMAP_MAX 0)"
    started = time.perf_counter()
    with threads(args.threads):
        print(f"samkit benchmarks ({'quick' if args.quick else 'full'}, {args.threads} thread(s), {args.device})")
        settings = PRESETS["quick" if args.quick else "full"]
        rows = measure(settings, device=args.device, log=lambda line: print(line, flush=True))
    meta = {
        "settings": settings,
        "command": " ".join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": machine(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device),
        "threads": args.threads,
        "allocator": allocator,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print()
    print(format_table(rows))
    print(
        f"\n{meta['command']} | torch {meta['torch']} | {meta['machine']} | allocator: {allocator} | "
        f"{meta['date']} | {meta['seconds']} s"
    )
    if args.json is not None:
        write_json_atomic(args.json, report(rows, meta))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
