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
