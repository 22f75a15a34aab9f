"""Train an MLP on samkit's `digits` with SGD and with SAM, then measure and picture how flat each minimum is.

Prints, for both: test accuracy, λ1..λ5 of the training-loss Hessian (Lanczos), λ1/λ5, the Hutchinson
trace, m-sharpness (worst and average case), and the HVPs spent; writes the two loss landscapes side by
side on shared scales (2-D: contour + surface; 1-D: curves). The SAM paper (arXiv 2010.01412, Fig. 3)
reports λmax 24.2 (SGD) vs 1.0 (SAM) on a WRN; on this small MLP the gap is smaller but of the same sign.

    python examples/flatness.py                      # ~10 seconds on 2 CPU cores
    python examples/flatness.py --epochs 40 --out flatness_out

Everything is seeded: the same command prints the same numbers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samkit import SAM
from samkit.data import load_dataset
from samkit.sharpness import flatness_report, loss_landscape, plot_landscapes


def digits(seed: int):
    """samkit's `digits` (1437 train / 360 test 8x8 images, normalized), flattened to 64 features."""
    data = load_dataset("digits", seed=seed)
    return (data.x_train.flatten(1), data.y_train), (data.x_test.flatten(1), data.y_test)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train(optimizer_name: str, data, *, epochs: int, seed: int, rho: float) -> nn.Module:
    model = mlp(seed)
    x, y = data
    generator = torch.Generator().manual_seed(seed)
    if optimizer_name == "SAM":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(32):
            xb, yb = x[batch], y[batch]
            F.cross_entropy(model(xb), yb).backward()
            if optimizer_name == "SAM":
                opt.first_step(zero_grad=True)
                F.cross_entropy(model(xb), yb).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.step()
                opt.zero_grad()
    return model


def accuracy(model: nn.Module, data) -> float:
    with torch.no_grad():
        return (model.eval()(data[0]).argmax(1) == data[1]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=31, help="landscape grid points per direction (odd)")
    parser.add_argument("--out", type=Path, default=Path("flatness_out"))
    parser.add_argument("--trace-samples", type=int, default=100, help="Rademacher probes for the trace")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this small MLP)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_data, test_data = digits(args.seed)
    reports, surfaces, curves = {}, {}, {}
    for name in ("SGD", "SAM"):
        start = time.perf_counter()
        model = train(name, train_data, epochs=args.epochs, seed=args.seed, rho=args.rho)
        trained = time.perf_counter() - start
        report = flatness_report(model, F.cross_entropy, train_data, k=5, seed=args.seed, rho=args.rho,
                                 micro_batch_size=32, trace_samples=args.trace_samples)
        report["test_accuracy"] = accuracy(model, test_data)
        surfaces[name] = loss_landscape(model, F.cross_entropy, train_data, dims=2, steps=args.steps, seed=args.seed)
        curves[name] = loss_landscape(model, F.cross_entropy, train_data, dims=1, steps=args.steps, seed=args.seed)
        report["seconds"] = {"train": trained, "measure": time.perf_counter() - start - trained}
        reports[name] = report

    rows = [
        ("train loss", "loss", "{:.4f}"),
        ("test accuracy", "test_accuracy", "{:.3f}"),
        ("λ1 (λmax)", "lambda_max", "{:.3f}"),
        ("λ1/λ5", "lambda_ratio", "{:.2f}"),
        ("trace (Hutchinson)", "trace", "{:.3f}"),
        (f"m-sharpness worst (m=32, ρ={args.rho})", "m_sharpness_worst", "{:.4f}"),
        (f"m-sharpness average (m=32, ρ={args.rho})", "m_sharpness_average", "{:.2e}"),
        ("HVPs spent", "hvps", "{}"),
    ]
    print(f"digits MLP ({reports['SGD']['num_parameters']} parameters), {args.epochs} epochs, seed {args.seed}")
    print(f"{'':42s}{'SGD':>12s}{'SAM':>12s}")
    for label, key, fmt in rows:
        cells = ["n/a" if reports[n][key] is None else fmt.format(reports[n][key]) for n in ("SGD", "SAM")]
        print(f"{label:42s}{cells[0]:>12s}{cells[1]:>12s}")
    for name in ("SGD", "SAM"):
        values = ", ".join(f"{v:.3f}" for v in reports[name]["eigenvalues"])
        seconds = reports[name]["seconds"]
        print(f"{name}: λ1..λ5 = {values}   (train {seconds['train']:.1f} s, measure {seconds['measure']:.1f} s)")
    surface_png = plot_landscapes(surfaces, args.out / "landscape_2d_sgd_vs_sam.png")
    curve_png = plot_landscapes(curves, args.out / "landscape_1d_sgd_vs_sam.png")
    print(f"wrote {surface_png} and {curve_png}")


if __name__ == "__main__":
    main()
