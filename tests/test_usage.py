"""The usage patterns documented in the README and the common SAM snippet run as written and mean what they say."""

from __future__ import annotations

import copy

import torch

from samkit import SAM, frozen_running_stats, sam_step
from tests.optim.reference import batch, loss_fn, mlp


def test_the_common_two_step_snippet_runs_as_written():
    model = mlp()
    loss_function = torch.nn.functional.cross_entropy
    data = [batch(seed=s) for s in range(3)]
    before = [p.detach().clone() for p in model.parameters()]

    # --- the common two-step usage snippet, verbatim apart from argument order of loss_function ---
    base_optimizer = torch.optim.SGD  # define an optimizer for the "sharpness-aware" update
    optimizer = SAM(model.parameters(), base_optimizer, lr=0.1, momentum=0.9)
    for input, output in data:
        # first forward-backward pass
        loss = loss_function(model(input), output)  # use this loss for any training statistics
        loss.backward()
        optimizer.first_step(zero_grad=True)
        # second forward-backward pass
        loss_function(model(input), output).backward()  # make sure to do a full forward pass
        optimizer.second_step(zero_grad=True)
    # ---
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_the_readme_hand_written_msam_loop_equals_sam_step():
    model, (inputs, targets) = mlp(), batch(n=24)
    twin = copy.deepcopy(model)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    reference = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    k = 4
    for _ in range(2):
        # --- the README pattern ---
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.zero_grad()
        for x, y in zip(inputs.chunk(k), targets.chunk(k)):
            clean = loss_fn(model(x), y)
            grads = torch.autograd.grad(clean, params, allow_unused=True)
            optimizer.first_step(grads=grads)
            with frozen_running_stats(model):
                (loss_fn(model(x), y) * len(x) / len(inputs)).backward()
            optimizer.restore()
        optimizer.second_step(zero_grad=True)
        # ---
        sam_step(reference, twin, loss_fn, inputs, targets, micro_batches=k)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_the_readme_accumulation_pattern_equals_shared_sam_step_and_plain_sam():
    model, (inputs, targets) = mlp(), batch(n=24)
    twin, plain = copy.deepcopy(model), copy.deepcopy(model)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    reference = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    whole = SAM(plain.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    k = 4
    for _ in range(2):
        # --- SAM with gradient accumulation: clean gradients first, one first_step, then the perturbed ones ---
        chunks = list(zip(inputs.chunk(k), targets.chunk(k)))
        for x, y in chunks:
            (loss_fn(model(x), y) * len(x) / len(inputs)).backward()
        optimizer.first_step(zero_grad=True)  # zero_grad: the perturbed gradients must not add to the clean ones
        for x, y in chunks:
            with frozen_running_stats(model):
                (loss_fn(model(x), y) * len(x) / len(inputs)).backward()
        optimizer.second_step(zero_grad=True)
        # ---
        sam_step(reference, twin, loss_fn, inputs, targets, micro_batches=k, perturbation="shared")
        loss_fn(plain(inputs), targets).backward()
        whole.first_step(zero_grad=True)
        loss_fn(plain(inputs), targets).backward()
        whole.second_step(zero_grad=True)
    for a, b, c in zip(model.parameters(), twin.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)  # accumulation sums in another order
