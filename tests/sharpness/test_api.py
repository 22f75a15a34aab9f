"""The public API of samkit.sharpness as documented: signatures, defaults, return types, data forms."""

from __future__ import annotations

import inspect

import pytest
import torch

from samkit.sharpness import (
    Landscape,
    Spectrum,
    flatness_report,
    hessian_eigenvalues,
    hessian_spectrum,
    hessian_trace,
    loss_landscape,
    m_sharpness,
)
from tests.sharpness.reference import loss_fn, tiny_data, tiny_mlp, train

# The public signatures: (model, loss_fn, data[, k]) then keyword-only options with these defaults.
SIGNATURES = {
    hessian_eigenvalues: ({"k": 1}, {"tol": 1e-6, "max_iter": 100, "seed": 0}),
    hessian_trace: ({}, {"samples": 100, "seed": 0}),
    hessian_spectrum: ({}, {"iterations": 80, "runs": 1, "seed": 0}),
    m_sharpness: ({}, {"rho": 0.05, "micro_batch_size": 128, "kind": "worst", "adaptive": False, "steps": 5,
                       "seed": 0}),
    loss_landscape: ({}, {"dims": 2, "steps": 41, "span": 1.0, "seed": 0}),
}


@pytest.mark.parametrize("function", list(SIGNATURES), ids=lambda f: f.__name__)
def test_signature_and_defaults(function):
    positional, keyword = SIGNATURES[function]
    parameters = inspect.signature(function).parameters
    names = list(parameters)
    assert names[:3] == ["model", "loss_fn", "data"]
    for name in names[:3]:
        assert parameters[name].default is inspect.Parameter.empty
    for name, default in positional.items():
        assert parameters[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and parameters[name].default == default
    for name, default in keyword.items():
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert parameters[name].default == default and type(parameters[name].default) is type(default), name
    # every function: eval mode unless asked
    assert parameters["train_mode"].kind is inspect.Parameter.KEYWORD_ONLY and parameters["train_mode"].default is False


@pytest.fixture(scope="module")
def trained():
    model = tiny_mlp()
    x, y = tiny_data(size=24)
    train(model, x, y, steps=100)
    return model, [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]


def test_return_types(trained):
    model, batches = trained
    values = hessian_eigenvalues(model, loss_fn, batches, k=3)
    assert isinstance(values, torch.Tensor) and values.dtype == torch.float64 and values.shape == (3,)
    assert values.device.type == "cpu" and bool(torch.all(values[:-1] >= values[1:]))
    assert type(hessian_trace(model, loss_fn, batches, samples=3)) is float
    spectrum = hessian_spectrum(model, loss_fn, batches, iterations=6)
    assert isinstance(spectrum, Spectrum) and spectrum.nodes.shape == spectrum.weights.shape == (6,)
    assert spectrum.density(torch.linspace(-1, 1, 7, dtype=torch.float64)).shape == (7,)
    assert type(m_sharpness(model, loss_fn, batches, micro_batch_size=4)) is float
    land = loss_landscape(model, loss_fn, batches, dims=1, steps=3)
    assert isinstance(land, Landscape) and land.coords.shape == land.losses.shape == (3,)
    assert callable(land.plot)


CALLS = {
    "eigenvalues": lambda d: hessian_eigenvalues(tiny_mlp(), loss_fn, d, k=2).tolist(),
    "trace": lambda d: hessian_trace(tiny_mlp(), loss_fn, d, samples=3),
    "spectrum": lambda d: hessian_spectrum(tiny_mlp(), loss_fn, d, iterations=4).nodes.tolist(),
    "m_sharpness": lambda d: m_sharpness(tiny_mlp(), loss_fn, d, micro_batch_size=4, kind="average"),
    "landscape": lambda d: loss_landscape(tiny_mlp(), loss_fn, d, dims=1, steps=3).losses.tolist(),
    "report": lambda d: flatness_report(tiny_mlp(), loss_fn, d, k=2, micro_batch_size=4, trace_samples=2),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_one_shot_generator_is_read_once(name):
    # A generator can be iterated once; every measurement passes over data many times (the report runs
    # four measurements), so it must be read into a list first and give what the list gives, exactly.
    x, y = tiny_data(size=24)
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    assert CALLS[name](b for b in batches) == CALLS[name](batches)
