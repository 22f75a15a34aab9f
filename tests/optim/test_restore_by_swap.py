"""SAM(restore_by="swap") against the default copy path: the same numbers bit for bit, w's own storage after."""

from __future__ import annotations

import pytest
import torch

from samkit import SAM, sam_step
from tests.optim.reference import batch, loss_fn, mlp

OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def train(restore_by, *, foreach=True, steps=5, **sam_options):
    model, (x, y) = mlp(), batch()
    opt = SAM(model.parameters(), torch.optim.SGD, restore_by=restore_by, foreach=foreach, **sam_options, **OPTIONS)
    perturbed = []
    for _ in range(steps):
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        perturbed.append([p.detach().clone() for p in model.parameters()])
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return model, perturbed


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "sam_options",
    [dict(rho=0.05), dict(rho=0.5, adaptive=True, eta=0.01), dict(rho=0.05, p=float("inf")), dict(rho=0.05, p=3)],
)
def test_swap_equals_copy_bit_for_bit(foreach, sam_options):
    copied, copied_perturbed = train("copy", foreach=foreach, **sam_options)
    swapped, swapped_perturbed = train("swap", foreach=foreach, **sam_options)
    for a, b in zip(copied.parameters(), swapped.parameters()):
        assert torch.equal(a, b)
    for step_a, step_b in zip(copied_perturbed, swapped_perturbed):  # w + ε̂ too, at every step
        assert all(torch.equal(a, b) for a, b in zip(step_a, step_b))
    assert not torch.equal(next(copied.parameters()), next(mlp().parameters()))  # the weights moved


def test_swap_uses_a_second_buffer_and_gives_w_its_own_storage_back():
    model, (x, y) = mlp(), batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.0, restore_by="swap")
    pointers = [p.data_ptr() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model(x), y).backward()
    opt.first_step()
    assert all(p.data_ptr() != q for p, q in zip(model.parameters(), pointers))  # w + ε̂ lives elsewhere
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.restore()
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_swap_refuses_a_non_finite_gradient_without_touching_the_weights():
    model, (x, y) = mlp(), batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, restore_by="swap")
    loss_fn(model(x), y).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    before = [(p.data_ptr(), p.detach().clone()) for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="nan"):
        opt.first_step()
    assert all(p.data_ptr() == ptr and torch.equal(p, b) for p, (ptr, b) in zip(model.parameters(), before))


@pytest.mark.parametrize("perturbation", ["per_micro_batch", "shared"])
def test_sam_step_with_swap_equals_copy(perturbation):
    results = []
    for restore_by in ("copy", "swap"):
        model, (x, y) = mlp(), batch()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, restore_by=restore_by, **OPTIONS)
        for _ in range(3):
            sam_step(opt, model, loss_fn, x, y, micro_batches=4, perturbation=perturbation)
        results.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
