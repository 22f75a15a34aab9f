"""SAF: a one-pass loss whose trajectory term pulls each example's outputs toward its outputs of `delay` epochs ago.

One training step at epoch e (counted from 0) on examples i ∈ B with logits z_i = f_θ(x_i)::

    r_i  = the logits recorded for example i at epoch e - delay          (read before this step writes)
    loss = L_B(θ)                                                        e < start_epoch or e >= end_epoch
    loss = L_B(θ) + lam tau² (1/|B|) Σ_i KL(softmax(r_i/tau) || softmax(z_i/tau))          otherwise
    record z_i (detached) as example i's logits of epoch e               every step, also before start_epoch

No extra forward or backward: the reference is a memory of past outputs, indexed by each example's position in
the training set (the data must carry it, see ``IndexedDataset``).

Paper: Jiawei Du, Daquan Zhou, Jiashi Feng, Vincent Y. F. Tan, Joey Tianyi Zhou, "Sharpness-Aware Training for
Free", NeurIPS 2022, arXiv 2205.14083 (SAF; MESA, ``samkit.losses.mesa``, is the EMA variant). Source followed:
the authors' code, AngusDujw/SAF ``SAF_train.py``, ``train_one_epoch``: the loader yields ``(indices, input,
target)``; every step writes ``output.detach()`` to ``train_logits[indices, epoch % (minus_epoch + 1)]`` (a
float32 array N x (Ẽ + 1) x C) and, while ``kl_start_epoch < epoch < kl_end_epoch``, reads
``train_logits[indices, (epoch - minus_epoch) % (minus_epoch + 1)]`` as the reference of
``kl_div(log softmax(z/T), softmax(r/T)).sum(-1).mean() * T**2 * reinforce`` (the recorded distribution is the
KL's first argument; the tau² factor is theirs). Defaults: lam = 0.3 (the README's value for SAF and run.sh's
ImageNet command; the script's argparse default is 0.16), tau = 5 (``--temperature``), delay = 3
(``--minus_epoch``; the README gives 2 or 3), start_epoch = 6 (see below), end_epoch = None (their
``--kl_end_epoch`` equals the number of epochs trained).

Choices where this differs from that code, and why:

- ``start_epoch`` is the first epoch with the term (``epoch >= start_epoch``). Their test is
  ``epoch > kl_start_epoch`` with ``--kl_start_epoch 5``, so the term starts at epoch 6 (0-based): the default.
- Memory: ``delay`` snapshots, not ``delay + 1``. Slot ``e % delay`` holds epoch e - delay's logits until this
  step reads them, then takes epoch e's: the same references in a third less memory (delay 2), a quarter
  less (delay 3). Memory in bytes: num_examples · delay · num_classes · (4 for float32) for the logits, plus
  num_examples · delay · 4 for the epoch each slot was written at (``memory_bytes``); CIFAR-10 (50 000 x 10,
  delay 3): 6.6 MB; ImageNet (1 281 167 x 1000, delay 3): 15.4 GB (``dtype=torch.bfloat16`` halves it,
  ``device="cpu"`` keeps it off the accelerator).
- Those epoch stamps: an example whose logits of exactly epoch e - delay are not in the memory (not drawn that
  epoch, e.g. a loader with ``drop_last``; or drawn twice this epoch) gets no term, and the batch mean still
  divides by |B|. Their code reads whatever the slot holds then: older logits, or zeros (a uniform reference).
- log_softmax in place of log(softmax(.)): the same value without underflow to -inf.

Under DDP each replica records only the examples it sees; with a sampler that reshuffles across replicas, gather
the logits and indices of all replicas and record those (``record=False`` in the call, then ``record(...)``).
A paper form without the tau² factor is this loss with lam / tau².
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from samkit.losses.kl import check_epoch, check_epochs, check_number, check_saved, trajectory_kl

NEVER = -1  # the epoch stamp of a slot that was never written


class SAFLoss:
    """The training loss plus lam · tau² · KL(softmax(logits of `delay` epochs ago / tau) || softmax(logits / tau)).

    Args:
        base_loss: ``base_loss(outputs, targets)`` -> the scalar training loss (e.g. cross-entropy).
        num_examples: N, the size of the training set (indices run over 0 .. N - 1).
        num_classes: C, the number of logits per example.
        lam: the term's coefficient λ, >= 0 (authors' README for SAF: 0.3).
        tau: the temperature, > 0 (authors: 5).
        start_epoch: the first epoch (counted from 0) with the term, >= delay (authors: 6, their ``epoch > 5``).
        delay: Ẽ, how many epochs old the reference logits are, >= 1 (authors: 3).
        end_epoch: the first epoch without the term again, or None for never (authors: their last epoch + 1).
        dtype: the memory's dtype (float32, as the authors; bfloat16 / float16 halve it).
        device: where the memory lives; None: on the device of the first outputs seen.

    Per step: ``loss = saf(model(x), y, indices, epoch=e)``; ``loss.backward()``; ``optimizer.step()``.
    ``saf.bind(indices, epoch=e)`` is the same loss as a ``loss_fn(outputs, targets)``.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> saf = SAFLoss(torch.nn.functional.cross_entropy, num_examples=8, num_classes=2, delay=1, start_epoch=1)
        >>> x, y, indices = torch.randn(8, 3), torch.randint(0, 2, (8,)), torch.arange(8)
        >>> first = saf(model(x), y, indices, epoch=0)  # the base loss; records the logits
        >>> second = saf(model(x), y, indices, epoch=1)  # + the term against epoch 0's logits (equal here: 0)
        >>> bool(torch.isclose(first, second)), saf.memory_bytes
        (True, 96)
    """

    def __init__(
        self,
        base_loss: Callable[[Tensor, Tensor], Tensor],
        *,
        num_examples: int,
        num_classes: int,
        lam: float = 0.3,
        tau: float = 5.0,
        start_epoch: int = 6,
        delay: int = 3,
        end_epoch: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        if not callable(base_loss):
            raise ValueError(f"base_loss must be a callable base_loss(outputs, targets), got {base_loss!r}")
        for name, value, what in (
            ("num_examples", num_examples, "the training set's size"),
            ("num_classes", num_classes, "the number of logits per example"),
            ("delay", delay, "how many epochs old the reference logits are; the authors use 3"),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 ({what}), got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(
                f"dtype must be a floating torch.dtype for the logit memory (e.g. torch.float32), got {dtype!r}"
            )
        self.lam = check_number("lam", lam, "a number >= 0 (the trajectory term's weight; the authors use 0.3)")
        self.tau = check_number("tau", tau, "a number > 0 (the temperature; the authors use 5)", positive=True)
        check_epochs(
            start_epoch, end_epoch, minimum=delay, why=f"; logits from delay={delay} epochs earlier must exist by then"
        )
        self.base_loss = base_loss
        self.num_examples = num_examples
        self.num_classes = num_classes
        self.start_epoch = start_epoch
        self.delay = delay
        self.end_epoch = end_epoch
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self._logits: Optional[Tensor] = None  # (N, delay, C); slot e % delay: epoch e - delay's, then epoch e's
        self._epochs: Optional[Tensor] = None  # (N, delay) int32: the epoch each slot was written at

    @property
    def memory_bytes(self) -> int:
        """Bytes of the memory: the logits N · delay · C · itemsize plus the epoch stamps N · delay · 4."""
        slots = self.num_examples * self.delay
        return slots * self.num_classes * torch.empty((), dtype=self.dtype).element_size() + slots * 4

    def active(self, epoch: int) -> bool:
        """Whether the trajectory term is part of the loss at this epoch (and lam > 0)."""
        epoch = check_epoch(epoch)
        in_window = epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)
        return in_window and self.lam > 0.0

    def __call__(self, outputs: Tensor, targets: Tensor, indices: Any, *, epoch: int, record: bool = True) -> Tensor:
        """The loss of one step: ``base_loss(outputs, targets)`` itself where the term is off, else that plus lam
        times the term; then (``record``) this step's logits are stored as the examples' logits of ``epoch``."""
        indices = self._check(outputs, indices)
        loss = self.base_loss(outputs, targets)
        if self.active(epoch):
            loss = loss + self.lam * self._trajectory(outputs, indices, epoch)
        if record:
            self._record(indices, outputs, epoch)
        return loss

    def trajectory(self, outputs: Tensor, indices: Any, *, epoch: int) -> Tensor:
        """tau² · (1/|B|) Σ_i KL(softmax(r_i/tau) || softmax(outputs_i/tau)) over the examples with a reference
        r_i from epoch - delay (the others contribute zero), without lam; records nothing."""
        return self._trajectory(outputs, self._check(outputs, indices), check_epoch(epoch))

    def reference(self, indices: Any, *, epoch: int) -> tuple[Tensor, Tensor]:
        """(the logits recorded for these examples at epoch - delay, whether each was recorded then), on the
        memory's device. This epoch's ``record`` of the same examples overwrites them: read first."""
        indices, epoch = self._check_indices(indices, None), check_epoch(epoch)
        if self._logits is None:
            empty = torch.zeros((len(indices), self.num_classes), dtype=self.dtype, device=indices.device)
            return empty, torch.zeros(len(indices), dtype=torch.bool, device=indices.device)
        return self._reference(indices, epoch)

    def record(self, indices: Any, logits: Tensor, *, epoch: int) -> None:
        """Store ``logits`` (detached, in the memory's dtype) as these examples' logits of ``epoch``."""
        self._record(self._check(logits, indices), logits, check_epoch(epoch))

    def _trajectory(self, outputs: Tensor, indices: Tensor, epoch: int) -> Tensor:
        self._allocate(self.device or outputs.device)
        reference, valid = self._reference(indices, epoch)
        return trajectory_kl(outputs, reference.to(outputs.device), self.tau, valid.to(outputs.device))

    def _reference(self, indices: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        where, slot = indices.to(self._logits.device), epoch % self.delay
        return self._logits[where, slot], self._epochs[where, slot] == epoch - self.delay

    def _record(self, indices: Tensor, logits: Tensor, epoch: int) -> None:
        self._allocate(self.device or logits.device)
        where, slot = indices.to(self._logits.device), epoch % self.delay
        self._logits[where, slot] = logits.detach().to(device=self._logits.device, dtype=self.dtype)
        self._epochs[where, slot] = epoch

    def bind(self, indices: Any, *, epoch: int) -> Callable[[Tensor, Tensor], Tensor]:
        """This step's loss as ``loss_fn(outputs, targets)``, for a step function that calls
        ``loss_fn(model(inputs), targets)`` once (a plain one-pass step)."""
        return lambda outputs, targets: self(outputs, targets, indices, epoch=epoch)

    # ----------------------------------------------------------------------------------------------------------

    def _check(self, outputs: Tensor, indices: Any) -> Tensor:
        if not isinstance(outputs, Tensor) or outputs.dim() != 2 or outputs.shape[1] != self.num_classes:
            shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
            raise ValueError(
                f"outputs must be logits of shape (batch, num_classes={self.num_classes}), got {shape}: pass the "
                "model's outputs, or build SAFLoss with the right num_classes"
            )
        return self._check_indices(indices, outputs.shape[0])

    def _check_indices(self, indices: Any, batch: Optional[int]) -> Tensor:
        if indices is None:
            raise ValueError(
                "SAFLoss needs each example's index in the training set (indices=None): have the data yield "
                "(index, input, target), e.g. DataLoader(IndexedDataset(dataset)), and pass the indices of the batch"
            )
        if not isinstance(indices, Tensor):
            indices = torch.as_tensor(indices)
        if indices.dtype in (torch.bool, torch.uint8) or indices.is_floating_point() or indices.is_complex():
            raise ValueError(
                f"indices must be integers (positions in the training set), got dtype {indices.dtype}: pass the "
                "indices themselves, e.g. torch.long"
            )
        if indices.dim() != 1 or (batch is not None and indices.shape[0] != batch):
            raise ValueError(
                f"indices must be one index per example of the batch, shape ({batch if batch is not None else 'B'},), "
                f"got shape {tuple(indices.shape)}: pass the batch's indices, in the order of its outputs"
            )
        if indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.num_examples:
                bad = low if low < 0 else high
                raise ValueError(
                    f"indices must lie in [0, num_examples={self.num_examples}), got {bad}: pass positions in the "
                    "training set, or build SAFLoss with num_examples = the training set's size"
                )
        return indices.long()

    def _allocate(self, device: torch.device) -> None:
        if self._logits is None:
            shape = (self.num_examples, self.delay)
            self._logits = torch.zeros((*shape, self.num_classes), dtype=self.dtype, device=device)
            self._epochs = torch.full(shape, NEVER, dtype=torch.int32, device=device)
        elif self._logits.device != device:
            # a memory loaded onto another device (map_location) follows the outputs, or ``device``
            self._logits, self._epochs = self._logits.to(device), self._epochs.to(device)

    def _options(self) -> dict[str, Any]:
        return {
            "num_examples": self.num_examples,
            "num_classes": self.num_classes,
            "lam": self.lam,
            "tau": self.tau,
            "start_epoch": self.start_epoch,
            "delay": self.delay,
            "end_epoch": self.end_epoch,
            "dtype": str(self.dtype),
        }

    def state_dict(self) -> dict[str, Any]:
        """The memory (sharing storage with it: save it before the next step; None before the first step) and
        the options a resume must agree with."""
        return {
            "class": type(self).__name__,
            "logits": self._logits,
            "epochs": self._epochs,
            "options": self._options(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of ``state_dict()`` saved with the same options (a mismatch raises and names it)."""
        check_saved(self, state_dict)
        logits, epochs = state_dict["logits"], state_dict["epochs"]
        if logits is None:
            self._logits = self._epochs = None
            return
        device = self.device or logits.device
        self._logits = logits.detach().to(device=device, dtype=self.dtype, copy=True)
        self._epochs = epochs.detach().to(device=device, dtype=torch.int32, copy=True)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({options})"


class IndexedDataset(Dataset):
    """A dataset whose items are ``(index, *item)``: the indices ``SAFLoss`` needs, in the authors' order.

    Example::

        >>> import torch
        >>> data = torch.utils.data.TensorDataset(torch.randn(4, 3), torch.arange(4))
        >>> index, x, y = IndexedDataset(data)[2]
        >>> index, int(y)
        (2, 2)
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        return (index, *item) if isinstance(item, (tuple, list)) else (index, item)
