"""What the transformers tests share: a tiny BERT classifier and a plain module that returns its loss (float64),
their data as dict datasets, quiet TrainingArguments, and the reference: the same steps written with
``samkit.sam_step`` on the concatenated batches of each window (the Trainer runs batches in order here)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments, get_scheduler
from transformers.utils import logging

from samkit import SAM, sam_step
from samkit.integrations.transformers import SAMTrainer

logging.set_verbosity_error()

N, BATCH, VOCAB, LENGTH, CLASSES = 24, 4, 30, 5, 3  # 6 batches an epoch


def features(kind: str, dtype=torch.float64):
    """(inputs, labels): token ids for "bert", 4 features for "net"."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (N, LENGTH), generator=g) if kind == "bert" else torch.randn(N, 4, generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return (x if kind == "bert" else x.to(dtype)), y


class Examples(torch.utils.data.Dataset):
    def __init__(self, kind: str, dtype=torch.float64, labels: Optional[torch.Tensor] = None):
        self.name = "input_ids" if kind == "bert" else "x"
        self.x, self.y = features(kind, dtype)
        if labels is not None:
            self.y = labels

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {self.name: self.x[i], "labels": self.y[i]}


class Net(torch.nn.Module):
    """A plain module that returns its loss, as a Trainer needs: ``forward(x, labels) -> {"loss": ...}``. Counts its
    forward passes; ``body`` maps features to logits (what sam_step drives in the reference)."""

    def __init__(self, batch_norm: bool = False, dropout: float = 0.0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        layers = [torch.nn.Linear(4, 8)] + ([torch.nn.BatchNorm1d(8)] if batch_norm else []) + [torch.nn.Tanh()]
        layers += [torch.nn.Dropout(dropout)] if dropout else []
        self.body = torch.nn.Sequential(*layers, torch.nn.Linear(8, CLASSES)).to(dtype)
        self.forwards = 0

    def forward(self, x, labels):
        self.forwards += 1
        return {"loss": F.cross_entropy(self.body(x), labels)}


class BertLogits(torch.nn.Module):
    """A BERT classifier seen as inputs -> logits, for sam_step."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def bert(dropout: float = 0.0, dtype=torch.float64):
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        num_labels=CLASSES,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config).to(dtype)


def model(kind: str, **options):
    return bert(**options) if kind == "bert" else Net(**options)


def sgd_sam(net, cls=SAM, **options):
    """The optimizer the tests use unless they say otherwise: SAM-family around SGD with momentum, over ``net``."""
    return cls(net.parameters(), torch.optim.SGD, **{"rho": 0.1, "lr": 0.1, "momentum": 0.9, **options})


def arguments(tmp_path, **options) -> TrainingArguments:
    quiet = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
    )
    return TrainingArguments(**{**quiet, **options})


def train(
    kind: str,
    tmp_path,
    make: Optional[Callable] = sgd_sam,
    *,
    net=None,
    trainer_class=SAMTrainer,
    trainer_options: Optional[dict] = None,
    resume=None,
    dataset=None,
    dtype=torch.float64,
    **options,
):
    """Train with SAMTrainer; ``make(net)`` builds the optimizer passed in (None: built from the arguments)."""
    net = model(kind, dtype=dtype) if net is None else net
    optimizers = (None, None) if make is None else (make(net), None)
    trainer = trainer_class(
        model=net,
        args=arguments(tmp_path, **options),
        train_dataset=Examples(kind, dtype) if dataset is None else dataset,
        optimizers=optimizers,
        **(trainer_options or {}),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def reference(
    kind: str,
    steps: int,
    k: int = 1,
    *,
    make: Callable = sgd_sam,
    net=None,
    schedule: str = "constant",
    total_steps: Optional[int] = None,
    losses: Optional[list] = None,
    batch: int = BATCH,
    dtype=torch.float64,
    **step_options,
):
    """``steps`` optimizer steps of ``sam_step`` with ``micro_batches`` = the batches of each window (k, fewer at an
    epoch's end) on the batches the Trainer sees, with the Trainer's scheduler; returns (model, optimizer)."""
    x, y = features(kind, dtype)
    net = model(kind, dtype=dtype) if net is None else net
    optimizer = make(net)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=0, num_training_steps=total_steps or steps)
    driven = BertLogits(net) if kind == "bert" else net.body
    batches = N // batch
    windows = [(start, min(k, batches - start)) for start in range(0, batches, k)]
    for step in range(steps):
        start, n = windows[step % len(windows)]
        part = slice(start * batch, (start + n) * batch)
        loss = sam_step(optimizer, driven, F.cross_entropy, x[part], y[part], micro_batches=n, **step_options)
        scheduler.step()
        if losses is not None:
            losses.append(loss)
    optimizer.eval()  # Momentum-SAM: the weights at w, where SAMTrainer leaves them between steps
    return net, optimizer


def flat(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter and floating buffer (BatchNorm statistics), flattened."""
    tensors = [p.detach().flatten() for p in module.parameters()]
    tensors += [b.detach().double().flatten() for b in module.buffers() if b.is_floating_point()]
    return torch.cat([t.double() for t in tensors])
