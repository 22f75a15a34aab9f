"""The experiment runner behind the ``samkit`` command: train, compare, evaluate, measure flatness.

Where things are (one concern a file):

    config.py          TrainConfig: every option of a run, declared once (help, flag, summary), and its checks
    methods.py         the training methods (SAM family, MESA/SAF) and their own options; optimizers.py builds one
    train_step.py      one training step for any method, and the one divergence rule (Diverged)
    trainer.py         train(): the loop over epochs and steps; its parts are in training/ (folder, model_init,
                       checkpointing, epoch, summary, state)
    compare.py         compare(): a grid of methods x settings x seeds; compare_report.py its tables,
                       intervals.py the confidence intervals, timing.py the side-by-side timing
    run_status.py      ok / diverged / collapsed for a finished run
    run_figures.py     the PNGs of a run and of a comparison
    rundir.py          the files of a run folder and when one may be reused; saved_runs.py opens a finished one
    evaluate_run.py    `samkit evaluate` (clean and corrupted test accuracy); metrics.py evaluates on tensors
    flatness.py        `samkit sharpness` / `landscape`, and λmax during training
    inputs.py          a run's data and labels (label noise, bootstrap); recipes.py the named recipes
    checkpoint.py, files.py, errors.py, schedule.py, step_log.py, distributed.py, fsdp.py, transfer.py,
    trajectory.py      the smaller pieces, each named by its first line
"""

from samkit.experiments.compare import CompareResult, compare
from samkit.experiments.config import TrainConfig
from samkit.experiments.evaluate_run import evaluate_run
from samkit.experiments.flatness import run_landscape, run_sharpness
from samkit.experiments.saved_runs import SavedRun, open_run
from samkit.experiments.trainer import TrainingInterrupted, train

__all__ = [
    "CompareResult",
    "SavedRun",
    "TrainConfig",
    "TrainingInterrupted",
    "compare",
    "evaluate_run",
    "open_run",
    "run_landscape",
    "run_sharpness",
    "train",
]
