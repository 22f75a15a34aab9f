"""The output folder of a run: what it holds, and when an existing one may be reused.

    DIR/config.json    the resolved TrainConfig        DIR/metrics.jsonl  one line per epoch
    DIR/checkpoint.pt  written atomically every epoch   DIR/summary.json   when training has finished
    DIR/curves.png     learning curves                  DIR/hessian.png    with --track-hessian
    DIR/label_noise.json  which labels --label-noise flipped
    written later by `samkit evaluate / sharpness / landscape`: evaluation.json, corruptions.csv,
    sharpness.json, landscape.png (they describe the trained model, so --overwrite removes them too)

An existing DIR with a config.json is
    refused        when its config differs from the new one (unless --overwrite), naming the differences;
    refused        when its config is the same but neither --resume nor --overwrite is given;
    continued      with --resume (from checkpoint.pt; a finished run is left as it is);
    cleared        with --overwrite (only the files above are removed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from samkit.experiments.files import read_json

CONFIG, METRICS, CHECKPOINT, SUMMARY = "config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"
CURVES_PLOT, HESSIAN_PLOT, LABEL_NOISE = "curves.png", "hessian.png", "label_noise.json"
EVALUATION, CORRUPTIONS_CSV = "evaluation.json", "corruptions.csv"
DERIVED_FILES = (EVALUATION, CORRUPTIONS_CSV, "sharpness.json", "landscape.png")  # the last two: experiments.flatness
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, SUMMARY, CURVES_PLOT, HESSIAN_PLOT, LABEL_NOISE, *DERIVED_FILES)


class RunDirError(ValueError):
    """The output folder cannot be used as asked."""


def config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(wanted))
    return [f"{key}: {saved.get(key)!r} -> {wanted.get(key)!r}" for key in keys if saved.get(key) != wanted.get(key)]


def prepare_run_dir(out: Path, config: dict[str, Any], *, resume: bool, overwrite: bool) -> Optional[Path]:
    """Check ``out`` against the rules above; return the checkpoint to resume from, or None to start fresh.

    With ``overwrite`` the run's files are deleted here; nothing else is written.
    """
    out = Path(out)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder: pick another path")
    config_path = out / CONFIG
    if not config_path.exists():
        if (out / CHECKPOINT).exists() and not overwrite:
            raise RunDirError(f"{out} holds a checkpoint.pt but no config.json: pass --overwrite or another --out")
        return None
    if overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        return None
    saved = read_json(config_path)
    differences = config_differences(saved, config)
    if differences:
        raise RunDirError(
            f"{out} already holds a run with a different config ({'; '.join(differences)}): "
            "pass --overwrite to replace it, or choose another --out"
        )
    if not resume:
        state = "finished" if (out / SUMMARY).exists() else "unfinished"
        raise RunDirError(
            f"{out} already holds a {state} run with this config: pass --resume to continue it "
            "or --overwrite to start again"
        )
    checkpoint = out / CHECKPOINT
    return checkpoint if checkpoint.exists() else None
