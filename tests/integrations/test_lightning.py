"""SAMLightningModule: its steps are sam_step's on the same batches (accumulation, BN, AMP, clipping, schedulers),
and Lightning counts them (global_step, max_steps, checkpoint files, hooks). float64 unless AMP is the point."""

from __future__ import annotations

import math

import pytest

pl = pytest.importorskip("pytorch_lightning", reason="the Lightning integration needs samkit[lightning]")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.plugins.precision import MixedPrecision  # noqa: E402

from samkit import AESAM, ESAM, GSAM, SAM, LookSAM, MomentumSAM  # noqa: E402
from samkit.integrations.lightning import SAMLightningModule  # noqa: E402
from tests.integrations.lightning_support import (  # noqa: E402
    Classifier,
    fit,
    flat,
    loader,
    net,
    reference,
    sgd_sam,
    step_lr,
)

STEPS = 5


def _aesam(params):
    return sgd_sam(params, AESAM, total_steps=STEPS)


def _looksam(params):
    return sgd_sam(params, LookSAM, k=2)


# (batches per step, perturbation, optimizer): every shape of step the module takes
CASES = {
    "sam": (1, "shared", sgd_sam),
    "sam-accumulate-2": (2, "shared", sgd_sam),
    "msam-accumulate-2": (2, "per_micro_batch", sgd_sam),
    "sam-accumulate-4": (4, "shared", sgd_sam),  # 6 batches an epoch: windows of 4 and 2
    "aesam-accumulate-2": (2, "shared", _aesam),  # decided from the window's gradient
    "aesam-msam-accumulate-2": (2, "per_micro_batch", _aesam),
    "looksam-accumulate-2": (2, "shared", _looksam),  # one-pass steps in between
}


@pytest.mark.parametrize("name", CASES)
def test_steps_equal_sam_step_on_the_windows_batches(name):
    """Each optimizer step equals sam_step with micro_batches = the window's batches, bit for bit: the same clean
    and perturbed passes, BatchNorm statistics from the clean passes only, the scheduler once per step; the step
    returns the window's mean clean loss, as sam_step does."""
    k, mode, make = CASES[name]
    module = Classifier(make, step_lr, batch_norm=True, accumulate_grad_batches=k, perturbation=mode)
    t = fit(module, max_steps=STEPS)
    losses = []
    model, optimizer, scheduler = reference(
        STEPS, k, make_optimizer=make, make_scheduler=step_lr, batch_norm=True, perturbation=mode, losses=losses
    )
    assert torch.equal(flat(module.net), flat(model))
    assert torch.equal(torch.stack(module.step_losses), torch.stack(losses))
    assert t.global_step == module.sam_optimizer.steps == optimizer.steps == STEPS
    assert module.sam_optimizer.sam_steps == optimizer.sam_steps
    assert module.lr_schedulers().last_epoch == scheduler.last_epoch == STEPS
    bn, ref_bn = module.net[1], model[1]
    assert bn.num_batches_tracked.item() == ref_bn.num_batches_tracked.item() == module.clean_passes


def test_batch_norm_statistics_are_frozen_in_the_perturbed_pass():
    """Two passes a step, but the BatchNorm buffers count (and average) the clean passes only."""
    module = Classifier(batch_norm=True)
    fit(module, max_steps=4)
    assert module.sam_optimizer.sam_steps == 4
    assert module.net[1].num_batches_tracked.item() == 4
    model = net(batch_norm=True)  # the clean passes alone, at the weights the module had before each step
    x, y = next(iter(loader()))
    with torch.no_grad():
        model(x)
    first = Classifier(batch_norm=True)
    fit(first, max_steps=1)
    assert torch.equal(first.net[1].running_mean, model[1].running_mean)
    assert torch.equal(first.net[1].running_var, model[1].running_var)


def test_max_steps_counts_optimizer_steps_not_batches():
    module = Classifier(accumulate_grad_batches=3)
    t = fit(module, max_steps=3, max_epochs=100)
    assert t.global_step == 3 == module.sam_optimizer.steps
    assert module.clean_passes == 9  # 3 windows of 3 batches: stopped inside the second 6-batch epoch


def test_checkpoint_files_are_written_every_epoch_and_every_n_steps(tmp_path):
    fit(
        Classifier(accumulate_grad_batches=2),
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "epochs", every_n_epochs=1, save_top_k=-1),
            ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=2, save_top_k=-1),
        ],
    )
    assert sorted(p.name for p in (tmp_path / "epochs").iterdir()) == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt"]
    steps = sorted(p.name for p in (tmp_path / "steps").iterdir())
    assert steps == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "epoch=1-step=6.ckpt"]
    saved = torch.load(tmp_path / "epochs" / "epoch=0-step=3.ckpt", weights_only=False)
    assert saved["global_step"] == 3
    assert saved["optimizer_states"][0]["sam"]["steps_taken"] == 3


def _step_every(frequency: int, interval: str):
    def make(optimizer):
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"scheduler": scheduler, "interval": interval, "frequency": frequency}

    return make


@pytest.mark.parametrize(
    "interval, frequency, expected_steps",
    [("step", 1, 6), ("step", 2, 3), ("epoch", 1, 2), ("epoch", 2, 1)],  # 2 epochs of 3 optimizer steps
)
def test_schedulers_step_by_their_interval_and_frequency(interval, frequency, expected_steps):
    module = Classifier(make_scheduler=_step_every(frequency, interval), accumulate_grad_batches=2)
    fit(module, max_epochs=2)
    assert module.sam_optimizer.steps == 6
    assert module.lr_schedulers().last_epoch == expected_steps
    assert module.sam_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**expected_steps, rel=1e-15)


def test_epoch_scheduler_does_not_step_when_max_steps_stops_inside_an_epoch():
    module = Classifier(make_scheduler=_step_every(1, "epoch"))
    fit(module, max_steps=8)  # epoch 0 complete (6 steps), epoch 1 stopped after 2
    assert module.lr_schedulers().last_epoch == 1


class _CountSteps(pl.Callback):
    def __init__(self):
        self.calls, self.grad_norms = 0, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls += 1
        assert optimizer is pl_module.sam_optimizer and not optimizer.perturbed  # at w, the descent gradient ready
        self.grad_norms.append(torch.cat([p.grad.flatten() for p in pl_module.parameters()]).norm().item())


def test_on_before_optimizer_step_hooks_run_once_per_step_with_unscaled_gradients():
    counter = _CountSteps()
    big = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    module = Classifier(dtype=torch.float32, accumulate_grad_batches=2)
    fit(module, loader(torch.float32), max_steps=3, callbacks=[counter], plugins=[big])
    assert counter.calls == 3 == module.sam_optimizer.steps
    assert max(counter.grad_norms) < 10  # unscaled: a scaled gradient would be ~2^10 times larger


def _float32_reference(steps, k=1, **step_options):
    model, optimizer, _ = reference(steps, k, dtype=torch.float32, **step_options)
    return model, optimizer


@pytest.mark.parametrize("k", [1, 2])
def test_bf16_mixed_equals_sam_step_under_bf16_autocast(k):
    """Both passes run under autocast and the perturbed one sees w + ε̂ (no stale cast of w: Lightning's autocast
    has no weight cache), bit for bit as sam_step(autocast=torch.bfloat16)."""
    module = Classifier(dtype=torch.float32, accumulate_grad_batches=k)
    fit(module, loader(torch.float32), max_steps=4, precision="bf16-mixed")
    model, _ = _float32_reference(4, k, autocast=torch.bfloat16, perturbation="shared")
    assert torch.equal(flat(module.net), flat(model))
    full, _ = _float32_reference(4, k)
    assert (flat(module.net) - flat(full)).abs().max() > 1e-5  # bf16 really ran


def _gsam(params):
    return sgd_sam(params, GSAM, alpha=0.5)


FP16_CASES = {
    "sam": (1, "shared", sgd_sam),
    "sam-accumulate-2": (2, "shared", sgd_sam),
    "msam-accumulate-2": (2, "per_micro_batch", sgd_sam),
    "gsam-accumulate-2": (2, "shared", _gsam),  # its descent mixes g and g_s: both must be unscaled
    "gsam-msam-accumulate-2": (2, "per_micro_batch", _gsam),
    "aesam-accumulate-2": (2, "shared", _aesam),  # its rule compares ||g||² over steps whose scales differ
    "aesam-msam-accumulate-2": (2, "per_micro_batch", _aesam),
}


def _growing_scaler():
    """A scale that doubles after every step, so that a gradient left scaled anywhere changes the result."""
    return torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)


@pytest.mark.parametrize("name", FP16_CASES)
def test_16_mixed_scales_and_unscales_like_sam_step(name):
    """precision="16-mixed" (on CPU Lightning only accepts it as an explicit MixedPrecision plugin, and otherwise
    falls back to bf16): the Trainer's GradScaler scales both passes; ε̂, the rule and the descent see unscaled
    gradients."""
    k, mode, make = FP16_CASES[name]
    module = Classifier(make, dtype=torch.float32, accumulate_grad_batches=k, perturbation=mode)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=_growing_scaler())
    fit(module, loader(torch.float32), max_steps=4, plugins=[plugin])
    scaler = _growing_scaler()
    model, optimizer = _float32_reference(
        4, k, make_optimizer=make, autocast=torch.float16, scaler=scaler, perturbation=mode
    )
    assert torch.equal(flat(module.net), flat(model))
    assert module.sam_optimizer.steps == optimizer.steps == 4
    assert module.sam_optimizer.sam_steps == optimizer.sam_steps
    mine, theirs = module.sam_optimizer.state_dict()["sam"], optimizer.state_dict()["sam"]
    if name.startswith("aesam"):  # ||g||² statistics of the unscaled gradients
        assert mine["memory"] == theirs["memory"]
    assert plugin.scaler.get_scale() == scaler.get_scale() == 2.0**12


def test_16_mixed_overflow_skips_the_step_and_still_counts_it():
    """With a scale too large for fp16 every step overflows: weights untouched, the scale backs off once per step,
    SAM counts no step, Lightning counts every one (as its own AMP loop does)."""
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**40))
    module = Classifier(dtype=torch.float32)
    before = flat(module.net)
    t = fit(module, loader(torch.float32), max_steps=3, plugins=[plugin])
    assert torch.equal(flat(module.net), before)
    assert module.sam_optimizer.steps == 0 and t.global_step == 3
    assert plugin.scaler.get_scale() == 2.0**37


@pytest.mark.parametrize("k", [1, 2])
def test_max_grad_norm_clips_the_descent_gradient_like_sam_step(k):
    module = Classifier(accumulate_grad_batches=k, max_grad_norm=0.05)
    fit(module, max_steps=4)
    model, _, _ = reference(4, k, max_grad_norm=0.05, perturbation="shared")
    assert torch.equal(flat(module.net), flat(model))
    unclipped, _, _ = reference(4, k)
    assert (flat(module.net) - flat(unclipped)).abs().max() > 1e-4


def _momentum_sam(params):
    return MomentumSAM(params, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)


def test_momentum_sam_weights_sit_at_w_between_steps(tmp_path):
    """Momentum-SAM is moved to w after every step (and back before the next), so checkpoints can be taken every
    step and hold w; the trajectory is the plain loop's."""
    module = Classifier(_momentum_sam)
    fit(
        module,
        max_steps=4,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)],
    )
    assert not module.sam_optimizer.training
    model, optimizer, _ = reference(4, make_optimizer=_momentum_sam)
    optimizer.eval()
    assert torch.equal(flat(module.net), flat(model))
    saved = torch.load(tmp_path / "epoch=0-step=4.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(saved["net.0.weight"], model[0].weight)


def test_estimated_optimizer_steps_counts_windows():
    seen = {}

    class Probe(Classifier):
        def configure_optimizers(self):
            seen["steps"] = self.estimated_optimizer_steps
            return super().configure_optimizers()

    fit(Probe(accumulate_grad_batches=4), max_epochs=3)  # 6 batches: windows of 4 and 2
    assert seen["steps"] == 6
    fit(Probe(accumulate_grad_batches=4), max_epochs=3, max_steps=5)
    assert seen["steps"] == 5


def test_the_two_step_api_through_lightnings_wrapper_counts_sam_steps_but_not_global_step():
    """Why the module exists: self.optimizers().first_step()/second_step() reach SAM through Lightning's wrapper
    (its step counters are right), but Lightning counts only wrapper.step() calls, so global_step stays 0."""

    class TwoStep(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            optimizer = self.optimizers()
            self.manual_backward(F.cross_entropy(self.net(x), y))
            optimizer.first_step(zero_grad=True)
            self.manual_backward(F.cross_entropy(self.net(x), y))
            optimizer.second_step(zero_grad=True)

        def configure_optimizers(self):
            return sgd_sam(self.parameters())

    module = TwoStep()
    t = fit(module, max_steps=3, max_epochs=1)
    assert t.global_step == 0  # max_steps=3 ignored: the whole epoch ran
    assert module.optimizers().optimizer.steps == 6


# ------------------------------------------------------------------------------------------------------------------
# refused, with the reason


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="accumulate_grad_batches must be an integer >= 1.*got 0"):
        Classifier(accumulate_grad_batches=0)
    with pytest.raises(ValueError, match="perturbation must be one of.*'mixed'"):
        Classifier(perturbation="mixed")
    with pytest.raises(ValueError, match="max_grad_norm must be a number > 0.*got -1"):
        Classifier(max_grad_norm=-1)


def test_a_non_sam_optimizer_is_refused():
    module = Classifier(lambda params: torch.optim.SGD(params, lr=0.1))
    with pytest.raises(TypeError, match="returned a SGD: return an optimizer of the SAM family"):
        fit(module, max_steps=1)


def test_two_optimizers_are_refused():
    class Two(Classifier):
        def configure_optimizers(self):
            return [sgd_sam(self.net[0].parameters()), sgd_sam(self.net[2].parameters())]

    with pytest.raises(ValueError, match="returned 2 optimizers"):
        fit(Two(), max_steps=1)


def test_an_optimizer_that_selects_examples_is_refused():
    module = Classifier(lambda params: sgd_sam(params, ESAM))
    with pytest.raises(TypeError, match="ESAM runs its passes on examples it selects.*samkit.sam_step"):
        fit(module, max_steps=1)


def test_reduce_on_plateau_needs_step_schedulers_false():
    def plateau(optimizer):
        return {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer), "monitor": "train_loss"}

    with pytest.raises(TypeError, match="ReduceLROnPlateau.*step_schedulers=False"):
        fit(Classifier(make_scheduler=plateau), max_steps=1)
    module = Classifier(make_scheduler=plateau, step_schedulers=False)
    fit(module, max_steps=2)
    assert module.sam_optimizer.steps == 2


def test_a_loss_that_is_not_a_scalar_is_refused():
    class PerExample(Classifier):
        def training_loss(self, batch):
            x, y = batch
            return F.cross_entropy(self.net(x), y, reduction="none")

    with pytest.raises(ValueError, match=r"training_loss must return the mean loss .* got \(8,\)"):
        fit(PerExample(), max_steps=1)


def test_a_module_without_training_loss_says_what_to_write():
    class Bare(SAMLightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()

        def configure_optimizers(self):
            return sgd_sam(self.parameters())

    with pytest.raises(NotImplementedError, match=r"must implement training_loss\(self, batch\)"):
        fit(Bare(), max_steps=1)


def test_lightning_refuses_its_own_accumulation_and_clipping_under_manual_optimization():
    """The module's own options replace them (documented); Lightning's message names the Trainer argument."""
    with pytest.raises(Exception, match="accumulate_grad_batches=2"):
        fit(Classifier(), max_steps=1, accumulate_grad_batches=2)
    with pytest.raises(Exception, match="gradient_clip_val=1.0"):
        fit(Classifier(), max_steps=1, gradient_clip_val=1.0)


def test_non_finite_gradient_without_a_scaler_raises_and_leaves_w():
    class Exploding(Classifier):
        def training_loss(self, batch):
            return super().training_loss(batch) * math.inf

    module = Exploding()
    before = flat(module.net)
    with pytest.raises(FloatingPointError, match="inf or NaN"):
        fit(module, max_steps=1)
    assert torch.equal(flat(module.net), before)
    assert not module.sam_optimizer.perturbed


def test_sam_two_passes_cost_is_counted():
    module = Classifier(lambda params: sgd_sam(params, SAM, interval=2))
    fit(module, max_steps=4)
    assert module.sam_optimizer.sam_steps == 2 and module.sam_optimizer.passes == 6.0
