"""The foreach ε̂ path against the plain per-tensor loop, including edge cases."""

from __future__ import annotations

import copy

import pytest
import torch

from samkit import SAM
from samkit.optim.perturbation import PerturbationGroup, dual_exponent, perturbation


def random_groups(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (0,), (7,), (2, 2, 2)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return [
        PerturbationGroup(params[:2], grads[:2], rho=0.05),
        PerturbationGroup(params[2:3], grads[2:3], rho=0.1, adaptive=True, eta=0.01),
        PerturbationGroup(params[3:], grads[3:], rho=0.2, p=3),
        PerturbationGroup([], [], rho=0.3, p=float("inf"), adaptive=True),
    ]


def test_foreach_equals_loop_on_mixed_groups():
    groups = random_groups()
    fast, fast_norm = perturbation(groups, foreach=True)
    slow, slow_norm = perturbation(groups, foreach=False)
    assert [len(e) for e in fast] == [2, 1, 1, 0]
    assert fast[0][1].shape == (0,)
    for a_group, b_group in zip(fast, slow):
        for a, b in zip(a_group, b_group):
            torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
    torch.testing.assert_close(fast_norm, slow_norm, rtol=1e-15, atol=0)


def test_p_classes_have_their_own_global_norm():
    groups = random_groups()
    epsilons, _ = perturbation(groups, eps=0.0)
    # the p = 2 class spans groups 0 and 1 (adaptive scales by T = |w| + eta): ||T^-1 ε̂||_2 per rho
    t = (groups[1].params[0].abs() + 0.01).flatten()
    scaled = torch.cat([epsilons[0][0].flatten() / 0.05, epsilons[1][0].flatten() / t / 0.1])
    assert torch.linalg.vector_norm(scaled).item() == pytest.approx(1.0, rel=1e-12)
    assert torch.linalg.vector_norm(epsilons[2][0], 3).item() == pytest.approx(0.2, rel=1e-12)


def test_dual_exponent():
    assert dual_exponent(2.0) == 2.0
    assert dual_exponent(3.0) == pytest.approx(1.5)
    assert dual_exponent(float("inf")) == 1.0


@pytest.mark.parametrize("p", [2, 3, float("inf")])
def test_sam_foreach_and_loop_agree_with_zero_size_and_gradless_params(p):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)).double()
    empty = torch.nn.Parameter(torch.zeros(0, dtype=torch.float64))
    no_grad = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    params_a = list(model.parameters()) + [empty, no_grad]
    model_b = copy.deepcopy(model)
    empty_b, no_grad_b = copy.deepcopy(empty), copy.deepcopy(no_grad)
    params_b = list(model_b.parameters()) + [empty_b, no_grad_b]
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    opts = [
        SAM(params_a, torch.optim.SGD, p=p, lr=0.1, momentum=0.9, foreach=True),
        SAM(params_b, torch.optim.SGD, p=p, lr=0.1, momentum=0.9, foreach=False),
    ]
    for _ in range(3):
        for m, e, opt in ((model, empty, opts[0]), (model_b, empty_b, opts[1])):
            loss = torch.nn.functional.cross_entropy(m(x), y) + e.sum()
            loss.backward()
            opt.first_step(zero_grad=True)
            (torch.nn.functional.cross_entropy(m(x), y) + e.sum()).backward()
            opt.second_step(zero_grad=True)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    assert torch.equal(no_grad, torch.ones(3, dtype=torch.float64)) and no_grad.grad is None


@pytest.mark.parametrize("foreach", [True, False])
def test_out_receives_the_same_values_even_when_it_is_the_params(foreach):
    groups = random_groups()
    expected, expected_norm = perturbation(groups, foreach=foreach)
    targets = [[torch.empty_like(g) for g in group.grads] for group in groups]
    written, norm = perturbation(groups, foreach=foreach, out=targets)
    assert written is targets or all(a is b for wa, wb in zip(written, targets) for a, b in zip(wa, wb))
    for a_group, b_group in zip(targets, expected):
        for a, b in zip(a_group, b_group):
            assert torch.equal(a, b)
    assert torch.equal(norm, expected_norm)
    # aliasing: ε̂ written over the parameters it is computed from (adaptive groups read |w|)
    aliased = random_groups()
    perturbation(aliased, foreach=foreach, out=[list(g.params) for g in aliased])
    for group, eps in zip(aliased, expected):
        for param, e in zip(group.params, eps):
            assert torch.equal(param, e)


def test_sam_gets_new_saved_buffers_after_the_model_changes_dtype():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.0)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    opt.restore()
    opt.cancel_step()
    model.double()  # same Parameter objects, new dtype
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.mse_loss(model(x.double()), y.double()).backward()
    opt.first_step(zero_grad=True)
    opt.restore()
    assert all(torch.equal(p, b) and p.dtype == torch.float64 for p, b in zip(model.parameters(), before))
