"""Named recipes: the SAM paper's CIFAR settings (Foret et al., ICLR 2021, arXiv 2010.01412, Table 1 and
appendix C.1, Table 6), runnable as ``samkit train --recipe NAME --out DIR``.

    NAME = {cifar10, cifar100}-{MODEL}[-cutout]-{sam, sgd}

    MODEL              model               epochs  lr    weight decay  rho CIFAR-10  rho CIFAR-100
    wrn28-10           wrn-28-10           200     0.1   5e-4          0.05          0.1
    wrn28-10-1800ep    wrn-28-10           1800    0.05  1e-3          0.05          0.1
    pyramidnet272      pyramidnet-272-200  1800    0.05  5e-4          0.05          0.2

    shared: batch 256 (appendix C.1), SGD momentum 0.9, cosine schedule without warm-up, gradient clipping at
    global norm 5 (the authors' released training code), no label smoothing; augment basic (4-pixel padding,
    random 32x32 crop, horizontal flip) or, with -cutout, basic then a 16x16 cutout square
    (samkit.data.augmentation). lr and weight decay are the same for SAM and SGD (the paper chose them for SGD,
    then tuned rho alone).

What differs from the paper's runs (docs/datasets.md says more): they ran on 8 GPUs, each computing SAM's
perturbation on its own 32 examples (m = 32) and its own BatchNorm statistics, while ``sam`` here perturbs with
the whole batch of 256 (``--optimizer msam --micro-batches 8`` gives m = 32); their momentum was Nesterov's;
PyramidNet's epoch count is not stated in the paper (1800 is the authors' code's setting for their PyramidNet);
the AutoAugment rows and ShakeDrop/Shake-Shake models are not offered.

A recipe only sets defaults: every option given explicitly wins, and config.json records the recipe's name
with the resolved options. When ``--optimizer`` names another method than the recipe's, the recipe's rho is
dropped (that method's own default applies unless --rho is given).
"""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from samkit.experiments.config import TrainConfig

PAPER = "Foret et al. 2021 (arXiv 2010.01412), Table 1 and appendix Table 6"
SHARED: dict[str, Any] = {
    "batch_size": 256,
    "momentum": 0.9,
    "schedule": "cosine",
    "max_grad_norm": 5.0,
    "label_smoothing": 0.0,
}
# model name in the recipe -> (samkit model, epochs, lr, weight decay, {data: rho})
MODELS: dict[str, tuple[str, int, float, float, dict[str, float]]] = {
    "wrn28-10": ("wrn-28-10", 200, 0.1, 5e-4, {"cifar10": 0.05, "cifar100": 0.1}),
    "wrn28-10-1800ep": ("wrn-28-10", 1800, 0.05, 1e-3, {"cifar10": 0.05, "cifar100": 0.1}),
    "pyramidnet272": ("pyramidnet-272-200", 1800, 0.05, 5e-4, {"cifar10": 0.05, "cifar100": 0.2}),
}
AUGMENTS = {"": "basic", "-cutout": "cutout"}
OPTIMIZERS = ("sam", "sgd")


@dataclass(frozen=True)
class Recipe:
    """A name and the TrainConfig fields it sets."""

    name: str
    fields: Mapping[str, Any]

    @property
    def summary(self) -> str:
        f = self.fields
        rho = f" rho {f['rho']:g}" if "rho" in f else ""
        return (f"{f['data']} {f['model']} {f['augment']} {f['optimizer']}{rho}: {f['epochs']} epochs, lr {f['lr']:g}, "
                f"wd {f['weight_decay']:g}, batch {f['batch_size']}, momentum {f['momentum']:g}, {f['schedule']}, "
                f"clip {f['max_grad_norm']:g}")


def _table() -> dict[str, Recipe]:
    recipes = {}
    for data in ("cifar10", "cifar100"):
        for key, (model, epochs, lr, weight_decay, rhos) in MODELS.items():
            for suffix, augment in AUGMENTS.items():
                for optimizer in OPTIMIZERS:
                    fields = dict(SHARED, data=data, model=model, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                  augment=augment, optimizer=optimizer)
                    if optimizer == "sam":
                        fields["rho"] = rhos[data]
                    name = f"{data}-{key}{suffix}-{optimizer}"
                    recipes[name] = Recipe(name, fields)
    return recipes


RECIPES: dict[str, Recipe] = _table()


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; `samkit train --list-recipes` lists them ({len(RECIPES)} of the "
                         f"form {{cifar10,cifar100}}-{{{','.join(MODELS)}}}[-cutout]-{{sam,sgd}})")
    return RECIPES[name]


def build_config(recipe: Optional[str], given: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig of ``recipe`` (None: no recipe) with every field of ``given`` on top.

    ``given`` holds only the options given explicitly (no None values: None means "not given"). The recipe's rho
    is dropped when ``given`` names another optimizer than the recipe's. The config is not resolved here.
    """
    explicit = {key: value for key, value in given.items() if value is not None}
    if recipe is None:
        return TrainConfig(**explicit)
    fields = dict(get_recipe(recipe).fields)
    if explicit.get("optimizer", fields["optimizer"]) != fields["optimizer"]:
        fields.pop("rho", None)
    fields.update(explicit)
    return TrainConfig(**fields, recipe=recipe)


def overridden(config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (recipe's value, config's value)} where ``config`` departs from its recipe ({} without one)."""
    if config.recipe is None:
        return {}
    fields = get_recipe(config.recipe).fields
    return {key: (value, getattr(config, key)) for key, value in fields.items() if getattr(config, key) != value}


def recipes_table() -> str:
    """One line per recipe (``samkit train --list-recipes``)."""
    width = max(len(name) for name in RECIPES)
    lines = [f"{name:<{width}}  {recipe.summary}" for name, recipe in RECIPES.items()]
    return "\n".join([f"recipes ({PAPER}); options given explicitly override them:", *lines])


def recipe_banner(config: TrainConfig) -> str:
    """What ``samkit train --recipe`` prints first: the recipe and what the command line changed in it."""
    changes = overridden(config)
    text = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()) or "nothing"
    return f"recipe {config.recipe}; overridden: {text}"


def recipes_epilog() -> str:
    """The recipe names for ``samkit train --help``."""
    names = textwrap.fill(", ".join(RECIPES), width=110, initial_indent="  ", subsequent_indent="  ",
                          break_on_hyphens=False, break_long_words=False)
    return f"recipes (--recipe NAME; --list-recipes prints each one's settings; {PAPER}):\n{names}"


class _ListRecipes(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(recipes_table())
        parser.exit()


def _recipe_name(text: str) -> str:
    try:
        return get_recipe(text).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """--recipe NAME and --list-recipes (which prints the table and exits, without needing --out)."""
    parser.add_argument("--recipe", type=_recipe_name, metavar="NAME",
                        help="start from a named recipe (listed below); explicit options override it")
    parser.add_argument("--list-recipes", action=_ListRecipes, help="print every recipe's settings and exit")
