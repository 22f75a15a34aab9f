"""What the Lightning tests share: a tiny float64 classifier as a SAMLightningModule, its data, a quiet Trainer,
and the reference: the same steps written with ``samkit.sam_step`` on the concatenated batches of each window."""

from __future__ import annotations

from typing import Callable, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from samkit import SAM, sam_step
from samkit.integrations.lightning import SAMLightningModule

N, BATCH = 48, 8  # 6 batches an epoch


def data(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 4, generator=g, dtype=dtype), torch.randint(0, 3, (N,), generator=g)


def loader(dtype=torch.float64, batch_size: int = BATCH) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data(dtype)), batch_size=batch_size)


def net(batch_norm: bool = False, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 8)] + ([torch.nn.BatchNorm1d(8)] if batch_norm else []) + [torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(8, 3)).to(dtype)


def sgd_sam(params, cls=SAM, **options):
    """The optimizer every test uses unless it says otherwise: SAM-family around SGD with momentum."""
    return cls(params, torch.optim.SGD, **{"rho": 0.1, "lr": 0.1, "momentum": 0.9, **options})


def step_lr(optimizer):
    return {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5), "interval": "step"}


class Classifier(SAMLightningModule):
    """``make_optimizer(params)`` builds the optimizer; ``make_scheduler(optimizer)``, if given, a scheduler config."""

    def __init__(
        self,
        make_optimizer: Callable = sgd_sam,
        make_scheduler: Optional[Callable] = None,
        batch_norm: bool = False,
        dtype=torch.float64,
        **options,
    ):
        super().__init__(**options)
        self.net = net(batch_norm, dtype)
        self.make_optimizer, self.make_scheduler = make_optimizer, make_scheduler
        self.clean_passes = 0
        self.step_losses = []  # what training_step returned on each optimizer step

    def training_loss(self, batch):
        x, y = batch
        self.clean_passes += int(not self.sam_optimizer.perturbed)
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if loss is not None:
            self.step_losses.append(loss)
        return loss

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.parameters())
        if self.make_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.make_scheduler(optimizer)}


def trainer(**options) -> pl.Trainer:
    quiet = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return pl.Trainer(**{**quiet, **options})


def fit(module: pl.LightningModule, train_loader=None, ckpt_path=None, **options) -> pl.Trainer:
    t = trainer(**options)
    t.fit(module, train_loader if train_loader is not None else loader(), ckpt_path=ckpt_path)
    return t


def reference(
    steps: int,
    k: int = 1,
    *,
    make_optimizer: Callable = sgd_sam,
    make_scheduler: Optional[Callable] = None,
    batch_norm: bool = False,
    dtype=torch.float64,
    losses: Optional[list] = None,
    **step_options,
):
    """``steps`` optimizer steps of ``sam_step`` with ``micro_batches`` = the batches of each window (k, fewer at
    an epoch's end), on the batches the module sees; returns (model, optimizer, scheduler) and appends the losses
    sam_step returned to ``losses``."""
    x, y = data(dtype)
    model = net(batch_norm, dtype)
    optimizer = make_optimizer(model.parameters())
    scheduler = None if make_scheduler is None else make_scheduler(optimizer)["scheduler"]
    batches = N // BATCH
    windows = [(start, min(k, batches - start)) for start in range(0, batches, k)]
    for step in range(steps):
        start, n = windows[step % len(windows)]
        part = slice(start * BATCH, (start + n) * BATCH)
        loss = sam_step(optimizer, model, F.cross_entropy, x[part], y[part], micro_batches=n, **step_options)
        if losses is not None:
            losses.append(loss)
        if scheduler is not None:
            scheduler.step()
    return model, optimizer, scheduler


def flat(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter and floating buffer (BatchNorm statistics), flattened."""
    tensors = [p.detach().flatten() for p in module.parameters()]
    tensors += [b.detach().double().flatten() for b in module.buffers() if b.is_floating_point()]
    return torch.cat([t.double() for t in tensors])
