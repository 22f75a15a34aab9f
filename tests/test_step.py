"""sam_step against plain SAM and hand-written mSAM references; AMP, clipping, BatchNorm, interval, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from samkit import SAM, sam_step
from tests.optim.reference import batch, loss_fn, mlp, reference_sam_sgd

SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def max_diff(model, weights):
    return max((p.detach() - weights[k]).abs().max().item() for k, p in model.named_parameters())


@pytest.mark.parametrize("mode", ["per_micro_batch", "shared"])
def test_one_micro_batch_is_plain_sam_exactly(mode):
    model, (x, y) = mlp(), batch()
    plain = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, **SGD_OPTIONS)
    opt_plain = SAM(plain.parameters(), torch.optim.SGD, **SGD_OPTIONS)
    for _ in range(3):
        loss = sam_step(opt, model, loss_fn, x, y, micro_batches=1, perturbation=mode)
        clean = loss_fn(plain(x), y)
        clean.backward()
        opt_plain.first_step(zero_grad=True)
        loss_fn(plain(x), y).backward()
        opt_plain.second_step(zero_grad=True)
        assert torch.equal(loss, clean.detach())
    assert torch.equal(flat(model), flat(plain))


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_four_micro_batches_equal_the_msam_reference(backend):
    model, (x, y) = mlp(), batch(n=24)
    expected = reference_sam_sgd(model, x, y, steps=3, rho=0.05, micro_batches=4, **SGD_OPTIONS)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **SGD_OPTIONS)
    for _ in range(3):
        sam_step(opt, model, loss_fn, x, y, micro_batches=4, backend=backend)
    assert max_diff(model, expected) <= 1e-12
    # mSAM differs from SAM on the whole batch: the test can tell them apart
    whole = reference_sam_sgd(mlp(), x, y, steps=3, rho=0.05, **SGD_OPTIONS)
    assert max_diff(model, whole) > 1e-6


def per_example(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


@pytest.mark.parametrize(
    "name,micro_batches,mode,backend",
    [
        ("sam", 1, "per_micro_batch", "loop"),
        ("sam", 3, "per_micro_batch", "loop"),
        ("sam", 2, "shared", "loop"),
        ("sam", 2, "per_micro_batch", "vmap"),
        ("interval", 1, "per_micro_batch", "loop"),
        ("aesam", 2, "per_micro_batch", "loop"),
    ],
)
def test_a_per_example_loss_is_averaged_for_an_optimizer_that_does_not_select(name, micro_batches, mode, backend):
    """One loss_fn (reduction='none') works for every optimizer: the ones that do not select examples average it,
    and the step is the one of the mean loss (to rounding: the two reductions may add in another order)."""
    from tests.optim.family import FAMILY
    from tests.optim.family import model as family_model

    (x, y) = batch(n=24)
    runs = []
    for loss in (loss_fn, per_example):
        model = family_model()
        opt = FAMILY[name](model)
        returned = [
            sam_step(opt, model, loss, x, y, micro_batches=micro_batches, perturbation=mode, backend=backend)
            for _ in range(4)
        ]
        runs.append((flat(model), torch.stack(returned), opt.passes))
    (w_mean, l_mean, p_mean), (w_each, l_each, p_each) = runs
    torch.testing.assert_close(w_each, w_mean, rtol=0, atol=1e-13)
    torch.testing.assert_close(l_each, l_mean, rtol=0, atol=1e-14)  # the returned loss stays the batch's mean
    assert p_each == p_mean and (w_mean - flat(family_model())).abs().max() > 1e-3


def test_unequal_micro_batches_are_weighted_by_size():
    model, (x, y) = mlp(), batch(n=18)  # 5, 5, 4, 4
    expected = reference_sam_sgd(model, x, y, steps=2, rho=0.1, micro_batches=4, lr=0.1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for _ in range(2):
        sam_step(opt, model, loss_fn, x, y, micro_batches=4)
    assert max_diff(model, expected) <= 1e-12


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_shared_perturbation_is_sam_on_the_whole_batch(backend):
    model, (x, y) = mlp(), batch(n=24)
    expected = reference_sam_sgd(model, x, y, steps=3, rho=0.05, **SGD_OPTIONS)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **SGD_OPTIONS)
    for _ in range(3):
        sam_step(opt, model, loss_fn, x, y, micro_batches=4, perturbation="shared", backend=backend)
    assert max_diff(model, expected) <= 1e-12


@pytest.mark.parametrize("interval", [1, 2])
@pytest.mark.parametrize("mode", ["per_micro_batch", "shared"])
def test_vmap_equals_loop_with_adaptive_groups(mode, interval):
    model, (x, y) = mlp(), batch(n=32)
    twin = copy.deepcopy(model)

    def build(m):
        weights = [m[0].weight, m[2].weight]
        biases = [m[0].bias, m[2].bias]
        groups = [{"params": weights, "adaptive": True, "eta": 0.01}, {"params": biases, "rho": 0.1}]
        return SAM(groups, torch.optim.SGD, rho=0.5, interval=interval, **SGD_OPTIONS)

    opt_loop, opt_vmap = build(model), build(twin)
    for _ in range(3):
        a = sam_step(opt_loop, model, loss_fn, x, y, micro_batches=4, perturbation=mode)
        b = sam_step(opt_vmap, twin, loss_fn, x, y, micro_batches=4, perturbation=mode, backend="vmap")
        assert abs(a.item() - b.item()) <= 1e-12
    torch.testing.assert_close(flat(model), flat(twin), rtol=0, atol=1e-12)


def test_clipping_scales_the_final_gradient_only():
    model, (x, y) = mlp(), batch(n=24)
    expected = reference_sam_sgd(model, x, y, steps=2, rho=0.05, micro_batches=3, lr=0.5, max_grad_norm=0.05)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.5)
    for _ in range(2):
        sam_step(opt, model, loss_fn, x, y, micro_batches=3, max_grad_norm=0.05)
    assert max_diff(model, expected) <= 1e-12
    unclipped = reference_sam_sgd(mlp(), x, y, steps=2, rho=0.05, micro_batches=3, lr=0.5)
    assert max_diff(model, unclipped) > 1e-4  # the clip was active


def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).double()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("mode", ["per_micro_batch", "shared"])
def test_batchnorm_running_stats_see_only_the_clean_pass(mode, k):
    model, (x, y) = bn_model(), batch()
    reference = copy.deepcopy(model)
    for chunk in torch.tensor_split(x, k):
        reference(chunk)  # one clean forward per micro-batch in training mode, at the same (unmoved) weights
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    sam_step(opt, model, loss_fn, x, y, micro_batches=k, perturbation=mode)
    bn, ref_bn = model[1], reference[1]
    assert torch.equal(bn.running_mean, ref_bn.running_mean)
    assert torch.equal(bn.running_var, ref_bn.running_var)
    assert bn.num_batches_tracked.item() == k and bn.track_running_stats


@pytest.mark.parametrize("backend", ["loop", "vmap"])
@pytest.mark.parametrize("mode", ["per_micro_batch", "shared"])
def test_amp_step_without_overflow_equals_the_full_precision_step(mode, backend):
    model, (x, y) = mlp(), batch()
    twin = copy.deepcopy(model)
    # eps = 0.1 makes ε̂ depend on the gradient's scale: a clean gradient left scaled (or unscaled twice) shows
    options = dict(eps=0.1, **SGD_OPTIONS)
    opt = SAM(model.parameters(), torch.optim.SGD, **options)
    opt_twin = SAM(twin.parameters(), torch.optim.SGD, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for _ in range(3):
        sam_step(opt, model, loss_fn, x, y, micro_batches=2, perturbation=mode, backend=backend, scaler=scaler)
        sam_step(opt_twin, twin, loss_fn, x, y, micro_batches=2, perturbation=mode, backend=backend)
    # scaling by a power of two is exact in float64: the two runs agree to rounding at most
    torch.testing.assert_close(flat(model), flat(twin), rtol=0, atol=1e-15)
    assert scaler.get_scale() == 2.0**11  # 3 steps, one update each, growth after every 2 clean ones


# the passes of a k = 2 step, in the order loss_fn sees them (the vmap backend runs all micro-batches at once)
PASSES = {
    ("loop", "per_micro_batch"): ["clean 1", "perturbed 1", "clean 2", "perturbed 2"],
    ("loop", "shared"): ["clean 1", "clean 2", "perturbed 1", "perturbed 2"],
    ("vmap", "per_micro_batch"): ["clean", "perturbed"],
    ("vmap", "shared"): ["clean", "perturbed"],
}


@pytest.mark.parametrize(
    "backend,mode,overflow_in",
    [(backend, mode, name) for (backend, mode), names in PASSES.items() for name in names],
)
def test_overflow_in_any_one_pass_skips_the_step_and_lowers_the_scale(backend, mode, overflow_in):
    model, (x, y) = mlp(), batch()
    twin = copy.deepcopy(model)
    before = flat(model).clone()
    options = dict(lr=0.1, momentum=0.9)
    opt = SAM(model.parameters(), torch.optim.SGD, **options)
    calls = []

    def exploding_loss(outputs, targets):
        calls.append(1)
        loss = loss_fn(outputs, targets)
        # finite, but not once scaled by 2^16: what an fp16 overflow looks like to the scaler
        return loss * 1e305 if PASSES[backend, mode][len(calls) - 1] == overflow_in else loss

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    step = dict(micro_batches=2, perturbation=mode, backend=backend)
    sam_step(opt, model, exploding_loss, x, y, scaler=scaler, **step)
    names = PASSES[backend, mode]
    assert len(calls) > names.index(overflow_in)  # the pass this case names did run and overflow
    if overflow_in.startswith("clean"):  # no ascent from that gradient: no perturbed pass runs after it
        assert not any(name.startswith("perturbed") for name in names[names.index(overflow_in) : len(calls)])
    assert torch.equal(flat(model), before)
    assert scaler.get_scale() == 2.0**15  # backed off once
    assert all(p.grad is None for p in model.parameters())
    assert not opt.perturbed
    # the next step equals a fresh optimizer's first step: no momentum from the skipped one, no pending ascent
    sam_step(opt, model, loss_fn, x, y, scaler=scaler, **step)
    sam_step(SAM(twin.parameters(), torch.optim.SGD, **options), twin, loss_fn, x, y, **step)
    torch.testing.assert_close(flat(model), flat(twin), rtol=0, atol=1e-15)
    assert scaler.get_scale() == 2.0**15


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_trains(dtype, device):
    model, (x, y) = mlp(dtype=torch.float32).to(device), batch(n=64, dtype=torch.float32)
    x, y = x.to(device), y.to(device)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.5)
    scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None
    first = sam_step(opt, model, loss_fn, x, y, micro_batches=2, autocast=dtype, scaler=scaler)
    for _ in range(20):
        last = sam_step(opt, model, loss_fn, x, y, micro_batches=2, autocast=dtype, scaler=scaler)
    assert last.dtype == torch.float32 and last.item() < first.item()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_interval_runs_one_pass_on_skipped_steps():
    model, (x, y) = mlp(), batch()
    opt = SAM(model.parameters(), torch.optim.SGD, interval=2, lr=0.1)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    sam_step(opt, model, loss_fn, x, y, micro_batches=2)
    assert len(forwards) == 4
    sam_step(opt, model, loss_fn, x, y, micro_batches=2)
    assert len(forwards) == 6
    # the skipped step is plain SGD on the batch gradient
    twin = mlp()
    expected = reference_sam_sgd(twin, x, y, steps=1, rho=0.05, micro_batches=2, lr=0.1)
    twin.load_state_dict(expected)
    loss_fn(twin(x), y).backward()
    with torch.no_grad():
        for p in twin.parameters():
            p -= 0.1 * p.grad
    torch.testing.assert_close(flat(model), flat(twin), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode,failing_call", [("per_micro_batch", 2), ("per_micro_batch", 4), ("shared", 3)])
def test_an_error_in_a_perturbed_pass_restores_the_weights(mode, failing_call):
    model, (x, y) = mlp(), batch()
    before = flat(model).clone()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    calls = []

    def failing_loss(outputs, targets):
        calls.append(1)
        if len(calls) == failing_call:
            raise MemoryError("out of memory in the perturbed pass")
        return loss_fn(outputs, targets)

    with pytest.raises(MemoryError):
        sam_step(opt, model, failing_loss, x, y, micro_batches=2, perturbation=mode)
    assert not opt.perturbed and torch.equal(flat(model), before)
    sam_step(opt, model, loss_fn, x, y, micro_batches=2, perturbation=mode)  # and training goes on
    assert not torch.equal(flat(model), before)


def test_non_finite_gradient_without_scaler_raises_and_keeps_the_weights():
    model, (x, y) = mlp(), batch()
    before = flat(model).clone()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(FloatingPointError, match="inf or NaN"):
        sam_step(opt, model, lambda o, t: loss_fn(o, t) * float("inf"), x, y)
    assert torch.equal(flat(model), before)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(micro_batches=0), ValueError, "micro_batches must be an integer >= 1.*got 0"),
        (dict(micro_batches=2.0), ValueError, "micro_batches must be an integer >= 1.*got 2.0"),
        (dict(micro_batches=17), ValueError, "16 examples, fewer than micro_batches=17"),
        (dict(perturbation="each"), ValueError, "perturbation must be one of.*'each'"),
        (dict(backend="jit"), ValueError, "backend must be one of.*'jit'"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be > 0.*0.0"),
        (dict(scaler="fp16"), TypeError, "scaler must be a torch.amp.GradScaler"),
        (dict(micro_batches=3, backend="vmap"), ValueError, "16 does not split into 3.*backend='loop'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model, (x, y) = mlp(), batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(error, match=match):
        sam_step(opt, model, loss_fn, x, y, **kwargs)


def test_bad_pairings():
    model, (x, y) = mlp(), batch()
    with pytest.raises(TypeError, match="needs an optimizer of the SAM family .* got SGD"):
        sam_step(torch.optim.SGD(model.parameters(), lr=0.1), model, loss_fn, x, y)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="different lengths \\(16 vs 15\\)"):
        sam_step(opt, model, loss_fn, x, y[:15])
    with pytest.raises(
        ValueError, match="must return a scalar tensor.* or one loss per example \\(shape \\(16,\\)\\).*got \\(16, 1\\)"
    ):
        sam_step(opt, model, lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="none")[:, None], x, y)
    bn = bn_model()
    with pytest.raises(ValueError, match="BatchNorm.*backend='loop'"):
        sam_step(SAM(bn.parameters(), torch.optim.SGD, lr=0.1), bn, loss_fn, x, y, backend="vmap")


class DataDependent(torch.nn.Module):
    """A forward that reads a value out of a tensor: fine in a loop, impossible under vmap."""

    def __init__(self):
        super().__init__()
        self.linear = mlp()

    def forward(self, x):
        return self.linear(x) * (2.0 if x.sum().item() > 0 else 1.0)


def test_vmap_on_a_model_it_cannot_vectorise_says_why_and_suggests_the_loop():
    model, (x, y) = DataDependent(), batch()
    before = flat(model).clone()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="could not vectorise this model.*item.*backend='loop'"):
        sam_step(opt, model, loss_fn, x, y, micro_batches=2, backend="vmap")
    assert torch.equal(flat(model), before) and not opt.perturbed
    sam_step(opt, model, loss_fn, x, y, micro_batches=2)  # the loop handles it
