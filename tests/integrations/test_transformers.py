"""SAMTrainer: its steps are sam_step's on the same batches (every variant, accumulation, BN, bf16, clipping), the
Trainer counts them (global_step, max_steps, the logged clean loss), dropout masks repeat in the perturbed pass.
float64 unless bf16 is the point; tiny models, a few steps each."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers", reason="the transformers integration needs samkit[transformers]")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import Trainer  # noqa: E402

from samkit import (  # noqa: E402
    AESAM,
    ESAM,
    GSAM,
    SAM,
    FriendlySAM,
    LateSAM,
    LookSAM,
    MomentumSAM,
    RandomSAM,
    SAMOn,
)
from samkit.integrations.transformers import SAMTrainer  # noqa: E402
from tests.integrations.transformers_support import (  # noqa: E402
    BATCH,
    Examples,
    N,
    Net,
    arguments,
    bert,
    flat,
    reference,
    sgd_sam,
    train,
)

STEPS = 4

# every member of the family SAMTrainer can drive (ESAM and K-SAM select examples: refused, tested below)
FAMILY = {
    "sam": lambda net: sgd_sam(net),
    "asam": lambda net: sgd_sam(net, adaptive=True, rho=0.5),
    "sam-interval-2": lambda net: sgd_sam(net, interval=2),
    "gsam": lambda net: sgd_sam(net, GSAM, alpha=0.5),
    "fsam": lambda net: sgd_sam(net, FriendlySAM),
    "looksam": lambda net: sgd_sam(net, LookSAM, k=2),
    "rst": lambda net: sgd_sam(net, RandomSAM, prob=0.5, seed=3),
    "aesam": lambda net: sgd_sam(net, AESAM, total_steps=STEPS),
    "late-sam": lambda net: sgd_sam(net, LateSAM, start_step=2),
    "momentum-sam": lambda net: MomentumSAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9),
}


@pytest.mark.parametrize("name", FAMILY)
def test_every_variant_equals_sam_step_and_one_pass_steps_cost_one_pass(name, tmp_path):
    """Each optimizer step equals sam_step on the same batch, bit for bit; the forward passes the model ran are the
    ones the optimizer counted (a one-pass step runs one)."""
    make = FAMILY[name]
    trainer = train("net", tmp_path, make, max_steps=STEPS)
    net, optimizer = reference("net", STEPS, make=make)
    sam = trainer.sam_optimizer
    assert torch.equal(flat(trainer.model), flat(net))
    assert sam.steps == optimizer.steps == STEPS == trainer.state.global_step
    assert sam.sam_steps == optimizer.sam_steps
    assert trainer.model.forwards == sam.passes == optimizer.passes
    assert sam.training == optimizer.training  # Momentum-SAM sits at w between steps, as after eval()
    if name == "sam-interval-2":  # every other step is a one-pass step: 2 + 1 + 2 + 1 passes
        assert sam.sam_steps == 2 and trainer.model.forwards == 6


def test_sam_on_with_bert(tmp_path):
    """SAM-ON perturbs the normalisation layers only: BERT's LayerNorms."""

    def make(net):
        return sgd_sam(net, SAMOn, model=net, rho=0.5)

    trainer = train("bert", tmp_path, make, max_steps=2)
    net, optimizer = reference("bert", 2, make=make)
    assert torch.equal(flat(trainer.model), flat(net))
    assert trainer.sam_optimizer.sam_steps == optimizer.sam_steps == 2


@pytest.mark.parametrize("kind", ["net", "bert"])
@pytest.mark.parametrize("mode", ["shared", "per_micro_batch"])
def test_accumulation_equals_sam_step_with_micro_batches(kind, mode, tmp_path):
    """gradient_accumulation_steps=2: the window's two batches are sam_step's two micro-batches ("shared": one ε̂;
    "per_micro_batch": mSAM), with the linear schedule counted in optimizer steps and clipping at 1.0."""
    options = dict(gradient_accumulation_steps=2, max_steps=3, lr_scheduler_type="linear", max_grad_norm=1.0)
    trainer = train(kind, tmp_path, trainer_options={"perturbation": mode}, **options)
    losses = []
    net, optimizer = reference(kind, 3, 2, schedule="linear", perturbation=mode, max_grad_norm=1.0, losses=losses)
    assert torch.equal(flat(trainer.model), flat(net))
    assert trainer.state.global_step == trainer.sam_optimizer.steps == 3
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [torch.tensor(loss.item(), dtype=torch.float32).item() for loss in losses]  # the clean loss


@pytest.mark.parametrize("kind", ["net", "bert"])
def test_shared_accumulation_equals_one_step_on_the_concatenated_batch(kind, tmp_path):
    """Two batches of 4 accumulated ("shared") = one batch of 8, to 1e-12 in float64 (the sums are ordered
    differently); mSAM on the same two batches is another algorithm and differs."""
    accumulated = train(kind, tmp_path / "a", gradient_accumulation_steps=2, max_steps=3)
    whole = train(kind, tmp_path / "b", per_device_train_batch_size=2 * BATCH, max_steps=3)
    msam = train(
        kind,
        tmp_path / "c",
        gradient_accumulation_steps=2,
        max_steps=3,
        trainer_options={"perturbation": "per_micro_batch"},
    )
    assert (flat(accumulated.model) - flat(whole.model)).abs().max() <= 1e-12
    assert (flat(msam.model) - flat(whole.model)).abs().max() > 1e-6


def test_batches_weigh_their_share_of_the_label_items(tmp_path):
    """Labels of -100 are left out of the loss (cross_entropy's ignore_index); the first batch has 1 item of 4, so
    a batch weighs its items, not 1/n, and accumulation still equals the batch put together."""
    labels = Examples("net").y.clone()
    labels[:3] = -100
    data = Examples("net", labels=labels)
    accumulated = train("net", tmp_path / "a", gradient_accumulation_steps=2, max_steps=1, dataset=data)
    whole = train("net", tmp_path / "b", per_device_train_batch_size=2 * BATCH, max_steps=1, dataset=data)
    assert (flat(accumulated.model) - flat(whole.model)).abs().max() <= 1e-12
    assert accumulated.batch_weights([{"labels": labels[:4]}, {"labels": labels[4:8]}]) == [1 / 5, 4 / 5]
    assert accumulated.batch_weights([{"x": 1}, {"x": 2}]) == [0.5, 0.5]  # nothing to count: 1/n


def test_the_plain_trainer_cannot_step_a_sam(tmp_path):
    """Why SAMTrainer exists: Trainer calls optimizer.step() without a closure."""
    net = Net()
    trainer = Trainer(
        model=net, args=arguments(tmp_path, max_steps=1), train_dataset=Examples("net"), optimizers=(sgd_sam(net), None)
    )
    with pytest.raises(ValueError, match=r"SAM.step\(\) needs a closure"):
        trainer.train()


BUILT = {
    "gsam": (GSAM, {"rho": 0.2, "alpha": 0.3}),
    "looksam": (LookSAM, {"rho": 0.2, "k": 2}),
    "aesam": (AESAM, {"rho": 0.2, "total_steps": 3}),
}


@pytest.mark.parametrize("name", BUILT)
def test_optimizer_built_from_training_arguments(name, tmp_path):
    """optim, learning_rate and weight_decay (the Trainer's two groups) build the base optimizer; sam_class and
    sam_kwargs wrap it; the steps equal sam_step with the same optimizer built by hand."""
    cls, kwargs = BUILT[name]
    options = dict(optim="adamw_torch", learning_rate=0.01, weight_decay=0.1, max_steps=3)
    trainer = train("bert", tmp_path, None, trainer_options={"sam_class": cls, "sam_kwargs": kwargs}, **options)
    sam = trainer.sam_optimizer
    assert type(sam) is cls and type(sam.base_optimizer) is torch.optim.AdamW
    assert [g["weight_decay"] for g in sam.param_groups] == [0.1, 0.0]
    assert [g["rho"] for g in sam.param_groups] == [0.2, 0.2]
    decay = trainer.get_decay_parameter_names(trainer.model)

    def by_hand(net):
        named = list(net.named_parameters())
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        base = torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
        return cls([{"params": g["params"]} for g in groups], base, **kwargs)

    net, optimizer = reference("bert", 3, make=by_hand)
    assert torch.equal(flat(trainer.model), flat(net))
    assert sam.steps == optimizer.steps == 3 and sam.sam_steps == optimizer.sam_steps


def test_a_plain_optimizer_passed_in_is_wrapped_in_sam_class(tmp_path):
    def plain(net):
        return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    trainer = train("net", tmp_path, plain, trainer_options={"sam_kwargs": {"rho": 0.1}}, max_steps=STEPS)
    assert type(trainer.sam_optimizer) is SAM and type(trainer.sam_optimizer.base_optimizer) is torch.optim.SGD
    net, _ = reference("net", STEPS)
    assert torch.equal(flat(trainer.model), flat(net))


def test_bf16_equals_sam_step_under_bf16_autocast(tmp_path):
    """bf16=True on CPU: both passes run under accelerate's autocast and the perturbed one sees w + ε̂ (a new cast of
    the weights), bit for bit as sam_step(autocast=torch.bfloat16) on float32 weights."""
    options = dict(gradient_accumulation_steps=2, max_steps=3)
    trainer = train("net", tmp_path / "a", bf16=True, dtype=torch.float32, **options)
    net, _ = reference("net", 3, 2, dtype=torch.float32, autocast=torch.bfloat16, perturbation="shared")
    assert torch.equal(flat(trainer.model), flat(net))
    full = train("net", tmp_path / "b", dtype=torch.float32, **options)
    assert (flat(trainer.model) - flat(full.model)).abs().max() > 1e-5  # bf16 really ran


def _clip_recorder(norms):
    def make(net):
        optimizer = sgd_sam(net, GSAM, alpha=0.5)

        def record(base, args, kwargs):
            norms.append(torch.cat([p.grad.flatten() for p in net.parameters()]).norm().item())

        optimizer.base_optimizer.register_step_pre_hook(record)
        return optimizer

    return make


@pytest.mark.parametrize("k", [1, 2])
def test_max_grad_norm_clips_the_gradient_the_base_optimizer_receives(k, tmp_path):
    """GSAM's descent mixes g and g_s: the clip applies to that mix, after it is formed (ε̂ from the unclipped g),
    as sam_step(max_grad_norm=...) does; the base optimizer sees a gradient of norm 0.05."""
    norms = []
    trainer = train(
        "net", tmp_path / "a", _clip_recorder(norms), gradient_accumulation_steps=k, max_grad_norm=0.05, max_steps=STEPS
    )
    net, _ = reference(
        "net", STEPS, k, make=lambda m: sgd_sam(m, GSAM, alpha=0.5), max_grad_norm=0.05, perturbation="shared"
    )
    assert torch.equal(flat(trainer.model), flat(net))
    # clip_grad_norm_ scales by 0.05 / (norm + 1e-6): the base step sees a norm just under 0.05
    assert len(norms) == STEPS and all(0.05 * (1 - 1e-4) < n <= 0.05 for n in norms)
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert all(n > 0.1 for n in logged)  # what the Trainer logs: the norm before clipping
    unclipped = train("net", tmp_path / "b", _clip_recorder([]), gradient_accumulation_steps=k, max_steps=STEPS)
    assert (flat(trainer.model) - flat(unclipped.model)).abs().max() > 1e-4


def test_batch_norm_statistics_come_from_the_clean_passes_only(tmp_path):
    """Two passes a step, but BatchNorm counts (and averages) the clean ones only; the trajectory is sam_step's."""
    trainer = train("net", tmp_path / "a", net=Net(batch_norm=True), gradient_accumulation_steps=2, max_steps=3)
    bn = trainer.model.body[1]
    assert trainer.sam_optimizer.sam_steps == 3 and trainer.model.forwards == 12
    assert bn.num_batches_tracked.item() == 6  # 3 steps of 2 clean passes
    net, _ = reference("net", 3, 2, net=Net(batch_norm=True), perturbation="shared")
    assert torch.equal(flat(trainer.model), flat(net))
    first = train("net", tmp_path / "b", net=Net(batch_norm=True), max_steps=1)
    clean = Net(batch_norm=True)  # the clean pass alone, at the initial weights
    x = Examples("net")[:BATCH]["x"]
    with torch.no_grad():
        clean.body(x)
    assert torch.equal(first.model.body[1].running_mean, clean.body[1].running_mean)
    assert torch.equal(first.model.body[1].running_var, clean.body[1].running_var)


def test_max_steps_counts_optimizer_steps_and_the_clean_loss_is_logged(tmp_path):
    """max_steps=3 with 2 batches a step: 3 windows (6 batches, inside the first 6-batch epoch), 12 forward passes;
    every logged loss is the window's mean clean loss (sam_step's return value)."""
    trainer = train("net", tmp_path, gradient_accumulation_steps=2, max_steps=3, num_train_epochs=100)
    assert trainer.state.global_step == trainer.state.max_steps == 3 == trainer.sam_optimizer.steps
    assert trainer.model.forwards == 12
    losses = []
    reference("net", 3, 2, perturbation="shared", losses=losses)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [torch.tensor(loss.item(), dtype=torch.float32).item() for loss in losses]


# ------------------------------------------------------------------------------------------------------------------
# dropout


class _Recorder(SAMTrainer):
    """Records every pass: the generator state it started from, the weights it ran at, its loss, and which pass."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rng = torch.get_rng_state()
        weights = [p.detach().clone() for p in model.parameters()]
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.passes.append((self.sam_optimizer.perturbed, rng, weights, loss.detach(), dict(inputs)))
        return loss


def _loss_at(model, weights, rng, inputs):
    """The training-mode loss of ``model`` at ``weights`` with the generator at ``rng`` (the dropout mask it draws)."""
    with torch.no_grad(), torch.random.fork_rng():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
        torch.set_rng_state(rng)
        model.train()
        out = model(**inputs)
        return out["loss"] if isinstance(out, dict) else out.loss


@pytest.mark.parametrize("kind", ["net", "bert"])
def test_the_perturbed_pass_draws_the_clean_pass_dropout_mask(kind, tmp_path):
    """same_dropout_mask=True (the default): the perturbed pass's loss equals a pass at w + ε̂ with the clean pass's
    random numbers; with False it draws another mask and does not."""
    results = {}
    for same in (True, False):
        net = Net(dropout=0.5) if kind == "net" else bert(dropout=0.3)
        trainer = train(
            kind,
            tmp_path / str(same),
            net=net,
            trainer_class=_Recorder,
            max_steps=2,
            gradient_accumulation_steps=2,
            trainer_options={"same_dropout_mask": same},
        )
        passes = trainer.passes
        assert [perturbed for perturbed, *_ in passes] == [False, False, True, True] * 2
        probe = Net(dropout=0.5) if kind == "net" else bert(dropout=0.3)
        matches = []
        for step in range(2):
            window = passes[4 * step : 4 * step + 4]
            for j in range(2):
                _, clean_rng, _, _, inputs = window[j]
                _, perturbed_rng, at, loss, _ = window[2 + j]
                matches.append(torch.equal(_loss_at(probe, at, clean_rng, inputs), loss))
                assert torch.equal(perturbed_rng, clean_rng) == same
        results[same] = matches
    assert results[True] == [True] * 4
    assert results[False] == [False] * 4


def test_same_dropout_mask_leaves_the_generator_where_the_clean_passes_left_it(tmp_path):
    """The random numbers after a step are those after its clean passes: a model without dropout that draws nothing
    else trains the same, and the next step's masks are the ones a one-pass run would draw."""
    trainer = train("net", tmp_path, net=Net(dropout=0.5), trainer_class=_Recorder, max_steps=2)
    clean = [rng for perturbed, rng, *_ in trainer.passes if not perturbed]
    with torch.random.fork_rng():
        torch.set_rng_state(clean[0])
        torch.nn.functional.dropout(torch.ones(BATCH, 8, dtype=torch.float64), 0.5)  # what the first clean pass drew
        assert torch.equal(torch.get_rng_state(), clean[1])


# ------------------------------------------------------------------------------------------------------------------
# refused, with the reason


def test_bad_options_are_refused(tmp_path):
    def make(**options):
        return SAMTrainer(model=Net(), args=arguments(tmp_path), train_dataset=Examples("net"), **options)

    with pytest.raises(ValueError, match="perturbation must be one of.*'mixed'"):
        make(perturbation="mixed")
    with pytest.raises(TypeError, match="sam_class must be a class of the SAM family.*SGD"):
        make(sam_class=torch.optim.SGD)
    with pytest.raises(TypeError, match="same_dropout_mask must be True or False, got 'yes'"):
        make(same_dropout_mask="yes")
    with pytest.raises(TypeError, match="ESAM runs its passes on examples it selects"):
        make(sam_class=ESAM)


def test_an_optimizer_outside_the_family_or_selecting_examples_is_refused(tmp_path):
    with pytest.raises(TypeError, match="ESAM runs its passes on examples it selects.*samkit.sam_step"):
        train("net", tmp_path, lambda net: sgd_sam(net, ESAM), max_steps=1)


def test_loss_scaled_for_accumulation_is_refused(tmp_path):
    class Scaled(SAMTrainer):
        loss_is_scaled_for_ga = True

    with pytest.raises(ValueError, match="loss_is_scaled_for_ga=True: SAMTrainer weighs the batches"):
        Scaled(model=Net(), args=arguments(tmp_path), train_dataset=Examples("net"))


def test_a_loss_that_is_not_a_scalar_is_refused(tmp_path):
    class PerExample(Net):
        def forward(self, x, labels):
            return {"loss": F.cross_entropy(self.body(x), labels, reduction="none")}

    with pytest.raises(ValueError, match=r"compute_loss must return the mean loss .* got \(4,\)"):
        train("net", tmp_path, net=PerExample(), max_steps=1)


def test_non_finite_gradient_raises_and_leaves_w(tmp_path):
    class Exploding(Net):
        def forward(self, x, labels):
            return {"loss": super().forward(x, labels)["loss"] * math.inf}

    net = Exploding()
    before = flat(net)
    with pytest.raises(FloatingPointError, match="inf or NaN"):
        train("net", tmp_path, net=net, max_steps=1)
    assert torch.equal(flat(net), before)


def test_the_family_list_covers_the_package():
    """Every optimizer samkit exports is in FAMILY, is SAM-ON (tested with BERT) or selects examples (refused)."""
    import samkit.optim

    exported = {getattr(samkit.optim, name) for name in samkit.optim.__all__ if name != "Phase"}
    covered = {type(FAMILY[name](Net())) for name in FAMILY} | {SAMOn, ESAM}
    selecting = {cls for cls in exported if cls.selects_examples}
    assert exported - covered - selecting == set()
    assert N % BATCH == 0


# ------------------------------------------------------------------------------------------------------------------
# fp16's GradScaler. accelerate has no fp16 on CPU (fp16=True runs float32 there without a scaler), so these tests put a
# CPU GradScaler into the Trainer's accelerator by hand: the scaling, unscaling and overflow skips are the ones fp16
# runs on a GPU, without fp16 autocast.


class _Scaled(SAMTrainer):
    def __init__(self, *args, scaler, **kwargs):
        super().__init__(*args, **kwargs)
        self.accelerator.scaler = scaler


def _growing_scaler(init_scale=2.0**8):
    """A scale that doubles after every step, so that a gradient left scaled anywhere changes the result."""
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1)


@pytest.mark.parametrize("mode", ["shared", "per_micro_batch"])
def test_grad_scaler_scales_and_unscales_like_sam_step(mode, tmp_path):
    """GSAM's descent mixes g and g_s: both must be unscaled; the clip sees the unscaled descent gradient."""

    def make(net):
        return sgd_sam(net, GSAM, alpha=0.5)

    scaler = _growing_scaler()
    options = {"scaler": scaler, "perturbation": mode}
    trainer = train(
        "net", tmp_path, make, trainer_class=_Scaled, trainer_options=options, dtype=torch.float32,
        gradient_accumulation_steps=2, max_steps=3, max_grad_norm=0.5,
    )  # fmt: skip
    reference_scaler = _growing_scaler()
    net, optimizer = reference(
        "net", 3, 2, make=make, dtype=torch.float32, scaler=reference_scaler, perturbation=mode, max_grad_norm=0.5
    )
    assert torch.equal(flat(trainer.model), flat(net))
    assert trainer.sam_optimizer.steps == optimizer.steps == 3
    assert scaler.get_scale() == reference_scaler.get_scale() == 2.0**11


class _Overflowing(Net):
    """Its loss is inf in the clean pass or in the perturbed pass of every step."""

    def __init__(self, where: str):
        super().__init__(dtype=torch.float32)
        self.where, self.sam = where, None

    def forward(self, x, labels):
        loss = super().forward(x, labels)["loss"]
        perturbed = self.sam is not None and self.sam.perturbed
        return {"loss": loss * math.inf if perturbed == (self.where == "perturbed") else loss}


@pytest.mark.parametrize("where", ["clean", "perturbed"])
def test_an_overflow_skips_the_step_and_the_scheduler(where, tmp_path):
    """Weights untouched, SAM counts no step and sits at w, the scale backs off once a step, the scheduler does not
    step; the Trainer counts the step (as it does for any skipped fp16 step)."""
    net = _Overflowing(where)

    def make(module):
        module.sam = sgd_sam(module)
        return module.sam

    before = flat(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer = train(
        "net", tmp_path, make, net=net, trainer_class=_Scaled, trainer_options={"scaler": scaler},
        dtype=torch.float32, max_steps=3, lr_scheduler_type="linear",
    )  # fmt: skip
    assert torch.equal(flat(trainer.model), before)
    assert trainer.sam_optimizer.steps == 0 and trainer.state.global_step == 3
    assert not trainer.sam_optimizer.perturbed and not trainer.sam_optimizer._step.decided
    assert scaler.get_scale() == 2.0**7
    assert trainer.lr_scheduler.last_epoch == 0


def test_the_step_diagnostics_equal_sam_steps(tmp_path):
    """last_step_stats after a SAMTrainer step holds the clean and perturbed losses and the ascent's norms, equal to
    those of sam_step on the same batch (float64, to 1e-12)."""
    trainer = train("net", tmp_path, max_steps=2)
    net, optimizer = reference("net", 2)
    ours, theirs = trainer.sam_optimizer.last_step_stats, optimizer.last_step_stats
    assert ours is not None and theirs is not None and ours.sam and theirs.sam
    for field in ("loss", "perturbed_loss", "loss_rise", "grad_norm", "eps_norm", "lr"):
        mine, expected = getattr(ours, field), getattr(theirs, field)
        assert mine is not None and expected is not None, field
        assert abs(mine - expected) <= 1e-12 * max(1.0, abs(expected)), (field, mine, expected)
    assert ours.loss_rise == ours.perturbed_loss - ours.loss
