"""Several ``samkit train`` commands in one torchrun launch: every rank runs them in turn, so the tests of
distributed training pay torchrun's start-up (three Python processes importing torch) once.

    torchrun --nproc_per_node 2 tests/experiments/torchrun_jobs.py JOBS.json

JOBS.json is a list of {"name": ..., "argv": [the arguments after `samkit`], "stop_at": N or null}; a job with
``stop_at`` N is stopped by Ctrl-C (KeyboardInterrupt) at its N-th training step on every rank alike, as a user's
Ctrl-C would. Each rank writes what each command returned and printed, and the epoch its --out's checkpoint.pt
held when it ended, to RESULTS-<rank>.json beside JOBS.json.
The commands share one process group: it is left up between them and taken down after the last (gloo cannot join
a second group under the same torchrun rendezvous).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from samkit.cli import main
from samkit.experiments import distributed, trainer
from samkit.experiments.checkpoint import load_checkpoint


def _run(argv: list[str], stop_at) -> dict:
    real_step, calls = trainer.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    if stop_at is not None:
        trainer.train_step = interrupted
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit:  # argparse
                code = exit.code
    finally:
        trainer.train_step = real_step
    folder = Path(argv[argv.index("--out") + 1])
    saved = load_checkpoint(folder)["epoch"] if (folder / "checkpoint.pt").exists() else None
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "checkpoint_epoch": saved}


if __name__ == "__main__":
    distributed.teardown = lambda context: gc.collect()  # the group stays up for the next command
    jobs_file = Path(sys.argv[1])
    results = {job["name"]: _run(job["argv"], job.get("stop_at")) for job in json.loads(jobs_file.read_text())}
    rank = os.environ.get("RANK", "0")
    (jobs_file.parent / f"RESULTS-{rank}.json").write_text(json.dumps(results))
    if dist.is_initialized():
        gc.collect()  # the DDP reducers go before the group (distributed.teardown says why)
        dist.destroy_process_group()
