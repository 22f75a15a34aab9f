"""SGD vs SAM on scikit-learn's bundled `digits` (1797 8x8 images, offline), in well under a minute.

    python examples/quickstart.py

Both optimizers train the same small MLP from the same seeds for the same number of steps; SAM pays for
each step with a second forward-backward pass (its price: about twice the compute).
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits

from samkit import SAM, sam_step


def digits(seed: int):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    mean, std = x[:split].mean(0), x[:split].std(0) + 1e-6
    x = (x - mean) / std
    return (x[:split], y[:split]), (x[split:], y[split:])


def train(optimizer_name: str, seed: int, epochs: int, rho: float):
    (x_train, y_train), (x_test, y_test) = digits(seed=0)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    loss_fn = torch.nn.functional.cross_entropy
    options = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    if optimizer_name == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, **options)
    else:
        opt = torch.optim.SGD(model.parameters(), **options)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), generator=order).split(64):
            if optimizer_name == "sam":
                sam_step(opt, model, loss_fn, x_train[idx], y_train[idx])
            else:
                opt.zero_grad()
                loss_fn(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description="SGD vs SAM on digits")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rho", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # the first optimizer imports torch._dynamo
    # (about a second): done here, so that the one-off cost is not billed to whichever optimizer is timed first
    for name in ("sgd", "sam"):
        start = time.perf_counter()
        accuracies = [train(name, seed, args.epochs, args.rho) for seed in range(args.seeds)]
        mean = sum(accuracies) / len(accuracies)
        runs = ", ".join(f"{a:.4f}" for a in accuracies)
        print(f"{name.upper():>4}: test accuracy {mean:.4f} (seeds: {runs})  [{time.perf_counter() - start:.1f} s]")


if __name__ == "__main__":
    main()
