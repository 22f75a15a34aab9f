"""The experiment runner behind the ``samkit`` command: train, compare, evaluate, measure flatness."""

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
