"""Fine-tuning with SGD vs SAM, at toy scale: pretrain on Fashion-MNIST classes 0-4, fine-tune on classes 5-9.

The SAM paper (Foret et al. 2021, Table 3) fine-tunes ImageNet-pretrained EfficientNets on smaller datasets and
finds SAM's fine-tuning lowers the error on most of them. Here:

    pretrain  one MLP (784-256-256, head of 5) on ALL training images of classes 0-4 (30,000), SGD, seed 0
    fine-tune a NEW head of 5 for classes 5-9 on N of their training images (default 500), the whole body
              trained too, with SGD or with SAM (same lr, schedule, epochs); seeds 0..S-1 vary the head's
              initialisation and the data order (the N images are the same for every seed)
    select    SAM's rho from --rhos by the mean error over seeds on 1,000 OTHER training images of classes 5-9
              (a validation set disjoint from the N)
    test      the 5,000 test images of classes 5-9

Prints and writes (OUT/fine_tuning.md, OUT/fine_tuning.json) the test error per method, mean ± 95 % interval
over seeds, and the per-seed Δ = SAM − SGD with its interval (paired by seed), for the selected rho and for
every rho of the grid (those rows are for reading, not for choosing).

    python examples/fine_tuning.py --out experiments/fine-tuning --seeds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkit import SAM
from samkit.data import load_dataset
from samkit.models import build_model
from samkit.step import sam_step


def classes(x: Tensor, y: Tensor, wanted: range) -> tuple[Tensor, Tensor]:
    """The examples whose label is in ``wanted``, relabelled 0..len(wanted)-1."""
    keep = (y >= wanted.start) & (y < wanted.stop)
    return x[keep], y[keep] - wanted.start


def cosine_lr(optimizer: torch.optim.Optimizer, lr: float, step: int, steps: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))


def fit(model: nn.Module, x: Tensor, y: Tensor, *, optimizer: str, lr: float, rho: float, epochs: int,
        batch_size: int, seed: int) -> None:
    """Train ``model`` in place: SGD (momentum 0.9, wd 5e-4) or SAM around it, cosine lr, seeded order."""
    if optimizer == "sam":
        opt: torch.optim.Optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, momentum=0.9,
                                         weight_decay=5e-4)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = x.shape[0] // batch_size
    steps, step = epochs * per_epoch, 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for b in range(per_epoch):
            index = order[b * batch_size : (b + 1) * batch_size]
            cosine_lr(opt, lr, step, steps)
            if optimizer == "sam":
                sam_step(opt, model, F.cross_entropy, x[index], y[index])
            else:
                opt.zero_grad()
                F.cross_entropy(model(x[index]), y[index]).backward()
                opt.step()
            step += 1


@torch.no_grad()
def error(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) != y).double().mean())


def interval(values: np.ndarray) -> tuple[float, float]:
    """mean ± half-width of the 95 % t interval (normal quantile for n > 30)."""
    from scipy import stats

    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--examples", type=int, default=500, help="fine-tuning images of classes 5-9")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--rhos", default="0.02,0.05,0.1,0.2", help="SAM radii to choose from on validation")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error(f"--seeds must be at least 2 for an interval, got {args.seeds}")
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist")
    x_pre, y_pre = classes(data.x_train, data.y_train, range(0, 5))
    x_ft, y_ft = classes(data.x_train, data.y_train, range(5, 10))
    x_test, y_test = classes(data.x_test, data.y_test, range(5, 10))
    rhos = [float(r) for r in args.rhos.split(",")]
    pick = torch.randperm(x_ft.shape[0], generator=torch.Generator().manual_seed(1234))
    x_val, y_val = x_ft[pick[args.examples : args.examples + 1000]], y_ft[pick[args.examples : args.examples + 1000]]
    x_ft, y_ft = x_ft[pick[: args.examples]], y_ft[pick[: args.examples]]

    torch.manual_seed(0)
    pretrained = build_model("mlp", in_channels=1, num_classes=5, image_size=28)
    fit(pretrained, x_pre, y_pre, optimizer="sgd", lr=0.05, rho=0.0, epochs=args.pretrain_epochs,
        batch_size=128, seed=0)
    pre_test = error(pretrained, *classes(data.x_test, data.y_test, range(0, 5)))
    print(f"pretrained on classes 0-4: test error {100 * pre_test:.2f} %")

    methods = [("sgd", 0.0)] + [("sam", rho) for rho in rhos]
    test = {f"{m}:{r}": [] for m, r in methods}
    val = {f"{m}:{r}": [] for m, r in methods}
    for seed in range(args.seeds):
        for method, rho in methods:
            model = copy.deepcopy(pretrained)
            torch.manual_seed(seed)
            model.net[-1] = nn.Linear(model.net[-1].in_features, 5)
            fit(model, x_ft, y_ft, optimizer=method, lr=args.lr, rho=rho, epochs=args.epochs,
                batch_size=64, seed=seed)
            key = f"{method}:{rho}"
            test[key].append(error(model, x_test, y_test))
            val[key].append(error(model, x_val, y_val))
            print(f"seed {seed} {key}: val error {100 * val[key][-1]:.2f} %, test error {100 * test[key][-1]:.2f} %",
                  flush=True)
    chosen = min(rhos, key=lambda rho: np.mean(val[f"sam:{rho}"]))
    sgd = 100 * np.array(test["sgd:0.0"])
    lines = [f"Fine-tuning on {args.examples} images of Fashion-MNIST classes 5-9 (pretrained on classes 0-4), "
             f"{args.seeds} seeds, {args.epochs} epochs, lr {args.lr}; SAM's rho chosen on validation from {rhos}: "
             f"{chosen}", "",
             "| method | val error (%) | test error (%) | Δ test vs SGD (pp), paired |", "|---|---|---|---|"]
    for method, rho in methods:
        key = f"{method}:{rho}"
        errors = 100 * np.array(test[key])
        v_mean, v_half = interval(100 * np.array(val[key]))
        t_mean, t_half = interval(errors)
        name = "SGD" if method == "sgd" else f"SAM rho={rho}" + (" (chosen)" if rho == chosen else "")
        delta = "—" if method == "sgd" else "{:+.2f} ± {:.2f}".format(*interval(errors - sgd))
        lines.append(f"| {name} | {v_mean:.2f} ± {v_half:.2f} | {t_mean:.2f} ± {t_half:.2f} | {delta} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fine_tuning.md").write_text("\n".join(lines) + "\n")
    (args.out / "fine_tuning.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                            "chosen_rho": chosen, "test_error": test,
                                                            "val_error": val}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
