"""Resume with ``trainer.fit(..., ckpt_path=...)`` is bit-exact: stopping after k optimizer steps and resuming to N
gives the weights (BatchNorm statistics included) of N uninterrupted steps, for SAM and for variants with state."""

from __future__ import annotations

import pytest

pl = pytest.importorskip("pytorch_lightning", reason="the Lightning integration needs samkit[lightning]")

import torch  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.plugins.precision import MixedPrecision  # noqa: E402

from samkit import LookSAM, RandomSAM  # noqa: E402
from samkit.integrations.lightning import PENDING_BATCHES_KEY  # noqa: E402
from tests.integrations.lightning_support import Classifier, data, fit, flat, loader, sgd_sam, step_lr  # noqa: E402


def _looksam(params):
    return sgd_sam(params, LookSAM, k=2)


def _rst(params):
    return sgd_sam(params, RandomSAM, prob=0.5, seed=3)


class ResumableLoader(torch.utils.data.DataLoader):
    """A loader that Lightning can resume inside an epoch (state_dict / load_state_dict): it skips the batches the
    checkpoint says were already fetched. Lightning replays a plain loader from the start of the epoch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fetched, self.skip = 0, 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        self.fetched = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self.fetched += 1
                yield batch

    def state_dict(self):
        return {"fetched": self.fetched}

    def load_state_dict(self, state):
        self.skip = state["fetched"]


def _resumable(dtype=torch.float64):
    return ResumableLoader(torch.utils.data.TensorDataset(*data(dtype)), batch_size=8)


# (optimizer, batches per step, float32 + 16-mixed): a variant's running state, LookSAM's g_v and step count, RST's
# generator, the GradScaler's scale all travel in the checkpoint
CASES = {
    "sam": (sgd_sam, 1, False),
    "looksam-accumulate-2": (_looksam, 2, False),
    "rst-accumulate-3": (_rst, 3, False),
    "sam-16-mixed": (sgd_sam, 2, True),
}


def _module(name):
    make, k, fp16 = CASES[name]
    dtype = torch.float32 if fp16 else torch.float64
    return Classifier(make, step_lr, batch_norm=True, dtype=dtype, accumulate_grad_batches=k), dtype


def _plugins(name):
    if not CASES[name][2]:
        return []
    # a scale that overflows fp16 at first: the first steps are skipped, so the resumed run needs the saved scale
    return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**19))]


@pytest.mark.parametrize("name", CASES)
def test_resume_from_an_end_of_epoch_checkpoint(tmp_path, name):
    """max_epochs: 1 epoch, its per-epoch checkpoint, resume to 3 epochs == 3 epochs straight (any loader)."""
    full, dtype = _module(name)
    straight = fit(full, loader(dtype), max_epochs=3, plugins=_plugins(name))
    part, _ = _module(name)
    every_epoch = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    fit(part, loader(dtype), max_epochs=1, enable_checkpointing=True, callbacks=[every_epoch], plugins=_plugins(name))
    (checkpoint,) = tmp_path.iterdir()
    resumed, _ = _module(name)
    t = fit(resumed, loader(dtype), max_epochs=3, ckpt_path=str(checkpoint), plugins=_plugins(name))
    assert torch.equal(flat(resumed.net), flat(full.net))
    steps = 3 * -(-6 // CASES[name][1])  # 3 epochs of ceil(6 batches / k) steps
    assert t.global_step == straight.global_step == steps
    assert resumed.sam_optimizer.steps == full.sam_optimizer.steps
    assert resumed.sam_optimizer.sam_steps == full.sam_optimizer.sam_steps
    assert resumed.lr_schedulers().last_epoch == full.lr_schedulers().last_epoch
    assert flat(resumed.net).ne(flat(part.net)).any()  # the resumed run did train on
    if CASES[name][2]:
        assert 0 < full.sam_optimizer.steps < steps  # some steps overflowed and were skipped
    else:
        assert full.sam_optimizer.steps == steps


@pytest.mark.parametrize("name", ["sam", "looksam-accumulate-2", "rst-accumulate-3"])
@pytest.mark.parametrize("stop", [2, 3, 4])  # inside epoch 0, at its end (3 steps of 2 batches), inside epoch 1
def test_resume_inside_an_epoch_from_a_step_checkpoint(tmp_path, name, stop):
    """max_steps with a resumable loader: stop at `stop` steps (a ModelCheckpoint every step), resume to 7."""
    full, dtype = _module(name)
    fit(full, _resumable(dtype), max_steps=7)
    part, _ = _module(name)
    every_step = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop, save_top_k=-1)
    fit(part, _resumable(dtype), max_steps=stop, enable_checkpointing=True, callbacks=[every_step])
    (checkpoint,) = tmp_path.iterdir()
    resumed, _ = _module(name)
    t = fit(resumed, _resumable(dtype), max_steps=7, ckpt_path=str(checkpoint))
    assert torch.equal(flat(resumed.net), flat(full.net))
    assert t.global_step == 7 == resumed.sam_optimizer.steps


class _SaveAfterBatch(pl.Callback):
    """trainer.save_checkpoint after the given batch (counted from 1), then stop: a checkpoint inside a window."""

    def __init__(self, batch, path):
        self.batch, self.path = batch, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.epoch_loop.batch_progress.total.completed + 1 == self.batch:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


@pytest.mark.parametrize("after_batch", [5, 8])  # windows of 3 batches: 2 of a window pending, in epoch 0 or 1
def test_a_checkpoint_inside_an_accumulation_window_keeps_its_batches(tmp_path, after_batch):
    full, _ = _module("rst-accumulate-3")
    fit(full, _resumable(), max_steps=5)
    part, _ = _module("rst-accumulate-3")
    path = tmp_path / "inside.ckpt"
    fit(part, _resumable(), max_steps=5, callbacks=[_SaveAfterBatch(after_batch, path)])
    pending = torch.load(path, weights_only=False)[PENDING_BATCHES_KEY]
    assert len(pending) == 2 and pending[0][0].shape == (8, 4)
    resumed, _ = _module("rst-accumulate-3")
    t = fit(resumed, _resumable(), max_steps=5, ckpt_path=str(path))
    assert torch.equal(flat(resumed.net), flat(full.net))
    assert t.global_step == 5
