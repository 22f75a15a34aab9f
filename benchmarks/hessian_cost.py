"""hvps_power_over_lanczos: Hessian-vector products to reach λmax, power iteration over Lanczos.

Both methods run through ``samkit.sharpness.hessian_eigenvalues`` with the same stopping test (the relative
residual ||H u − θ u|| ≤ tol·|θ|, tol = 1e-4) and report how many full-data HVPs they spent; HVPs are the
whole cost of either method, so the ratio of counts is the ratio of times. The Hessian is that of samkit's
MLP on the scikit-learn digits (bundled, no download) after a short full-batch SGD run, in float64::

    for seed in seeds:
        model = mlp(seed) trained `train_steps` full-batch SGD steps
        n_power   = hvps(hessian_eigenvalues(model, CE, data, k=1, tol, method="power",   seed=seed))
        n_lanczos = hvps(hessian_eigenvalues(model, CE, data, k=1, tol, method="lanczos", seed=seed))
    ratio = median over seeds of n_power / n_lanczos                       target >= 2

A power iteration that stops at ``max_iter`` without converging makes its ratio a lower bound (reported).
Lanczos gets a smaller ``max_iter``: it keeps every basis vector (max_iter x n floats are allocated up front).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from benchmarks.timing import check_count
from samkit.models import build_model
from samkit.sharpness import hessian_eigenvalues

TOL = 1e-4


def digits(examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``examples`` scikit-learn digits as float64 (N, 1, 8, 8) images on [0, 1], with labels."""
    from sklearn.datasets import load_digits

    check_count("examples", examples, minimum=1)
    bunch = load_digits()
    images = torch.tensor(bunch.images[:examples], dtype=torch.float64).unsqueeze(1) / 16.0
    return images, torch.tensor(bunch.target[:examples], dtype=torch.int64)


def trained_mlp(seed: int, data, *, train_steps: int, lr: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("mlp", in_channels=1, num_classes=10, image_size=8).to(torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    inputs, targets = data
    for _ in range(train_steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model


def hvps_power_over_lanczos(
    *, seeds: int = 5, examples: int = 512, train_steps: int = 100, max_iter: int = 2000, lanczos_max_iter: int = 200
) -> dict:
    """Row ``hvps_power_over_lanczos``: {"value": median ratio of HVP counts, "details": {...}}."""
    check_count("seeds", seeds, minimum=1)
    check_count("max_iter", max_iter, minimum=1)
    check_count("lanczos_max_iter", lanczos_max_iter, minimum=1)
    limits = {"power": max_iter, "lanczos": lanczos_max_iter}  # Lanczos stores one basis vector per HVP
    data = digits(examples)
    runs = []
    for seed in range(seeds):
        model = trained_mlp(seed, data, train_steps=train_steps)
        found = {}
        for method in ("power", "lanczos"):
            values, info = hessian_eigenvalues(
                model, F.cross_entropy, data, k=1, tol=TOL, max_iter=limits[method], method=method, seed=seed, info=True
            )
            found[method] = {"lambda_max": float(values[0]), "hvps": info.hvps, "converged": info.converged}
        found["ratio"] = found["power"]["hvps"] / found["lanczos"]["hvps"]
        found["lambda_max_relative_difference"] = abs(
            found["power"]["lambda_max"] - found["lanczos"]["lambda_max"]
        ) / abs(found["lanczos"]["lambda_max"])
        runs.append(found)
    return {
        "value": statistics.median(run["ratio"] for run in runs),
        "details": {
            "tol": TOL,
            "examples": examples,
            "train_steps": train_steps,
            "max_iter": limits,
            "parameters": sum(p.numel() for p in trained_mlp(0, data, train_steps=0).parameters()),
            "all_converged": all(run[m]["converged"] for run in runs for m in ("power", "lanczos")),
            "runs": runs,
        },
    }
