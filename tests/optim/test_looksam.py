"""LookSAM against a plain float64 reference of its rule, its one-pass steps, sam_step, checkpoints and errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from samkit import SAM, sam_step
from samkit.optim.looksam import LookSAM
from tests.optim.reference import batch, gradients, loss_fn, max_diff, mlp

SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
RULE = dict(rho=0.1, alpha=0.7)


def batches(steps, n=16):
    return [batch(seed=20 + s, n=n) for s in range(steps)]


def _dot(a, b, keys):
    return sum((a[k] * b[k]).sum() for k in keys)


def reference_looksam_sgd(model, data, *, rho, k, alpha, layerwise, lr, momentum, weight_decay, micro_batches=1):
    """LookSAM around SGD(momentum, weight decay) from its formulas, one batch per step. Step t % k == 0: mSAM's
    G = Σ_j |B_j|/|B| ∇L_j(w + ρ g_j / (||g_j|| + 1e-12)), g = Σ_j |B_j|/|B| g_j, g_v = G − (⟨g, G⟩ / ||g||²) g.
    Other steps: G = g + α ||g|| / (||g_v|| + 1e-12) g_v. ⟨⟩ and || || over all parameters, or per tensor."""
    w = {name: v.detach().clone() for name, v in model.named_parameters()}
    groups = [[name] for name in w] if layerwise else [list(w)]
    g_v, buffers = None, {}
    for t, (x, y) in enumerate(data):
        n = len(x)
        chunks = list(zip(torch.tensor_split(x, micro_batches), torch.tensor_split(y, micro_batches)))
        g = {name: torch.zeros_like(v) for name, v in w.items()}
        total = {name: torch.zeros_like(v) for name, v in w.items()}
        for xj, yj in chunks:
            gj = gradients(model, w, xj, yj)
            for name in w:
                g[name] = g[name] + len(xj) / n * gj[name]
            if t % k == 0:
                norm = torch.sqrt(_dot(gj, gj, w))
                g2 = gradients(model, {name: w[name] + rho * gj[name] / (norm + 1e-12) for name in w}, xj, yj)
                for name in w:
                    total[name] = total[name] + len(xj) / n * g2[name]
        if t % k == 0:
            g_v = {}
            for keys in groups:
                coefficient = _dot(g, total, keys) / _dot(g, g, keys)
                g_v.update({name: total[name] - coefficient * g[name] for name in keys})
        else:
            for keys in groups:
                factor = alpha * torch.sqrt(_dot(g, g, keys)) / (torch.sqrt(_dot(g_v, g_v, keys)) + 1e-12)
                total.update({name: g[name] + factor * g_v[name] for name in keys})
        for name in w:
            step = total[name] + weight_decay * w[name]
            buffers[name] = step.clone() if name not in buffers else momentum * buffers[name] + step
            w[name] = w[name] - lr * buffers[name]
    return w


def two_step(model, opt, data, *, always_second_pass=False):
    for x, y in data:
        loss_fn(model(x), y).backward()
        if opt.first_step(zero_grad=True) or always_second_pass:
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)


def closure_steps(model, opt, data, calls=None):
    calls = [] if calls is None else calls
    for x, y in data:

        def closure(x=x, y=y):
            calls.append(1)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return calls


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("foreach", [True, False])
def test_steps_equal_the_reference(k, layerwise, foreach):
    model, data = mlp(), batches(7)
    expected = reference_looksam_sgd(model, data, k=k, layerwise=layerwise, **RULE, **SGD_OPTIONS)
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=k, layerwise=layerwise, foreach=foreach, **RULE, **SGD_OPTIONS)
    two_step(model, opt, data)
    assert max_diff(model, expected) <= 1e-12  # float64, 7 steps
    assert opt.sam_steps == len(range(0, 7, k))
    # the reused direction matters: without it (alpha = 0) the weights land elsewhere
    plain = reference_looksam_sgd(mlp(), data, k=k, layerwise=layerwise, **dict(RULE, alpha=0.0), **SGD_OPTIONS)
    assert max_diff(model, plain) > 1e-6


def test_global_and_layerwise_norms_differ_and_foreach_equals_the_loop():
    data = batches(6)
    results = {}
    for layerwise in (False, True):
        for foreach in (True, False):
            model = mlp()
            opt = LookSAM(
                model.parameters(), torch.optim.SGD, k=3, layerwise=layerwise, foreach=foreach, **RULE, lr=0.1
            )
            two_step(model, opt, data)
            results[layerwise, foreach] = model
    for layerwise in (False, True):
        assert same(results[layerwise, True], results[layerwise, False])  # the same operations: bit for bit on CPU
    assert (
        max((a - b).abs().max() for a, b in zip(results[False, True].parameters(), results[True, True].parameters()))
        > 1e-6
    )


@pytest.mark.parametrize("adaptive", [False, True])
def test_k_one_is_sam_bit_for_bit(adaptive):
    data = batches(5)
    model_a, model_b = mlp(), mlp()
    options = dict(rho=0.3, adaptive=adaptive, **SGD_OPTIONS)
    two_step(model_a, LookSAM(model_a.parameters(), torch.optim.SGD, k=1, alpha=0.7, **options), data)
    two_step(model_b, SAM(model_b.parameters(), torch.optim.SGD, **options), data)
    assert same(model_a, model_b)


def test_alpha_zero_is_sam_with_an_interval_bit_for_bit():
    data = batches(6)
    model_a, model_b = mlp(), mlp()
    two_step(model_a, LookSAM(model_a.parameters(), torch.optim.SGD, k=3, alpha=0.0, rho=0.1, **SGD_OPTIONS), data)
    two_step(model_b, SAM(model_b.parameters(), torch.optim.SGD, interval=3, rho=0.1, **SGD_OPTIONS), data)
    assert same(model_a, model_b)


def test_one_pass_steps_cost_one_forward_backward():
    """k = 3 over 6 steps: SAM steps 0 and 3 (two passes), the other four one pass: 8 forward passes."""
    data = batches(6)
    for api in ("sam_step", "two_step", "closure"):
        model = mlp()
        forwards = []
        model.register_forward_hook(lambda *_, calls=forwards: calls.append(1))
        opt = LookSAM(model.parameters(), torch.optim.SGD, k=3, **RULE, lr=0.1)
        if api == "sam_step":
            for x, y in data:
                sam_step(opt, model, loss_fn, x, y)
        elif api == "two_step":
            two_step(model, opt, data)
        else:
            assert len(closure_steps(model, opt, data)) == 8
        assert len(forwards) == 8, api
        assert (opt.steps, opt.sam_steps, opt.passes) == (6, 2, 8.0), api


def test_passes_count_whole_batches_with_micro_batches():
    model, data = mlp(), batches(4)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=2, **RULE, lr=0.1)
    for x, y in data:
        sam_step(opt, model, loss_fn, x, y, micro_batches=2)
    assert (opt.steps, opt.sam_steps, opt.passes) == (4, 2, 6.0)
    assert len(forwards) == 12  # two micro-batches per whole-batch pass


@pytest.mark.parametrize("loop", ["second_pass_anyway", "one_pass", "closure"])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_a_one_pass_step_hands_the_base_g_plus_the_reused_direction_once(loop, alpha):
    model, data = mlp(), batches(2)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=2, rho=0.1, alpha=alpha, lr=0.1)
    seen = []
    opt.base_optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in model.parameters()]))
    if loop == "closure":
        closure_steps(model, opt, data[:1])
    else:
        two_step(model, opt, data[:1], always_second_pass=loop == "second_pass_anyway")
    w1 = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = data[1]
    g = gradients(model, w1, x, y)  # the clean gradient of the one-pass step, by autograd here
    if loop == "closure":
        closure_steps(model, opt, data[1:])
    else:
        two_step(model, opt, data[1:], always_second_pass=loop == "second_pass_anyway")
    # g_v of step 0 from its own g and g_s, written out
    x0, y0 = data[0]
    g0 = gradients(model, w0, x0, y0)
    norm0 = torch.sqrt(sum((v**2).sum() for v in g0.values()))
    gs = gradients(model, {k: w0[k] + 0.1 * g0[k] / (norm0 + 1e-12) for k in w0}, x0, y0)
    c = sum((g0[k] * gs[k]).sum() for k in w0) / sum((g0[k] ** 2).sum() for k in w0)
    g_v = {k: gs[k] - c * g0[k] for k in w0}
    factor = (
        alpha
        * torch.sqrt(sum((v**2).sum() for v in g.values()))
        / (torch.sqrt(sum((v**2).sum() for v in g_v.values())) + 1e-12)
    )
    names = [k for k, _ in model.named_parameters()]
    for got, name in zip(seen[1], names):
        if alpha == 0.0:
            assert torch.equal(got, g[name])  # exactly g: once, not twice
        else:
            torch.testing.assert_close(got, g[name] + factor * g_v[name], rtol=0, atol=1e-12)
    assert opt.passes == 3.0


def test_a_loop_that_always_runs_the_second_pass_gets_the_same_weights():
    data = batches(6)
    model_a, model_b = mlp(), mlp()
    opt_a = LookSAM(model_a.parameters(), torch.optim.SGD, k=3, **RULE, **SGD_OPTIONS)
    opt_b = LookSAM(model_b.parameters(), torch.optim.SGD, k=3, **RULE, **SGD_OPTIONS)
    two_step(model_a, opt_a, data, always_second_pass=True)
    two_step(model_b, opt_b, data)
    assert same(model_a, model_b)
    assert opt_a.passes == opt_b.passes == 8.0  # the extra passes of the first loop were its own choice


def test_closure_api_equals_two_step_api():
    data = batches(5)
    model_a, model_b = mlp(), mlp()
    two_step(model_a, LookSAM(model_a.parameters(), torch.optim.SGD, k=2, **RULE, **SGD_OPTIONS), data)
    closure_steps(model_b, LookSAM(model_b.parameters(), torch.optim.SGD, k=2, **RULE, **SGD_OPTIONS), data)
    assert same(model_a, model_b)


@pytest.mark.parametrize("layerwise", [False, True])
def test_sam_step_one_micro_batch_equals_the_two_step_api_exactly(layerwise):
    data = batches(5)
    model_a, model_b = mlp(), mlp()
    opt_a = LookSAM(model_a.parameters(), torch.optim.SGD, k=2, layerwise=layerwise, **RULE, **SGD_OPTIONS)
    opt_b = LookSAM(model_b.parameters(), torch.optim.SGD, k=2, layerwise=layerwise, **RULE, **SGD_OPTIONS)
    two_step(model_a, opt_a, data)
    for x, y in data:
        sam_step(opt_b, model_b, loss_fn, x, y, micro_batches=1)
    assert same(model_a, model_b)


@pytest.mark.parametrize("layerwise", [False, True])
def test_micro_batches_equal_the_reference(layerwise):
    model, data = mlp(), batches(5, n=17)  # micro-batches of 9 and 8: the weights matter
    expected = reference_looksam_sgd(model, data, k=2, layerwise=layerwise, micro_batches=2, **RULE, **SGD_OPTIONS)
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=2, layerwise=layerwise, **RULE, **SGD_OPTIONS)
    for x, y in data:
        sam_step(opt, model, loss_fn, x, y, micro_batches=2)
    assert max_diff(model, expected) <= 1e-12


@pytest.mark.parametrize("layerwise", [False, True])
def test_vmap_backend_equals_the_loop(layerwise):
    data = batches(5)
    model_a, model_b = mlp(), mlp()
    opt_a = LookSAM(model_a.parameters(), torch.optim.SGD, k=2, layerwise=layerwise, **RULE, **SGD_OPTIONS)
    opt_b = LookSAM(model_b.parameters(), torch.optim.SGD, k=2, layerwise=layerwise, **RULE, **SGD_OPTIONS)
    for x, y in data:
        sam_step(opt_a, model_a, loss_fn, x, y, micro_batches=4, backend="loop")
        sam_step(opt_b, model_b, loss_fn, x, y, micro_batches=4, backend="vmap")
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)  # the loop weights by size, vmap takes means
    assert opt_a.passes == opt_b.passes == 8.0


@pytest.mark.parametrize("layerwise", [False, True])
def test_state_dict_round_trip_inside_a_k_cycle_continues_bit_exactly(layerwise):
    data = batches(5)
    options = dict(k=2, layerwise=layerwise, **RULE, lr=1e-2)
    straight = mlp()
    two_step(straight, LookSAM(straight.parameters(), torch.optim.Adam, **options), data)

    first = mlp()
    opt1 = LookSAM(first.parameters(), torch.optim.Adam, **options)
    two_step(first, opt1, data[:3])  # steps 0 and 2 were SAM steps: step 3 reuses step 2's g_v
    state = opt1.state_dict()
    snapshot = copy.deepcopy(state)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": state}, buffer)
    two_step(first, opt1, data[3:])  # training on must not change a state dict already taken
    assert all(torch.equal(a, b) for a, b in zip(state["sam"]["memory"]["g_v"], snapshot["sam"]["memory"]["g_v"]))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = mlp(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = LookSAM(resumed.parameters(), torch.optim.Adam, **options)
    opt2.load_state_dict(saved["opt"])
    assert opt2.will_perturb is False  # the next step is a one-pass step
    two_step(resumed, opt2, data[3:])
    assert same(straight, resumed)

    # without g_v the continuation differs: the round trip above is not vacuous
    forgetful = mlp(seed=5)
    forgetful.load_state_dict(saved["model"])
    opt3 = LookSAM(forgetful.parameters(), torch.optim.Adam, **options)
    opt3.load_state_dict(saved["opt"])
    opt3._step.memory.clear()
    two_step(forgetful, opt3, data[3:])
    assert not same(straight, forgetful)


@pytest.mark.parametrize("name,value", [("k", 3), ("alpha", 0.5), ("layerwise", True)])
def test_resume_with_other_options_is_refused(name, value):
    model = mlp()
    state = LookSAM(model.parameters(), torch.optim.SGD, lr=0.1).state_dict()
    other = LookSAM(model.parameters(), torch.optim.SGD, lr=0.1, **{name: value})
    with pytest.raises(ValueError, match=f"saved with {name}="):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must be an integer >= 1.* got 0"),
        (dict(k=2.5), "k must be an integer >= 1.* got 2.5"),
        (dict(k=True), "k must be an integer >= 1.* got True"),
        (dict(alpha=-0.1), "alpha must be .* got -0.1"),
        (dict(alpha=float("nan")), "alpha must be .* got nan"),
        (dict(alpha=float("inf")), "alpha must be .* got inf"),
        (dict(layerwise="yes"), "layerwise must be True or False, got 'yes'"),
        (dict(rho=-1.0), "rho must be .* got -1.0"),
        (dict(eps=-1.0), "eps must be .* got -1.0"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LookSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_interval_is_not_an_option():
    with pytest.raises(TypeError, match="does not take 'interval'"):
        LookSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, interval=2)
