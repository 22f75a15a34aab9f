"""Every refusal of the family leaves the optimizer as it was, and names the bad value and the fix.

A refused ``first_step`` (wrong ``grads=``, a sparse or complex gradient it cannot use, a non-finite norm or w + ε̂,
a call out of turn) leaves the phase, the step's clean gradient, the variant's running state, the weights and the
counters as before the call: the next step is the one a twin that never saw the refusal takes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import samkit
from samkit import SAM, sam_step
from samkit.optim.esam import ESAM
from samkit.optim.ksam import KSAM
from tests.optim.family import FAMILY, model
from tests.optim.reference import batch, loss_fn

# the members whose first step perturbs (LateSAM and Momentum-SAM start with one-pass steps)
PERTURBING = [name for name in FAMILY if name not in ("late-sam", "momentum-sam")]


def snapshot(opt, net) -> dict:
    state = opt._step
    return dict(
        phase=state.phase,
        counters=(state.steps, state.sam_steps, state.passes),
        clean=None if state.clean is None else [None if c is None else c.clone() for c in state.clean],
        memory=copy.deepcopy(state.memory),
        weights=[t.detach().clone() for t in net.parameters()],
        grads=[None if t.grad is None else t.grad.clone() for t in net.parameters()],
        base=copy.deepcopy(opt.base_optimizer.state_dict()["state"]),
    )


def assert_same(a, b) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert _equal(a[key], b[key]), key


def _equal(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and bool(torch.equal(x, y))
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(_equal(u, v) for u, v in zip(x, y))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    return x == y


def clean_grads(net, x, y):
    net.zero_grad(set_to_none=True)
    loss_fn(net(x), y).backward()
    return [t.grad.clone() for t in net.parameters()]


def refusals():
    """name -> (how to break the step's gradients, expected error, message); each is refused by first_step."""

    def wrong_length(grads):
        return dict(grads=grads[:-1])

    def sparse(grads):
        return dict(grads=[grads[0].to_sparse(), *grads[1:]])

    def non_finite(grads):
        bad = [g.clone() for g in grads]
        bad[2][0] = float("nan")  # a LayerNorm weight: SAM-ON perturbs it too
        return dict(grads=bad)

    return {
        "wrong length": (wrong_length, ValueError, "grads has 5 entries but the optimizer has 6 parameters"),
        "sparse": (sparse, RuntimeError, r"sparse gradients \(parameter 0, shape \(8, 4\)\).*sparse=False"),
        "non-finite": (non_finite, FloatingPointError, "nan"),
    }


@pytest.mark.parametrize("name", PERTURBING)
@pytest.mark.parametrize("refusal", list(refusals()))
@pytest.mark.parametrize("when", ["first call", "second micro-batch"])
def test_a_refused_first_step_leaves_the_optimizer_as_before(name, refusal, when):
    x, y = batch(n=24)
    net, twin = model(), model()
    opt, opt_twin = FAMILY[name](net), FAMILY[name](twin)
    for o, m in ((opt, net), (opt_twin, twin)):  # complete steps first (momenta and running state exist), up to
        for _ in range(3):  # a step that perturbs (interval=2 and LookSAM's k=2 make the second one-pass)
            loss_fn(m(x), y).backward()
            if o.first_step(zero_grad=True):
                loss_fn(m(x), y).backward()
            o.second_step(zero_grad=True)
            if o.will_perturb is not False:
                break
    grads, twin_grads = clean_grads(net, x[:12], y[:12]), clean_grads(twin, x[:12], y[:12])
    if when == "second micro-batch":  # mSAM: one micro-batch done, the refusal on the next
        for o, m, g in ((opt, net, grads), (opt_twin, twin, twin_grads)):
            m.zero_grad(set_to_none=True)
            if not o.first_step(grads=g, weight=0.5):
                pytest.fail(f"{name}'s second step does not perturb: the case tests nothing")
            loss_fn(m(x[:12]), y[:12]).backward()
            o.restore()
    breaking, error, message = refusals()[refusal]
    before = snapshot(opt, net)
    with pytest.raises(error, match=message):
        opt.first_step(**breaking(grads))
    assert_same(snapshot(opt, net), before)
    # and the optimizer goes on exactly as the twin that never saw the refusal
    for o, m, g in ((opt, net, grads), (opt_twin, twin, twin_grads)):
        if when == "first call":
            m.zero_grad(set_to_none=True)
        if o.first_step(grads=g, weight=0.5 if when != "first call" else 1.0):
            loss_fn(m(x[12:]), y[12:]).backward()
        o.second_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))
    assert (opt.steps, opt.sam_steps, opt.passes) == (opt_twin.steps, opt_twin.sam_steps, opt_twin.passes)


def test_after_a_sparse_refusal_second_step_is_refused_not_a_plain_step():
    w, table = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(5, 2))
    opt = SAM([w, table], torch.optim.SGD, lr=0.1)
    w.grad, table.grad = torch.ones(3), torch.ones(5, 2).to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients \(parameter 1, shape \(5, 2\)\)"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    assert torch.equal(w.detach(), torch.ones(3)) and opt.steps == 0


@pytest.mark.parametrize("refusal", ["wrong length", "sparse", "non-finite"])
def test_after_decide_and_a_refused_first_step_second_step_takes_no_plain_step(refusal):
    x, y = batch()
    net = model()
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1)
    grads = clean_grads(net, x, y)
    assert opt.decide(grads)
    breaking, error, message = refusals()[refusal]
    with pytest.raises(error, match=message):
        opt.first_step(**breaking(grads))
    weights = [t.detach().clone() for t in net.parameters()]
    with pytest.raises(RuntimeError, match="second_step\\(\\) in a SAM step without an ascent.*cancel_step"):
        opt.second_step()
    assert all(torch.equal(t, w) for t, w in zip(net.parameters(), weights)) and opt.steps == 0
    opt.first_step(grads=grads)  # the step is still decided: its first_step goes on
    opt.second_step()
    assert opt.steps == 1 and opt.sam_steps == 1


@pytest.mark.parametrize("phase", ["perturbed", "one-pass"])
def test_a_first_step_out_of_turn_leaves_the_step_in_progress(phase):
    x, y = batch()
    net = model()
    opt = FAMILY["interval"](net)
    if phase == "one-pass":  # interval=2: the second step is a one-pass step
        loss_fn(net(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(net(x), y).backward()
        opt.second_step(zero_grad=True)
    loss_fn(net(x), y).backward()
    opt.first_step()
    before = snapshot(opt, net)
    with pytest.raises(RuntimeError, match="first_step\\(\\) called twice"):
        opt.first_step()
    assert_same(snapshot(opt, net), before)


# ----------------------------------------------------------------------------------------------------------------
# options that must be numbers, not bools or strings


def build_kwargs(cls, net):
    required = {samkit.SAMOn: dict(model=net), samkit.AESAM: dict(total_steps=6), KSAM: dict(k=0.5)}
    return required.get(cls, {})


def float_options():
    """(class, option, extra kwargs) for every option of the family that takes a real number."""
    classes = [samkit.SAM, samkit.FriendlySAM, samkit.LookSAM, samkit.GSAM, samkit.SAMOn, samkit.RandomSAM]
    classes += [samkit.AESAM, samkit.LateSAM, samkit.MomentumSAM, ESAM, KSAM]
    import inspect

    cases = []
    for cls in classes:
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if isinstance(parameter.default, float) or name == "p":
                cases.append((cls, name, {}))
    # the float options that default to None, with what they need beside them
    cases += [
        (samkit.GSAM, "rho_min", dict(lr_max=0.1, lr_min=0.0)),
        (samkit.GSAM, "lr_max", dict(rho_min=0.01, lr_min=0.0)),
        (samkit.GSAM, "lr_min", dict(rho_min=0.01, lr_max=0.1)),
        (samkit.RandomSAM, "prob_end", dict(schedule="linear", total_steps=10)),
        (samkit.LateSAM, "sam_fraction", dict(total_steps=10)),
        (KSAM, "k", {}),
    ]
    return cases


@pytest.mark.parametrize("bad", [True, False, "0.1"], ids=["True", "False", "string"])
@pytest.mark.parametrize(
    "cls,option,extra", float_options(), ids=[f"{c.__name__}-{o}" for c, o, _ in float_options()]
)
def test_a_float_option_refuses_a_bool_or_a_string_and_names_it(cls, option, extra, bad):
    net = model()
    kwargs = {**build_kwargs(cls, net), **extra, option: bad}
    if cls is samkit.LateSAM and option != "sam_fraction":
        kwargs.setdefault("start_step", 3)
    with pytest.raises((ValueError, TypeError), match=f"{option}.*{bad!r}".replace("(", r"\(")):
        cls(net.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize("option", ["rho", "p", "eta", "adaptive"])
def test_a_param_group_option_refuses_a_bool_in_add_param_group(option):
    opt = SAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1)
    bad = 1 if option == "adaptive" else True
    with pytest.raises(ValueError, match=f"{option} must be .*got {bad!r}"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], option: bad})


@pytest.mark.parametrize("bad", [True, "1.0", 0.0, float("nan")], ids=["True", "string", "zero", "nan"])
def test_max_grad_norm_refuses_bools_strings_and_non_positive_values(bad):
    x, y = batch()
    net = model()
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1)
    before = [t.detach().clone() for t in net.parameters()]
    with pytest.raises(ValueError, match=f"max_grad_norm must be > 0, a number.*got {bad!r}"):
        sam_step(opt, net, loss_fn, x, y, max_grad_norm=bad)
    loss_fn(net(x), y).backward()
    opt.first_step(zero_grad=True)
    loss_fn(net(x), y).backward()
    with pytest.raises(ValueError, match=f"max_grad_norm must be > 0, a number.*got {bad!r}"):
        opt.second_step(max_grad_norm=bad)
    opt.cancel_step()
    assert all(torch.equal(t, w) for t, w in zip(net.parameters(), before)) and opt.steps == 0


# ----------------------------------------------------------------------------------------------------------------
# complex parameters and sparse gradients


@pytest.mark.parametrize("p", [3.0, math.inf])
@pytest.mark.parametrize("foreach", [True, False])
def test_complex_parameters_with_p_other_than_2_are_refused_naming_the_parameter(p, foreach):
    real, z = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    opt = SAM([real, z], torch.optim.SGD, lr=0.1, p=p, foreach=foreach)
    real.grad, z.grad = torch.ones(3), torch.ones(2, dtype=torch.complex64)
    message = rf"p={p!r} \(param group 0\) is not defined for the complex parameter 1 \(shape \(2,\).*use p=2"
    with pytest.raises(ValueError, match=message):
        opt.first_step()
    assert torch.equal(real.detach(), torch.ones(3)) and not opt.perturbed
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()


def test_complex_parameters_with_p_2_perturb_as_their_real_and_imaginary_parts():
    z = torch.nn.Parameter(torch.tensor([1 + 2j, -3 + 0.5j], dtype=torch.complex128))
    pairs = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    g = torch.tensor([0.3 - 0.4j, 1.2 + 0.0j], dtype=torch.complex128)
    opts = [SAM([t], torch.optim.SGD, lr=0.1, rho=0.5, eps=0.0) for t in (z, pairs)]
    z.grad, pairs.grad = g.clone(), torch.view_as_real(g).clone()
    for opt in opts:
        opt.first_step()
    norm = math.sqrt(0.3**2 + 0.4**2 + 1.2**2)
    expected = torch.view_as_real(z.detach().new_tensor([1 + 2j, -3 + 0.5j]) + 0.5 * g / norm)
    torch.testing.assert_close(torch.view_as_real(z.detach()), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(pairs.detach(), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("mode", ["per_micro_batch", "shared"])
def test_sam_step_with_sparse_gradients_names_the_parameter_and_the_fix(micro_batches, mode):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(10, 3, sparse=True), torch.nn.Flatten(), torch.nn.Linear(6, 1))
    before = [t.detach().clone() for t in net.parameters()]
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1)
    x, y = torch.randint(0, 10, (4, 2)), torch.randn(4, 1)
    message = r"sparse gradients \(parameter of shape \(10, 3\)\).*nn.Embedding\(..., sparse=False\)"
    with pytest.raises(RuntimeError, match=message):
        sam_step(opt, net, torch.nn.functional.mse_loss, x, y, micro_batches=micro_batches, perturbation=mode)
    assert all(torch.equal(t, w) for t, w in zip(net.parameters(), before))
    assert opt.phase.value == "ready" and opt.steps == 0


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_sam_step_with_complex_parameters_and_p_inf_names_the_parameter(backend):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))

    class Complex(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return (x.to(torch.complex64) * self.weight).sum(-1).abs()

    net = Complex()
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1, p=math.inf)
    x, y = torch.randn(4, 3), torch.randn(4)
    with pytest.raises(ValueError, match=r"complex parameter 0 \(shape \(3,\), torch.complex64\).*use p=2"):
        sam_step(opt, net, torch.nn.functional.mse_loss, x, y, backend=backend)
    assert not opt.perturbed and opt.steps == 0
