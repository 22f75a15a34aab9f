"""The trainer on `synthetic`: files, determinism, exact resume, out-dir rules, divergence, AMP."""

import io
import json
import sys

import pytest
import torch

from samkit.experiments import trainer as trainer_module
from samkit.experiments.checkpoint import load_checkpoint
from samkit.experiments.evaluate_run import evaluate_run
from samkit.experiments.rundir import RunDirError
from samkit.experiments.trainer import TrainingInterrupted, train

from .conftest import TINY

# SAM with momentum on a BN model, basic augmentation and mixup: every piece of state resume must carry
RESUMABLE = TINY.replace(model="cnn-bn", optimizer="sam", epochs=3, augment="basic", mixup=0.4, val_fraction=0.25)


def weights(out):
    return load_checkpoint(out)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_run_writes_every_promised_file(finished_run):
    out, summary = finished_run
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", "curves.png"):
        assert (out / name).is_file(), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in lines] == [1, 2]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"):
        assert all(key in row for row in lines), key
    required = (
        "test_accuracy",
        "test_loss",
        "train_loss",
        "epochs",
        "optimizer",
        "seed",
        "label_noise",
        "wall_seconds",
    )
    assert all(key in summary for key in required)
    assert summary["status"] == "ok" and summary["test_accuracy"] > 0.5
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]
    assert load_checkpoint(out)["epoch"] == 2


def test_same_seed_same_result_and_another_seed_differs(tmp_path):
    config = RESUMABLE.replace(epochs=1)
    first = train(config, tmp_path / "a", device="cpu", quiet=True, plot=False)
    second = train(config, tmp_path / "b", device="cpu", quiet=True, plot=False)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert first["test_loss"] == second["test_loss"]
    train(config.replace(seed=1), tmp_path / "c", device="cpu", quiet=True, plot=False)
    assert not torch.equal(weights(tmp_path / "a")["classifier.weight"], weights(tmp_path / "c")["classifier.weight"])


def test_resume_after_ctrl_c_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    train(RESUMABLE, tmp_path / "whole", device="cpu", quiet=True, plot=False)

    real_step, calls = trainer_module.train_step, []
    steps_per_epoch = 192 // RESUMABLE.batch_size  # 256 examples, 25 % held out for validation

    def interrupt_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == steps_per_epoch + 2:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", interrupt_in_epoch_two)
    with pytest.raises(TrainingInterrupted, match="holds epoch 1") as stopped:
        train(RESUMABLE, tmp_path / "cut", device="cpu", quiet=True, plot=False)
    assert stopped.value.checkpoint_epoch == 1
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 1  # the interrupted epoch left the checkpoint alone
    monkeypatch.setattr(trainer_module, "train_step", real_step)

    torch.manual_seed(12345)  # the global RNG at resume time must not matter
    resumed = train(RESUMABLE, tmp_path / "cut", device="cpu", resume=True, quiet=True, plot=False)
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "cut"))
    whole_metrics = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    cut_metrics = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    timing = ("seconds", "train_seconds")
    strip = [{k: v for k, v in json.loads(line).items() if k not in timing} for line in whole_metrics]
    assert strip == [{k: v for k, v in json.loads(line).items() if k not in timing} for line in cut_metrics]
    assert resumed["epochs_completed"] == 3


def test_an_existing_out_dir_is_refused_unless_resume_or_overwrite(finished_run, tmp_path):
    out, summary = finished_run
    with pytest.raises(RunDirError, match="already holds a finished run with this config: pass --resume"):
        train(TINY, out, device="cpu", quiet=True, plot=False)
    with pytest.raises(RunDirError, match=r"different config \(lr: 0.05 -> 0.01\)"):
        train(TINY.replace(lr=0.01), out, device="cpu", quiet=True, plot=False)
    with pytest.raises(RunDirError, match=r"different config"):
        train(TINY.replace(lr=0.01), out, device="cpu", quiet=True, resume=True, plot=False)
    assert (
        train(TINY, out, device="cpu", quiet=True, resume=True, plot=False) == summary
    )  # finished: read back, not retrained
    fresh = tmp_path / "copy"
    train(TINY.replace(epochs=1), fresh, device="cpu", quiet=True, plot=False)
    again = train(TINY, fresh, device="cpu", quiet=True, overwrite=True, plot=False)
    assert again["epochs_completed"] == 2


def test_a_diverging_run_is_reported_as_diverged(tmp_path):
    summary = train(
        TINY.replace(lr=1e4, momentum=0.0, epochs=2), tmp_path / "boom", device="cpu", quiet=True, plot=False
    )
    assert summary["status"] == "diverged"
    assert summary["epochs_completed"] <= 2


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, amp):
    summary = train(
        TINY.replace(optimizer="sam", amp=amp, epochs=1), tmp_path / amp, device="cpu", quiet=True, plot=False
    )
    assert summary["status"] == "ok"
    assert torch.isfinite(torch.tensor(summary["train_loss"]))
    # evaluation is in float32 (the weights are float32): the last epoch's line, the summary and
    # `samkit evaluate` report one number
    last = json.loads((tmp_path / amp / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["test_loss"], last["test_acc"]) == (summary["test_loss"], summary["test_accuracy"])
    assert evaluate_run(tmp_path / amp)["test_loss"] == summary["test_loss"]


def test_bad_names_and_sizes_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'vit'; valid: mlp, mlp-bn, cnn"):
        train(TINY.replace(model="vit"), tmp_path / "x", device="cpu")
    with pytest.raises(ValueError, match=r"unknown model 'wrn-15-2' \(WRN depth must be 6n \+ 4.*got 15\); valid: mlp"):
        train(TINY.replace(model="wrn-15-2"), tmp_path / "x", device="cpu")
    with pytest.raises(ValueError, match="unknown data 'imagenet'; valid: digits, fashion-mnist, synthetic"):
        train(TINY.replace(data="imagenet"), tmp_path / "x", device="cpu")
    with pytest.raises(ValueError, match="unknown augment 'autoaugment'; valid: none, basic, cutout"):
        train(TINY.replace(augment="autoaugment"), tmp_path / "x", device="cpu")
    with pytest.raises(ValueError, match="batch_size=512 is larger than the 256 training examples"):
        train(TINY.replace(batch_size=512), tmp_path / "x", device="cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        train(TINY, tmp_path / "x", device="tpu")
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_progress_bar_on_every_epoch_on_a_terminal_and_none_when_quiet(tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train(TINY, tmp_path / "bar", device="cpu", plot=False)
    steps = 256 // TINY.batch_size
    shown = terminal.getvalue()
    for epoch in (1, 2):  # drawn at the start of each epoch (and erased at its end: leave=False)
        bar = shown.split(f"\repoch {epoch}/2: ", 1)[1].split("\r", 1)[0]
        assert "%|" in bar and f"| 0/{steps} [" in bar, shown
    terminal.seek(0), terminal.truncate()
    train(TINY, tmp_path / "quiet", device="cpu", plot=False, quiet=True)
    assert terminal.getvalue() == ""


@pytest.mark.parametrize(
    "optimizer,options",
    [
        ("mesa", {"start_epoch": 1, "decay": 0.9}),
        ("saf", {"start_epoch": 1, "delay": 1}),
        ("momentum-sam", None),
        ("rst", None),
        ("looksam", {"k": 3}),
    ],
)
def test_every_kind_of_method_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch, optimizer, options):
    # the EMA model, the logit memory, the weights kept at an ascent point, a generator's draws, a stored g_v
    config = RESUMABLE.replace(optimizer=optimizer, options=options)
    whole = train(config, tmp_path / "whole", device="cpu", quiet=True, plot=False)
    real_step, calls = trainer_module.train_step, []

    def interrupt_in_epoch_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * (192 // RESUMABLE.batch_size) + 1:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", interrupt_in_epoch_three)
    with pytest.raises(TrainingInterrupted, match="holds epoch 2"):
        train(config, tmp_path / "cut", device="cpu", quiet=True, plot=False)
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    resumed = train(config, tmp_path / "cut", device="cpu", resume=True, quiet=True, plot=False)
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "cut"))
    assert resumed["test_loss"] == whole["test_loss"]
    assert resumed["cost"]["passes"] == whole["cost"]["passes"]
    assert resumed["cost"]["extra_forwards_per_step"] == whole["cost"]["extra_forwards_per_step"]
