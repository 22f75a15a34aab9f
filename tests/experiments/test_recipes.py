"""Named recipes: the settings against the SAM paper's appendix (Table 6), explicit options win, config.json
records the recipe, and every recipe trains one step on tiny generated CIFAR files."""

import json

import pytest

from samkit.cli import main
from samkit.experiments.recipes import RECIPES, build_config, overridden, recipes_table
from samkit.experiments.trainer import train
from tests.data.cifar_files import write_cifar10, write_cifar100

pytestmark = pytest.mark.filterwarnings("ignore:.*a partial or modified copy:UserWarning")

# Foret et al. 2021, appendix C.1: batch 256; Table 6: (lr, weight decay, rho CIFAR-10, rho CIFAR-100)
PAPER_TABLE_6 = {
    "wrn28-10": ("wrn-28-10", 200, 0.1, 0.0005, 0.05, 0.1),  # "WRN 28-10 (200 epochs)"
    "wrn28-10-1800ep": ("wrn-28-10", 1800, 0.05, 0.001, 0.05, 0.1),  # "WRN 28-10 (1800 epochs)"
    "pyramidnet272": ("pyramidnet-272-200", 1800, 0.05, 0.0005, 0.05, 0.2),  # "Pyramid vanilla"
}
SMALL_MODEL = {"wrn-28-10": "wrn-10-1", "pyramidnet-272-200": "pyramidnet-11-24"}


def test_the_recipes_are_the_papers_table_rows():
    expected = {}
    for data in ("cifar10", "cifar100"):
        for key, (model, epochs, lr, wd, rho10, rho100) in PAPER_TABLE_6.items():
            for suffix, augment in (("", "basic"), ("-cutout", "cutout")):
                for optimizer in ("sam", "sgd"):
                    expected[f"{data}-{key}{suffix}-{optimizer}"] = (
                        data, model, epochs, lr, wd, augment, optimizer,
                        (rho10 if data == "cifar10" else rho100) if optimizer == "sam" else None,
                    )
    assert set(RECIPES) == set(expected)
    for name, row in expected.items():
        config = build_config(name, {}).resolved()
        got = (config.data, config.model, config.epochs, config.lr, config.weight_decay, config.augment,
               config.optimizer, config.rho)
        assert got == row, name
        assert (config.batch_size, config.momentum, config.schedule, config.max_grad_norm) == (256, 0.9, "cosine", 5.0)
        assert config.recipe == name and config.label_smoothing == 0.0 and config.micro_batches == 1


def test_explicit_options_override_the_recipe():
    config = build_config("cifar100-wrn28-10-sam", {"epochs": 3, "rho": 0.2, "lr": None, "seed": 4}).resolved()
    assert (config.epochs, config.rho, config.lr, config.seed) == (3, 0.2, 0.1, 4)  # lr None: not given
    assert overridden(config) == {"epochs": (200, 3), "rho": (0.1, 0.2)}
    # another optimizer drops the recipe's rho: the method's own default applies, or an explicit --rho
    assert build_config("cifar10-wrn28-10-sam", {"optimizer": "sgd"}).resolved().rho is None
    assert build_config("cifar10-wrn28-10-sam", {"optimizer": "asam"}).resolved().rho == 0.5
    assert build_config("cifar10-wrn28-10-sgd", {"optimizer": "sam", "rho": 0.02}).resolved().rho == 0.02
    assert build_config(None, {"data": "synthetic"}).recipe is None
    with pytest.raises(ValueError, match=r"unknown recipe 'cifar10-resnet18-sam'; `samkit train --list-recipes`"):
        build_config("cifar10-resnet18-sam", {})


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """5 CIFAR-10 and 4 CIFAR-100 training images: with batch 4, one step per epoch."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, per_batch=1, n_test=2)
    write_cifar100(root, n_train=4, n_test=2)
    return root


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_trains_one_step(tiny_cifar, tmp_path, name):
    recipe = RECIPES[name].fields
    given = {"epochs": 1, "batch_size": 4, "model": SMALL_MODEL[recipe["model"]], "data_dir": str(tiny_cifar)}
    summary = train(build_config(name, given), tmp_path / "run", device="cpu", quiet=True, plot=False)
    assert summary["epochs_completed"] == 1 and summary["cost"]["steps"] == 1
    assert summary["cost"]["passes"] == (2 if recipe["optimizer"] == "sam" else 1)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["recipe"] == name
    for key, value in recipe.items():  # the recipe's values, except the four given
        assert saved[key] == given.get(key, value), key


def test_cli_recipe_with_overrides_records_both(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--recipe", "cifar10-wrn28-10-cutout-sam", "--epochs", "1", "--model", "wrn-10-1",
            "--batch-size", "4", "--data-dir", str(tiny_cifar), "--device", "cpu", "--out", str(out)]
    assert main(args) in (0, 1)  # 1: finished but flagged (1 step on 5 random images)
    printed = capsys.readouterr().out
    assert "recipe cifar10-wrn28-10-cutout-sam; overridden: " in printed
    assert "epochs 200 -> 1" in printed and "model 'wrn-28-10' -> 'wrn-10-1'" in printed
    saved = json.loads((out / "config.json").read_text())
    assert saved["recipe"] == "cifar10-wrn28-10-cutout-sam" and saved["augment"] == "cutout"
    assert (saved["rho"], saved["lr"], saved["weight_decay"], saved["epochs"]) == (0.05, 0.1, 0.0005, 1)
    assert main([*args, "--resume"]) in (0, 1)  # the same command resumes: the same config


def test_list_recipes_and_help_name_every_recipe(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--list-recipes"])  # no --out needed
    assert stopped.value.code == 0
    listed = capsys.readouterr().out
    assert listed == recipes_table() + "\n"
    assert all(f"\n{name} " in listed for name in RECIPES)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    helped = capsys.readouterr().out
    assert "--recipe NAME" in helped and all(name in helped for name in RECIPES)
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--recipe", "cifar10", "--out", "x"])
    assert stopped.value.code == 2
    assert "unknown recipe 'cifar10'" in capsys.readouterr().err


def test_missing_cifar_is_a_clear_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SAMKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code = main(["train", "--recipe", "cifar100-pyramidnet272-sgd", "--data-dir", str(tmp_path / "none"),
                 "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "CIFAR-100 not found" in err and "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in err
