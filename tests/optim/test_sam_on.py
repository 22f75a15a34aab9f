"""samkit.SAMOn against a plain float64 reference written from its formula (SAM's ascent on the normalization
parameters alone, the norm over them alone), BatchNorm models under sam_step, and its options and errors."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from samkit import SAM, frozen_running_stats, sam_step
from samkit.optim.sam_on import SAMOn
from tests.optim.reference import batch, gradients, loss_fn, max_diff, mlp

SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
TOLERANCE = 1e-12  # float64, a few steps: the implementation and the reference differ only in rounding
NORM_KEYS = {"1.weight", "1.bias"}  # the normalization layer of the models below


def norm_model(kind: str = "layer", seed: int = 0) -> nn.Module:
    """4 -> 8 -> norm -> tanh -> 3, with the norm layer's affine parameters moved off their (1, 0) init."""
    torch.manual_seed(seed)
    norm = nn.LayerNorm(8) if kind == "layer" else nn.BatchNorm1d(8)
    model = nn.Sequential(nn.Linear(4, 8), norm, nn.Tanh(), nn.Linear(8, 3)).to(torch.float64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return model


def reference_sam_on_sgd(
    model, x, y, *, steps, rho, lr, momentum=0.0, weight_decay=0.0, micro_batches=1, shared=False,
    adaptive=False, eta=0.0, perturbed=NORM_KEYS,
):  # fmt: skip
    """SAM-ON around torch's SGD rule: ε̂ = rho T² g_N / ||T g_N|| on the keys in ``perturbed``, 0 elsewhere;
    mSAM's size-weighted mean of perturbed micro-batch gradients. Returns the weights and, for a BatchNorm model,
    its running mean and variance (updated by the clean passes only, torch's rule: momentum 0.1, unbiased var)."""
    model = copy.deepcopy(model)  # its BatchNorm buffers change under functional_call in training mode
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers, n = {}, len(x)
    stats = [torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)]
    chunks = list(zip(torch.tensor_split(x, micro_batches), torch.tensor_split(y, micro_batches)))

    def epsilon(g):
        t = {k: w[k].abs() + eta if adaptive else torch.ones_like(w[k]) for k in perturbed}
        norm = torch.sqrt(sum(((t[k] * g[k]) ** 2).sum() for k in perturbed))
        return {k: rho * t[k] ** 2 * g[k] / (norm + 1e-12) if k in perturbed else torch.zeros_like(w[k]) for k in w}

    for _ in range(steps):
        clean = [(len(xj) / n, gradients(model, w, xj, yj)) for xj, yj in chunks]
        for xj, _ in chunks:
            z = xj @ w["0.weight"].T + w["0.bias"]
            stats = [0.9 * stats[0] + 0.1 * z.mean(0), 0.9 * stats[1] + 0.1 * z.var(0, unbiased=True)]
        g = {k: sum(share * gj[k] for share, gj in clean) for k in w}
        total = {k: torch.zeros_like(v) for k, v in w.items()}
        for (xj, yj), (share, gj) in zip(chunks, clean):
            e = epsilon(g if shared else gj)
            g_s = gradients(model, {k: w[k] + e[k] for k in w}, xj, yj)
            total = {k: total[k] + share * g_s[k] for k in w}
        for k in w:
            d = total[k] + weight_decay * w[k]
            buffers[k] = d.clone() if k not in buffers else momentum * buffers[k] + d
            w[k] = w[k] - lr * buffers[k]
    return w, stats


def two_step(model, opt, x, y, steps, freeze=False):
    for _ in range(steps):
        loss_fn(model(x), y).backward()
        if opt.first_step(zero_grad=True):
            with frozen_running_stats(model) if freeze else torch.enable_grad():
                loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)


def same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("adaptive,eta,rho", [(False, 0.0, 0.5), (True, 0.01, 1.0)])
def test_five_steps_equal_sam_restricted_to_the_normalization_parameters(foreach, adaptive, eta, rho):
    model, (x, y) = norm_model(), batch()
    expected, _ = reference_sam_on_sgd(model, x, y, steps=5, rho=rho, adaptive=adaptive, eta=eta, **SGD_OPTIONS)
    opt = SAMOn(
        model.parameters(), torch.optim.SGD, model=model, rho=rho, adaptive=adaptive, eta=eta, foreach=foreach,
        **SGD_OPTIONS,
    )  # fmt: skip
    assert {n for n, p in model.named_parameters() if any(p is q for q in opt.norm_params)} == NORM_KEYS
    two_step(model, opt, x, y, 5)
    assert max_diff(model, expected) <= TOLERANCE
    # not vacuous: full SAM (every parameter perturbed) ends elsewhere
    full, _ = reference_sam_on_sgd(
        norm_model(), x, y, steps=5, rho=rho, adaptive=adaptive, eta=eta, perturbed=set(expected), **SGD_OPTIONS
    )
    assert max((full[k] - expected[k]).abs().max().item() for k in full) > 1e-6


def test_foreach_and_loop_paths_agree_bit_for_bit():
    (x, y) = batch()
    models = [norm_model(), norm_model()]
    for model, foreach in zip(models, (True, False)):
        opt = SAMOn(model.parameters(), torch.optim.SGD, model=model, foreach=foreach, **SGD_OPTIONS)
        two_step(model, opt, x, y, 5)
    assert same(*models)


@pytest.mark.parametrize("restore_by", ["copy", "swap"])
@pytest.mark.parametrize("foreach", [True, False])
def test_only_the_normalization_parameters_move_in_the_ascent(restore_by, foreach):
    model, (x, y) = norm_model(), batch()
    opt = SAMOn(
        model.parameters(), torch.optim.SGD, model=model, rho=0.3, eps=0.0, restore_by=restore_by, foreach=foreach,
        **SGD_OPTIONS,
    )  # fmt: skip
    two_step(model, opt, x, y, 2)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    loss_fn(model(x), y).backward()
    assert opt.first_step(zero_grad=True)
    now = {k: p.detach().clone() for k, p in model.named_parameters()}
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)
    for k in before:
        if k not in NORM_KEYS:
            assert torch.equal(now[k], before[k]), k  # never moved, not even by rounding
    moved = torch.sqrt(sum(((now[k] - before[k]) ** 2).sum() for k in NORM_KEYS))
    assert moved.item() == pytest.approx(0.3, rel=1e-12)  # ||ε̂_N|| = rho: the norm ran over N alone
    # and the descent updated every parameter
    assert all(not torch.equal(p.detach(), before[k]) for k, p in model.named_parameters())


def test_plain_sam_with_rho_zero_on_the_other_parameters_is_not_the_same():
    (x, y) = batch()
    model_on, model_sam = norm_model(), norm_model()
    on = SAMOn(model_on.parameters(), torch.optim.SGD, model=model_on, rho=0.5, eps=0.0, **SGD_OPTIONS)
    norm = [p for k, p in model_sam.named_parameters() if k in NORM_KEYS]
    others = [p for k, p in model_sam.named_parameters() if k not in NORM_KEYS]
    groups = [{"params": norm, "rho": 0.5}, {"params": others, "rho": 0.0}]
    sam = SAM(groups, torch.optim.SGD, eps=0.0, **SGD_OPTIONS)
    shifts = []
    for model, opt in ((model_on, on), (model_sam, sam)):
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        loss_fn(model(x), y).backward()
        opt.first_step()
        shifts.append(torch.sqrt(sum(((p.detach() - before[k]) ** 2).sum() for k, p in model.named_parameters())))
        opt.restore()
        opt.zero_grad()
    assert shifts[0].item() == pytest.approx(0.5, rel=1e-12)
    assert shifts[1].item() < 0.5 * 0.9  # the other parameters' gradients entered SAM's norm and shrank ε̂_N
    two_step(model_on, on, x, y, 3)
    two_step(model_sam, sam, x, y, 3)
    assert max((a - b).abs().max().item() for a, b in zip(model_on.parameters(), model_sam.parameters())) > 1e-6


def test_no_norm_perturbs_everything_but_the_normalization_parameters():
    model, (x, y) = norm_model(), batch()
    opt = SAMOn(model.parameters(), torch.optim.SGD, model=model, rho=0.2, perturb="no_norm", eps=0.0, lr=0.1)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    loss_fn(model(x), y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.first_step()
    others = [k for k in before if k not in NORM_KEYS]
    norm = torch.sqrt(sum((grads[k] ** 2).sum() for k in others))
    for k, p in model.named_parameters():
        expected = torch.zeros_like(p) if k in NORM_KEYS else 0.2 * grads[k] / norm
        torch.testing.assert_close(p.detach() - before[k], expected, rtol=1e-10, atol=1e-15)
    opt.restore()


def test_norm_layers_of_every_kind_are_found_and_can_be_restricted():
    class MyNorm(nn.LayerNorm):  # a subclass counts as its base
        pass

    layers = [nn.BatchNorm1d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.InstanceNorm1d(4, affine=True), MyNorm(4)]
    if hasattr(nn, "RMSNorm"):
        layers.append(nn.RMSNorm(4))
    model = nn.Sequential(nn.Linear(4, 4), *layers, nn.Linear(4, 2))
    opt = SAMOn(model.parameters(), torch.optim.SGD, model=model, lr=0.1)
    expected = [p for m in layers for p in m.parameters()]
    assert len(opt.norm_params) == len(expected) and all(a is b for a, b in zip(opt.norm_params, expected))
    only_bn = SAMOn(model.parameters(), torch.optim.SGD, model=model, norm_layers=(nn.BatchNorm1d,), lr=0.1)
    assert [tuple(p.shape) for p in only_bn.norm_params] == [(4,), (4,)]
    assert all(a is b for a, b in zip(only_bn.norm_params, layers[0].parameters()))


def test_closure_api_equals_two_step_api():
    (x, y) = batch()
    model_a, model_b = norm_model(), norm_model()
    opt_a = SAMOn(model_a.parameters(), torch.optim.SGD, model=model_a, **SGD_OPTIONS)
    opt_b = SAMOn(model_b.parameters(), torch.optim.SGD, model=model_b, **SGD_OPTIONS)
    two_step(model_a, opt_a, x, y, 4)

    def closure():
        opt_b.zero_grad()
        loss = loss_fn(model_b(x), y)
        loss.backward()
        return loss

    for _ in range(4):
        opt_b.step(closure)
    assert same(model_a, model_b)
    assert opt_a.passes == opt_b.passes == 8.0


@pytest.mark.parametrize("kind", ["layer", "batch"])
def test_sam_step_with_one_micro_batch_equals_the_two_step_api(kind):
    (x, y) = batch()
    model_a, model_b = norm_model(kind), norm_model(kind)
    opt_a = SAMOn(model_a.parameters(), torch.optim.SGD, model=model_a, **SGD_OPTIONS)
    opt_b = SAMOn(model_b.parameters(), torch.optim.SGD, model=model_b, **SGD_OPTIONS)
    two_step(model_a, opt_a, x, y, 3, freeze=True)
    for _ in range(3):
        sam_step(opt_b, model_b, loss_fn, x, y, micro_batches=1)
    assert same(model_a, model_b)  # weights and, for BatchNorm, the running statistics
    assert opt_b.passes == 6.0


@pytest.mark.parametrize("perturbation", ["per_micro_batch", "shared"])
@pytest.mark.parametrize("k", [1, 2])
def test_sam_step_on_a_batchnorm_model_equals_the_reference(perturbation, k):
    model, (x, y) = norm_model("batch"), batch(n=15)  # k = 2: micro-batches of 8 and 7
    expected, stats = reference_sam_on_sgd(
        model, x, y, steps=3, rho=0.5, micro_batches=k, shared=perturbation == "shared", **SGD_OPTIONS
    )
    opt = SAMOn(model.parameters(), torch.optim.SGD, model=model, rho=0.5, **SGD_OPTIONS)
    for _ in range(3):
        sam_step(opt, model, loss_fn, x, y, micro_batches=k, perturbation=perturbation)
    assert max_diff(model, expected) <= TOLERANCE
    bn = model[1]
    assert bn.num_batches_tracked.item() == 3 * k  # the clean passes only: frozen in the perturbed ones
    torch.testing.assert_close(bn.running_mean, stats[0], rtol=0, atol=1e-13)
    torch.testing.assert_close(bn.running_var, stats[1], rtol=0, atol=1e-13)
    assert opt.passes == 6.0 and opt.sam_steps == 3


@pytest.mark.parametrize("perturbation", ["per_micro_batch", "shared"])
def test_vmap_backend_equals_the_loop_on_a_layernorm_model(perturbation):
    (x, y) = batch(n=16)
    model_a, model_b = norm_model(), norm_model()
    opt_a = SAMOn(model_a.parameters(), torch.optim.SGD, model=model_a, **SGD_OPTIONS)
    opt_b = SAMOn(model_b.parameters(), torch.optim.SGD, model=model_b, **SGD_OPTIONS)
    for _ in range(3):
        sam_step(opt_a, model_a, loss_fn, x, y, micro_batches=4, perturbation=perturbation)
        sam_step(opt_b, model_b, loss_fn, x, y, micro_batches=4, perturbation=perturbation, backend="vmap")
    assert max_diff(model_b, {k: p.detach() for k, p in model_a.named_parameters()}) <= TOLERANCE
    expected, _ = reference_sam_on_sgd(
        norm_model(), x, y, steps=3, rho=0.5, micro_batches=4, shared=perturbation == "shared", **SGD_OPTIONS
    )
    assert max_diff(model_b, expected) <= TOLERANCE


def test_state_dict_round_trip_continues_bit_exactly():
    (x, y) = batch()
    straight = norm_model("batch")
    two_step(straight, SAMOn(straight.parameters(), torch.optim.SGD, model=straight, **SGD_OPTIONS), x, y, 5, True)

    first = norm_model("batch")
    opt1 = SAMOn(first.parameters(), torch.optim.SGD, model=first, **SGD_OPTIONS)
    two_step(first, opt1, x, y, 3, freeze=True)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = norm_model("batch", seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = SAMOn(resumed.parameters(), torch.optim.SGD, model=resumed, **SGD_OPTIONS)
    opt2.load_state_dict(saved["opt"])
    two_step(resumed, opt2, x, y, 2, freeze=True)
    assert same(straight, resumed)
    assert opt2.steps == 5 and opt2.passes == 10.0


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_model_and_optimizer_perturbs_the_copied_normalization_parameters(how):
    (x, y) = batch()
    model = norm_model()
    opt = SAMOn(model.parameters(), torch.optim.SGD, model=model, **SGD_OPTIONS)
    two_step(model, opt, x, y, 2)
    bundle = {"model": model, "opt": opt}
    twin = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    assert all(a is b for a, b in zip(twin["opt"].norm_params, twin["model"][1].parameters()))
    two_step(model, opt, x, y, 2)
    two_step(twin["model"], twin["opt"], x, y, 2)
    assert same(model, twin["model"])


def test_resume_with_other_options_is_refused():
    model = norm_model()
    saved = SAMOn(model.parameters(), torch.optim.SGD, model=model, lr=0.1).state_dict()
    other = SAMOn(model.parameters(), torch.optim.SGD, model=model, perturb="no_norm", lr=0.1)
    with pytest.raises(ValueError, match="saved with perturb='norm'"):
        other.load_state_dict(copy.deepcopy(saved))


def test_a_model_without_normalization_layers_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match="Sequential has no normalization-layer parameter.*Use samkit.SAM"):
        SAMOn(model.parameters(), torch.optim.SGD, model=model, lr=0.1)
    # nor one whose normalization layers are not among the optimised parameters
    with_norm = norm_model()
    with pytest.raises(ValueError, match="Sequential has no normalization-layer parameter"):
        SAMOn(with_norm[0].parameters(), torch.optim.SGD, model=with_norm, lr=0.1)
    # nor one without affine normalization parameters
    plain = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="no normalization-layer parameter"):
        SAMOn(plain.parameters(), torch.optim.SGD, model=plain, lr=0.1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(perturb="bn"), "perturb must be one of .* got 'bn'"),
        (dict(norm_layers=()), "norm_layers must be .* got \\(\\)"),
        (dict(norm_layers=("LayerNorm",)), "norm_layers must be .* got \\('LayerNorm',\\)"),
        (dict(model="model"), "model must be the torch.nn.Module .* got str"),
        (dict(rho=-0.5), "rho must be .* got -0.5"),
        (dict(eps=-1.0), "eps must be .* got -1.0"),
    ],
)
def test_bad_options(kwargs, match):
    model = norm_model()
    with pytest.raises(ValueError, match=match):
        SAMOn(model.parameters(), torch.optim.SGD, **{"model": model, "lr": 0.1, **kwargs})


def test_no_norm_with_only_normalization_parameters_is_refused():
    model = norm_model()
    with pytest.raises(ValueError, match="perturb='no_norm' leaves nothing to perturb"):
        SAMOn(model[1].parameters(), torch.optim.SGD, model=model, perturb="no_norm", lr=0.1)


def test_reserved_sam_options_are_refused():
    model = norm_model()
    with pytest.raises(TypeError, match="does not take 'interval'"):
        SAMOn(model.parameters(), torch.optim.SGD, model=model, lr=0.1, interval=2)
