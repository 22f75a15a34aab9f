"""`samkit train`'s SAM step rows: their cadence and epochs in metrics.jsonl, resume, TensorBoard, the curves panel."""

from __future__ import annotations

import json
import math
import sys

import pytest

from samkit.cli import main
from samkit.experiments import trainer as trainer_module
from samkit.experiments.step_log import epoch_rows, step_rows
from samkit.experiments.trainer import TrainingInterrupted, train

from .conftest import TINY

SAM = TINY.replace(optimizer="sam", rho=0.05)  # 256 examples, batch 32: 8 steps an epoch, 16 in all
STEPS_PER_EPOCH = 8


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_step_rows_every_n_steps_before_their_epoch_row(tmp_path):
    train(SAM, tmp_path / "r", device="cpu", quiet=True, plot=False, step_stats_every=3, step_stats_cosine=True)
    lines = rows(tmp_path / "r")
    steps = step_rows(lines)
    assert [r["step"] for r in steps] == [3, 6, 9, 12, 15]
    assert [r["epoch"] for r in steps] == [1, 1, 2, 2, 2]
    assert [r["epoch"] for r in epoch_rows(lines)] == [1, 2]
    # each epoch's step rows come right before its row
    assert [r.get("kind", "epoch") for r in lines] == ["step", "step", "epoch", "step", "step", "step", "epoch"]
    for row in steps:
        assert row["sam"] is True and row["optimizer_step"] == row["step"]
        assert row["eps_norm"] == pytest.approx(0.05, rel=1e-6)  # rho, in float32
        assert row["loss_rise"] == pytest.approx(row["perturbed_loss"] - row["loss"], rel=1e-9)
        assert -1 <= row["cosine"] <= 1 and row["grad_norm"] > 0 and 0 < row["lr"] <= 0.05


def test_zero_turns_them_off_and_base_optimizers_have_none(tmp_path):
    train(SAM, tmp_path / "off", device="cpu", quiet=True, plot=False, step_stats_every=0)
    assert step_rows(rows(tmp_path / "off")) == []
    train(TINY, tmp_path / "sgd", device="cpu", quiet=True, plot=False, step_stats_every=1)
    assert step_rows(rows(tmp_path / "sgd")) == []
    with pytest.raises(ValueError, match="step_stats_every must be an integer >= 0 .* got -1"):
        train(SAM, tmp_path / "bad", device="cpu", quiet=True, plot=False, step_stats_every=-1)


def test_one_pass_steps_are_marked(tmp_path):
    train(SAM.replace(optimizer="looksam"), tmp_path / "l", device="cpu", quiet=True, plot=False, step_stats_every=1)
    steps = step_rows(rows(tmp_path / "l"))
    assert len(steps) == 2 * STEPS_PER_EPOCH
    plain = [r for r in steps if not r["sam"]]
    assert plain and all(r["grad_norm"] is None and r["loss_rise"] is None for r in plain)
    assert all(r["loss"] is not None for r in steps)


def test_resume_keeps_every_row_once_and_tensorboard_hides_the_cut_epoch(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")  # the optional extra; installed in CI
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    options = dict(device="cpu", quiet=True, plot=False, step_stats_every=1, tensorboard=True)
    train(SAM, tmp_path / "whole", **options)
    real_step, calls = trainer_module.train_step, []

    def interrupt_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == STEPS_PER_EPOCH + 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", interrupt_in_epoch_two)
    with pytest.raises(TrainingInterrupted, match="holds epoch 1"):
        train(SAM, tmp_path / "cut", **options)
    assert len(step_rows(rows(tmp_path / "cut"))) == STEPS_PER_EPOCH  # the cut epoch's rows were never written
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    train(SAM, tmp_path / "cut", resume=True, **options)

    timing = ("seconds", "train_seconds")
    whole, cut = (
        [{k: v for k, v in r.items() if k not in timing} for r in rows(tmp_path / run)] for run in ("whole", "cut")
    )
    assert cut == whole
    assert [r["step"] for r in step_rows(cut)] == list(range(1, 2 * STEPS_PER_EPOCH + 1))

    for run in ("whole", "cut"):
        events = EventAccumulator(str(tmp_path / run / "tensorboard"))
        events.Reload()
        rises = events.Scalars("sam/loss_rise")
        assert [e.step for e in rises] == list(range(1, 2 * STEPS_PER_EPOCH + 1)), run  # once each, none lost
        for event, row in zip(rises, step_rows(whole)):
            assert event.value == pytest.approx(row["loss_rise"], rel=1e-6)
        test_loss = events.Scalars("epoch/test_loss")
        assert [e.step for e in test_loss] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
        assert [e.value for e in test_loss] == pytest.approx([r["test_loss"] for r in epoch_rows(whole)], rel=1e-6)


def test_tensorboard_missing_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'samkit\[tensorboard\]'"):
        train(SAM, tmp_path / "tb", device="cpu", quiet=True, plot=False, tensorboard=True)
    assert not (tmp_path / "tb").exists()


def test_cli_options_reach_the_run(tmp_path):
    out = tmp_path / "cli"
    argv = ["train", "--data", "synthetic", "--model", "mlp", "--epochs", "1", "--batch-size", "32"]
    argv += ["--device", "cpu", "--quiet", "--optimizer", "sam", "--out", str(out)]
    assert main([*argv, "--step-stats-every", "4", "--step-stats-cosine"]) == 0
    steps = step_rows(rows(out))
    assert [r["step"] for r in steps] == [4, 8]
    assert all(r["cosine"] is not None and math.isfinite(r["cosine"]) for r in steps)
    assert (out / "curves.png").stat().st_size > 1000  # drawn with the step panels


def test_the_curves_gain_the_step_panels_only_with_sam_step_rows(tmp_path, monkeypatch):
    from samkit.experiments import run_figures

    drawn = []
    monkeypatch.setattr(run_figures, "_save", lambda figure, path: drawn.append(figure))
    epochs = [{"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "train_acc": 0.5, "test_acc": 0.4}]
    step = {"kind": "step", "epoch": 1, "step": 1, "sam": True, "grad_norm": 2.0, "eps_norm": 0.05, "loss_rise": 0.1}
    plain = {**step, "step": 2, "sam": False, "grad_norm": None, "eps_norm": None, "loss_rise": None}
    run_figures.learning_curves(epochs, tmp_path / "a.png")
    run_figures.learning_curves(epochs, tmp_path / "b.png", steps=[plain])  # one-pass rows have nothing to draw
    run_figures.learning_curves(epochs, tmp_path / "c.png", steps=[step, plain])
    run_figures.learning_curves(epochs, tmp_path / "d.png", steps=[{**step, "cosine": 0.9}])
    titles = [[axis.get_title() for axis in figure.axes] for figure in drawn]
    assert titles[0] == titles[1] == ["loss", "error"]
    assert titles[2] == ["loss", "error", "SAM ascent", "SAM loss rise"]
    assert titles[3] == ["loss", "error", "SAM ascent", "SAM loss rise", ""]  # + the cosine's twin axis
    assert [line.get_ydata().tolist() for line in drawn[2].axes[2].lines] == [[2.0], [0.05]]
    assert drawn[2].axes[3].lines[0].get_ydata().tolist() == [0.1]
