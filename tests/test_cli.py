"""The samkit command: errors name the bad value and exit 2 before any training; the commands run end to end."""

import json

import pytest

from samkit.cli import main

TINY = ["--data", "synthetic", "--model", "mlp", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--optimizer", "sam", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "vit"], "unknown model 'vit'; valid: mlp, mlp-bn, cnn, cnn-bn"),
        (["--data", "cifar"], "unknown data 'cifar'; valid: digits, fashion-mnist, synthetic"),
        (["--optimizer", "sgd", "--micro-batches", "4"], "micro_batches=4 only applies to msam"),
        (["--optimizer", "sam", "--rho", "0.01,0.05"], "--rho takes one value in `samkit train`"),
        (["--optimizer", "sgd", "--rho", "0.05"], "rho=0.05 only applies to sam/asam/msam"),
        (["--label-noise", "1.5"], "label_noise must be in [0.0, 1.0), got 1.5"),
        (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    ],
)
def test_bad_input_exits_2_with_the_value_named(tmp_path, capsys, arguments, message):
    assert main(["train", *TINY, "--out", str(tmp_path / "x"), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "config.json").exists()


def test_argparse_rejects_unknown_choices_listing_them(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["train", *TINY, "--out", str(tmp_path), "--optimizer", "lion"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'lion'" in err
    assert all(name in err.split("choose from")[1] for name in ("sgd", "adam", "sam", "asam", "msam"))


def test_train_writes_the_run_and_refuses_to_reuse_its_folder(run_dir, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizer"] == "sam" and summary["epochs"] == 1
    assert main(["train", *TINY, "--optimizer", "sam", "--lr", "0.01", "--out", str(run_dir)]) == 2
    assert "already holds a run with a different config (lr: 0.1 -> 0.01" in capsys.readouterr().err
    assert main(["train", *TINY, "--optimizer", "sam", "--out", str(run_dir), "--resume"]) == 0


def test_evaluate_prints_the_corruption_table(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--corruptions", "blur,contrast", "--severities", "1,5"]) == 0
    printed = capsys.readouterr().out
    assert "clean test accuracy" in printed and "contrast" in printed and "sev 5" in printed
    assert main(["evaluate", str(run_dir / "missing")]) == 2
    assert "no run at" in capsys.readouterr().err


def test_compare_rejects_a_grid_without_validation(tmp_path, capsys):
    assert main(["compare", *TINY, "--optimizers", "sgd,sam", "--rho", "0.01,0.05", "--out", str(tmp_path)]) == 2
    assert "--val-fraction 0.1" in capsys.readouterr().err


def test_compare_with_options_starts_from_train_defaults_not_the_readme_job(tmp_path, capsys):
    # the README job trains on 40 % flipped labels; naming any training option must not inherit that
    assert main(["compare", *TINY, "--optimizers", "sgd", "--seeds", "1", "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "runs" / "sgd_lr0.1_seed0" / "config.json").read_text())
    assert (config["label_noise"], config["data"], config["model"]) == (0.0, "synthetic", "mlp")
    printed = capsys.readouterr().out
    assert "report: " in printed and "plot: " in printed


def test_compare_with_no_options_is_the_readme_job(tmp_path, monkeypatch, capsys):
    import importlib

    compare_module = importlib.import_module("samkit.experiments.compare")  # the package re-exports the function

    calls = []

    def record(base, out, **options):
        calls.append((base, options))
        plot = tmp_path / "test_error.png"
        return compare_module.CompareResult([], tmp_path / "report.md", tmp_path / "results.csv", [plot], "TABLE")

    monkeypatch.setattr(compare_module, "compare", record)
    monkeypatch.chdir(tmp_path)
    assert main(["compare"]) == 0
    (base, options), = calls
    assert (base.data, base.model) == ("digits", "mlp") and base.label_noise > 0
    assert tuple(options["optimizers"]) == ("sgd", "sam", "msam") and len(options["seeds"]) >= 3
    assert options["lrs"] is None and options["rhos"] is None
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert "TABLE" in printed and printed[-1] == f"plot: {tmp_path / 'test_error.png'}"


def test_help_shows_what_an_omitted_training_option_means(capsys):
    from samkit.experiments.config import DEFAULT_LR, DEFAULT_RHO, TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split()).split("training options", 1)[1]  # argparse wraps lines
    defaults = TrainConfig()
    for option, field in (("--epochs", "epochs"), ("--batch-size", "batch_size"), ("--weight-decay", "weight_decay"),
                          ("--model", "model"), ("--data", "data"), ("--momentum", "momentum")):
        help_text = shown.split(f"{option} {field.upper()}", 1)[1].split(" --", 1)[0]
        assert f"default {getattr(defaults, field)}" in help_text, (option, help_text)
    assert f"{DEFAULT_LR['sgd']:g} for sgd-based" in shown and f"{DEFAULT_RHO['asam']:g} for asam" in shown


def test_compare_seeds_a_count_a_list_or_one_seed_with_a_trailing_comma(capsys):
    from samkit.cli import _seeds

    assert _seeds("3") == [0, 1, 2] and _seeds("4,7") == [4, 7] and _seeds("5,") == [5]
    with pytest.raises(SystemExit) as stopped:
        main(["compare", *TINY, "--seeds", "0"])
    assert stopped.value.code == 2
    assert "to run seed 0 alone, write it as a list: --seeds 0," in capsys.readouterr().err


# ------------------------------------------------------------------------------------ errors: exit codes, nothing lost


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_threads_below_one_or_not_a_number_is_a_usage_error(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as stopped:
        main(["train", *TINY, "--out", str(tmp_path / "x"), "--threads", value])
    assert stopped.value.code == 2
    assert f"expected a number of threads >= 1, got '{value}'" in capsys.readouterr().err


def test_resume_of_a_folder_that_holds_no_run_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder, state in (("missing", "does not exist"), ("empty", "is empty")):
        assert main(["train", *TINY, "--out", str(tmp_path / folder), "--resume"]) == 2
        assert f"--resume: {tmp_path / folder} {state}, so there is no run to continue" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


def test_overwrite_keeps_the_old_run_when_the_new_one_is_refused(run_dir, capsys):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    command = ["train", *TINY, "--optimizer", "sam", "--subset", "10", "--out", str(run_dir), "--overwrite"]
    assert main(command) == 2
    assert "batch_size=32 is larger than the 10 training examples" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_an_out_path_that_cannot_be_written_is_a_usage_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert main(["train", *TINY, "--out", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'file' / 'sub'} lies under {tmp_path / 'file'}, which is a file" in err
    # a read-only folder (simulated: the tests may run as root, who writes anywhere)
    from samkit.experiments import rundir

    real_open = rundir.os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(rundir.LOCK):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(rundir.os, "open", read_only)
    assert main(["train", *TINY, "--out", str(tmp_path / "ro")]) == 2
    assert f"cannot write in --out {tmp_path / 'ro'}: Permission denied" in capsys.readouterr().err


def test_an_error_inside_training_is_internal_not_bad_input(tmp_path, monkeypatch):
    from samkit.experiments import trainer

    def broken_step(*args, **kwargs):
        raise ValueError("the HVP returned a non-finite value")

    monkeypatch.setattr(trainer, "train_step", broken_step)
    with pytest.raises(ValueError, match="non-finite"):  # traceback, exit 1: not "bad input" (exit 2)
        main(["train", *TINY, "--out", str(tmp_path / "x")])


def test_ctrl_c_during_a_checkpoint_write_exits_130_with_the_resume_message(tmp_path, capsys, monkeypatch):
    import os
    import signal

    import torch

    real_save = torch.save

    class SignalsWhileWriting:
        def __init__(self, handle):
            self.handle, self.writes = handle, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return self.handle.write(data)

        def __getattr__(self, attribute):
            return getattr(self.handle, attribute)

    def save(payload, handle, *args, **kwargs):
        wrap = isinstance(payload, dict) and payload.get("epoch") == 1
        return real_save(payload, SignalsWhileWriting(handle) if wrap else handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 130
    assert f"samkit: interrupted; {out / 'checkpoint.pt'} holds epoch 1: run the same command with --resume" in (
        capsys.readouterr().err
    )
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out), "--resume"]) == 0


def _fail_writes_of(monkeypatch, name):
    import errno
    import os

    from samkit.experiments import files

    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if os.path.basename(path).startswith(f".{name}.tmp-"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", fake_open, raising=False)


def test_evaluate_and_sharpness_print_their_result_before_a_failed_write(run_dir, capsys, monkeypatch):
    _fail_writes_of(monkeypatch, "evaluation.json")
    assert main(["evaluate", str(run_dir)]) == 1
    printed = capsys.readouterr()
    assert "weights: epoch 1 of 1 (finished)" in printed.out and "clean test accuracy: " in printed.out
    assert f"cannot write {run_dir / 'evaluation.json'}: Read-only file system; the result printed above" in printed.err
    _fail_writes_of(monkeypatch, "sharpness.json")
    assert main(["sharpness", str(run_dir), "--examples", "64", "--k", "2", "--micro-batch-size", "32"]) == 1
    printed = capsys.readouterr()
    assert "lambda_max: " in printed.out and f"cannot write {run_dir / 'sharpness.json'}" in printed.err


def test_evaluate_refuses_a_diverged_run_and_warns_on_an_unfinished_one(tmp_path, capsys, monkeypatch):
    boom = tmp_path / "boom"
    assert main(["train", *TINY, "--epochs", "2", "--lr", "10000", "--momentum", "0", "--out", str(boom)]) == 1
    assert json.loads((boom / "summary.json").read_text())["status"] == "diverged"
    assert main(["evaluate", str(boom)]) == 2
    err = capsys.readouterr().err
    assert f"{boom} diverged (non-finite loss" in err and "not a trained model" in err
    assert not (boom / "evaluation.json").exists()

    from samkit.experiments import trainer

    real_step, calls = trainer.train_step, []

    def stop_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 256 // 32 + 1:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", stop_in_epoch_two)
    assert main(["train", *TINY, "--epochs", "2", "--out", str(tmp_path / "cut")]) == 130
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "cut")]) == 0
    printed = capsys.readouterr()
    assert "weights: epoch 1 of 2 (UNFINISHED run)" in printed.out
    assert "samkit evaluate: warning: " in printed.err
    assert "unfinished: evaluate uses the weights of epoch 1" in printed.err


def test_a_checkpoint_that_is_empty_or_not_a_checkpoint_says_so(run_dir, tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert main(["evaluate", str(tmp_path / "empty.pt")]) == 2
    assert "is not a readable samkit checkpoint: it is empty (0 bytes)" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir / "config.json")]) == 2
    err = capsys.readouterr().err
    assert "is not a readable samkit checkpoint: not a torch.save zip file (it starts with b'{" in err
    assert "101" not in err


def test_compare_prints_the_job_it_runs(tmp_path, capsys):
    assert main(["compare", *TINY, "--optimizers", "sgd", "--seeds", "1", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("job: `samkit train`'s defaults with the options given, not the default comparison's")
    assert "data synthetic, model mlp, 1 epochs, batch 32" in first


def test_importing_samkit_and_its_command_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, samkit, samkit.cli; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "command, message",
    [
        (["sharpness", "--k", "0"], "k must be >= 1, got 0"),
        (["sharpness", "--examples", "0"], "examples must be >= 1, got 0"),
        (["landscape", "--steps", "1"], "steps must be >= 3, got 1"),
        (["landscape", "--span", "-1"], "span must be a finite number > 0, got -1.0"),
    ],
)
def test_measurement_options_are_checked_as_bad_input(run_dir, capsys, command, message):
    assert main([command[0], str(run_dir), *command[1:]]) == 2
    assert message in capsys.readouterr().err
