"""fp16 and bf16 parameters: ε̂ is computed in float32 and written only when finite.

In fp16 the gradient norm overflows above 65504, rho / norm overflows below a norm of about 1e-5 (rho = 0.05),
eps = 1e-12 rounds to 0, and ASAM's T² overflows above |w| = 256. The references below are the formulas of
docs/algorithms.md in float64, from the same (rounded) low-precision gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

import samkit
from samkit import SAM, sam_step
from samkit.optim.perturbation import PerturbationGroup, perturbation

LOW = [torch.float16, torch.bfloat16]
PATHS = [dict(foreach=True), dict(foreach=False), dict(restore_by="swap")]


def reference_epsilon(w, g, rho, p=2.0, adaptive=False, eta=0.0):
    """ε̂ in float64 from the formula: T = |w| + eta (adaptive) or 1, g~ = T g, ε̂ = T rho d / ||g~||_q^(q/p)."""
    w, g = w.double(), g.double()
    t = w.abs() + eta if adaptive else torch.ones_like(w)
    scaled = t * g
    if math.isinf(p):
        return rho * t * torch.sign(scaled)
    q = p / (p - 1.0)
    direction = torch.sign(scaled) * scaled.abs() ** (q - 1.0)
    return rho * t * direction / (scaled.abs() ** q).sum() ** (1.0 / p)


def assert_rounded_from(got, expected, dtype):
    """got is expected rounded to dtype (twice at most: ε̂, then w + ε̂): within 2 units of dtype's precision."""
    assert got.dtype == dtype and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), expected, rtol=2 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("path", PATHS, ids=["foreach", "per-tensor", "swap"])
@pytest.mark.parametrize("p", [2.0, 3.0, math.inf])
def test_a_tiny_gradient_moves_the_weights_by_the_float64_epsilon(dtype, path, p):
    # ||g|| ~ 2.6e-6: its square underflows fp16 and eps = 1e-12 is 0 there, so an fp16 rho / (||g|| + eps) is
    # inf; the weights start at 0 so that w + ε̂ = ε̂ exactly
    w = torch.nn.Parameter(torch.zeros(100, dtype=dtype))
    opt = SAM([w], torch.optim.SGD, lr=0.1, p=p, **path)
    w.grad = torch.full_like(w, 1e-7)
    w.grad[:50] = -3e-7
    assert opt.first_step()
    assert_rounded_from(w.detach(), reference_epsilon(torch.zeros(100), w.grad, 0.05, p), dtype)
    opt.second_step()
    assert bool(torch.isfinite(w).all())


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("path", PATHS, ids=["foreach", "per-tensor", "swap"])
def test_a_gradient_norm_above_65504_is_finite_and_gives_the_float64_epsilon(dtype, path):
    w = torch.nn.Parameter(torch.zeros(100, dtype=dtype))
    opt = SAM([w], torch.optim.SGD, lr=0.1, **path)
    w.grad = torch.full_like(w, 3e4)  # each entry fits fp16; the norm, 3e5, does not
    assert opt.first_step()  # not "the gradient norm in first_step is inf"
    assert_rounded_from(w.detach(), reference_epsilon(torch.zeros(100), w.grad, 0.05), dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("path", PATHS, ids=["foreach", "per-tensor", "swap"])
def test_adaptive_scale_of_large_weights_is_not_squared_in_half_precision(dtype, path):
    start = torch.full((100,), 300.0, dtype=dtype)  # T² = 90000 > 65504
    w = torch.nn.Parameter(start.clone())
    opt = SAM([w], torch.optim.SGD, lr=0.1, rho=0.5, adaptive=True, **path)
    w.grad = torch.linspace(-1, 1, 100, dtype=dtype)
    assert opt.first_step()
    expected = start.double() + reference_epsilon(start, w.grad, 0.5, adaptive=True)
    assert_rounded_from(w.detach(), expected, dtype)
    opt.second_step()


@pytest.mark.parametrize("dtype", LOW)
def test_perturbation_returns_epsilon_in_the_gradients_dtype_with_a_float32_norm(dtype):
    g = torch.full((100,), 1e-7, dtype=dtype)
    group = PerturbationGroup(params=[torch.zeros(100, dtype=dtype)], grads=[g], rho=0.05)
    for foreach in (True, False):
        (epsilons,), norm = perturbation([group], foreach=foreach)
        assert norm is not None and norm.dtype == torch.float32
        torch.testing.assert_close(norm.double(), g.double().norm(), rtol=1e-6, atol=0)
        assert_rounded_from(epsilons[0], reference_epsilon(torch.zeros(100), g, 0.05), dtype)


@pytest.mark.parametrize("path", PATHS, ids=["foreach", "per-tensor", "swap"])
def test_a_non_finite_w_plus_epsilon_is_refused_and_the_weights_stay(path):
    # ε̂ itself is finite (|ε̂| = rho = 20) but 65504 + 20 is not an fp16 number: what is written is checked
    w = torch.nn.Parameter(torch.tensor([65504.0, 1.0], dtype=torch.float16))
    other = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = SAM([other, w], torch.optim.SGD, lr=0.1, rho=20.0, p=math.inf, **path)
    other.grad, w.grad = torch.ones_like(other), torch.ones_like(w)
    message = r"w \+ ε̂ is not finite in parameter 1 \(shape \(2,\), torch.float16\)"
    with pytest.raises(FloatingPointError, match=message):
        opt.first_step()
    assert torch.equal(w.detach(), torch.tensor([65504.0, 1.0], dtype=torch.float16))
    assert torch.equal(other.detach(), torch.ones(3, dtype=torch.float16))
    assert not opt.perturbed
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_sam_step_on_a_half_precision_model_with_a_tiny_gradient(dtype, backend):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).to(dtype)
    w, b = (t.detach().double() for t in model.parameters())
    lr, c = 5e4, 1e-6  # ||g|| ~ 3e-6 (fp16 subnormal gradients), an update of ~0.07 that the test can see
    opt = SAM(model.parameters(), torch.optim.SGD, lr=lr)
    x = torch.ones(2, 4, dtype=dtype)

    def loss_fn(outputs, targets):
        return (outputs.squeeze(1) ** 2).mean() * c

    sam_step(opt, model, loss_fn, x, torch.zeros(2), backend=backend)

    def gradient(w, b):  # of c * mean((w x + b)²) over the two (equal) examples
        out = (w @ x[0].double() + b).squeeze()
        return 2 * c * out * x[0].double()[None], 2 * c * out.reshape(1)

    gw, gb = gradient(w, b)
    norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
    sw, sb = gradient(w + 0.05 * gw / norm, b + 0.05 * gb / norm)
    for t, expected in zip(model.parameters(), (w - lr * sw, b - lr * sb)):
        assert bool(torch.isfinite(t).all())
        # fp16 rounds the subnormal gradients to ~4%: a seventh of the update is the tolerance
        torch.testing.assert_close(t.detach().double(), expected, rtol=0, atol=0.01)
    assert (model.weight.detach().double() - w).abs().min() > 0.03  # the update did happen


@pytest.mark.parametrize("foreach", [True, False])
def test_ae_sam_reads_a_half_precision_gradient_norm_above_65504(foreach):
    w = torch.nn.Parameter(torch.zeros(100, dtype=torch.float16))
    opt = samkit.AESAM([w], torch.optim.SGD, lr=0.1, total_steps=5, foreach=foreach)
    w.grad = torch.full_like(w, 3e4)
    opt.first_step()  # not "the squared gradient norm in first_step is inf"
    _, mean, variance = opt._step.memory["pending"]
    # ||g||² = 100 * 3e4² = 9e10 enters the EMA with weight 1 - delta = 0.1; the initial mean is 0
    assert mean == pytest.approx(0.1 * 9e10, rel=1e-6) and math.isfinite(variance)


def _descent_gradients(name: str, dtype: torch.dtype, foreach: bool) -> list[torch.Tensor]:
    """The gradient the base optimizer receives in 2 steps of GSAM or LookSAM (k = 2: a SAM step, then a step
    that reuses g_v) from gradients of about 1e-4, whose squares vanish in fp16."""
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(64, generator=generator, dtype=torch.float64) * 1e-4 for _ in range(4)]
    w = torch.nn.Parameter(torch.ones(64, dtype=dtype))
    options = dict(rho=0.05, lr=0.1, foreach=foreach)
    if name == "gsam":
        optimizer: SAM = samkit.GSAM([w], torch.optim.SGD, alpha=0.2, **options)
    else:
        optimizer = samkit.LookSAM([w], torch.optim.SGD, k=2, alpha=0.7, **options)
    seen: list[torch.Tensor] = []
    optimizer.base_optimizer.register_step_pre_hook(lambda *_: seen.append(w.grad.double().clone()))
    for step in range(2):
        w.grad = gradients[2 * step].to(dtype)
        if optimizer.first_step(zero_grad=True):
            w.grad = gradients[2 * step + 1].to(dtype)
        optimizer.second_step(zero_grad=True)
    return seen


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", ["gsam", "looksam"])
def test_the_variants_own_norms_and_inner_products_of_tiny_fp16_gradients(name, foreach):
    """GSAM's ⟨g, g_s⟩ and ||g_s||, LookSAM's projection and ||g|| / ||g_v||, taken in float32 for fp16 gradients:
    the descent gradients equal the float64 run's to fp16's rounding (in fp16 the squares vanish: GSAM would drop
    its ascent-direction term, LookSAM its reused direction)."""
    low, wide = _descent_gradients(name, torch.float16, foreach), _descent_gradients(name, torch.float64, foreach)
    assert len(low) == len(wide) == 2
    for got, expected in zip(low, wide):
        assert (got - expected).norm() <= 4 * torch.finfo(torch.float16).eps * expected.norm(), (got, expected)
