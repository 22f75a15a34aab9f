"""hessian_spectrum (stochastic Lanczos quadrature): weights, moments and nodes against the dense Hessian."""

from __future__ import annotations

import pytest
import torch

from samkit.sharpness import hessian_spectrum, hessian_trace
from samkit.sharpness.probes import make_generator, rademacher
from tests.sharpness.reference import dense_hessian, loss_fn, tiny_data, tiny_mlp, train


@pytest.fixture(scope="module")
def setup():
    model = tiny_mlp()
    x, y = tiny_data()
    train(model, x, y, steps=100)
    return model, (x, y), dense_hessian(model, [(x, y)])


def test_weights_are_a_probability_distribution(setup):
    model, data, _ = setup
    spectrum = hessian_spectrum(model, loss_fn, data, iterations=10, runs=3)
    assert spectrum.nodes.shape == spectrum.weights.shape == (30,)
    assert spectrum.hvps == 30
    assert torch.all(spectrum.weights >= 0)
    assert spectrum.weights.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_first_moment_is_the_hutchinson_trace_over_n(setup):
    # Σ τ_i θ_i = mean_r v_rᵀHv_r / n with the same Rademacher probes as hessian_trace (same seed).
    model, data, hessian = setup
    spectrum = hessian_spectrum(model, loss_fn, data, iterations=8, runs=5, seed=7)
    trace = hessian_trace(model, loss_fn, data, samples=5, seed=7)
    assert spectrum.moment(1) == pytest.approx(trace / spectrum.n, rel=1e-10)
    many = hessian_spectrum(model, loss_fn, data, iterations=2, runs=200)
    exact = torch.trace(hessian).item() / hessian.shape[0]
    assert many.moment(1) == pytest.approx(exact, rel=0.05)


def test_full_krylov_nodes_are_exact_eigenvalues_and_moments_exact(setup):
    model, data, hessian = setup
    n = hessian.shape[0]
    exact = torch.linalg.eigvalsh(hessian)
    spectrum = hessian_spectrum(model, loss_fn, data, iterations=n, runs=1, seed=4)
    for node, weight in zip(spectrum.nodes.tolist(), spectrum.weights.tolist()):
        if weight > 1e-8:
            assert (exact - node).abs().min().item() < 1e-8, node
    # The documented probe: the first Rademacher draw of the generator seeded with `seed`. Gauss quadrature
    # with m nodes is exact up to degree 2m − 1, so every moment is vᵀH^p v / n.
    v = rademacher(n, make_generator(4, torch.device("cpu")), dtype=torch.float64, device=torch.device("cpu"))
    for power in (0, 1, 2, 3):
        expected = (v @ torch.linalg.matrix_power(hessian, power) @ v).item() / n
        assert spectrum.moment(power) == pytest.approx(expected, rel=1e-9), power


def test_density_integrates_to_one_and_peaks_at_nodes(setup):
    model, data, _ = setup
    spectrum = hessian_spectrum(model, loss_fn, data, iterations=10, runs=2)
    grid = spectrum.grid(4000)
    density = spectrum.density(grid)
    assert torch.all(density >= 0)
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-4)
    sigma = 0.05
    one_node = spectrum.density([float(spectrum.nodes[0])], sigma=sigma).item()
    assert one_node >= spectrum.weights[0].item() / (sigma * (2 * torch.pi) ** 0.5) - 1e-12


def test_seeded(setup):
    model, data, _ = setup
    a = hessian_spectrum(model, loss_fn, data, iterations=5, seed=1)
    b = hessian_spectrum(model, loss_fn, data, iterations=5, seed=1)
    c = hessian_spectrum(model, loss_fn, data, iterations=5, seed=2)
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)
