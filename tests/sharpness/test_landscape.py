"""loss_landscape: filter normalization, the grid's center, grid values against an independent loss, plots."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samkit.sharpness import hessian_eigenvalues, loss_landscape, plot_landscapes
from tests.sharpness.reference import flat_weights, loss_at, loss_fn, tiny_data, tiny_mlp, train


class ConvNet(nn.Module):
    """Conv (4-D weights) + BN (1-D) + Linear (2-D) + biases: every normalization case."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def conv_setup():
    model = ConvNet().double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 1, 4, 4, generator=g, dtype=torch.float64)
    return model, (x, torch.randint(0, 3, (10,), generator=g))


def test_directions_are_filter_normalized_and_zero_on_biases_and_bn():
    model, data = conv_setup()
    land = loss_landscape(model, loss_fn, data, dims=2, steps=3)
    params = list(model.parameters())
    for direction in land.directions:
        offset = 0
        for p in params:
            piece = direction[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.dim() <= 1:
                assert torch.equal(piece, torch.zeros_like(p))
                continue
            for filter_d, filter_w in zip(piece, p.detach()):
                assert filter_d.norm().item() == pytest.approx(filter_w.norm().item(), rel=1e-12)
    assert not torch.equal(land.directions[0], land.directions[1])


@pytest.mark.parametrize("dims", [1, 2])
def test_center_is_the_loss_at_the_weights(dims):
    model = tiny_mlp()
    x, y = tiny_data()
    with torch.no_grad():
        expected = loss_fn(model.eval()(x), y).item()
    land = loss_landscape(model, loss_fn, (x, y), dims=dims, steps=5, span=0.5)
    assert land.losses.shape == (5,) * dims
    assert land.coords.tolist() == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert land.losses[(2,) * dims].item() == expected  # bit for bit: the center IS the weights
    assert land.center_loss == expected


def test_grid_values_against_an_independent_loss():
    model = tiny_mlp()
    x, y = tiny_data()
    land = loss_landscape(model, loss_fn, (x, y), dims=2, steps=3, span=0.7)
    w0 = flat_weights(model)
    d1, d2 = land.directions
    for i, a in enumerate((-0.7, 0.0, 0.7)):
        for j, b in enumerate((-0.7, 0.0, 0.7)):
            expected = loss_at(model, w0 + a * d1 + b * d2, [(x, y)]).item()
            assert land.losses[i, j].item() == pytest.approx(expected, rel=1e-12), (i, j)


def test_curvature_along_the_top_eigenvector_is_lambda_max():
    model = tiny_mlp()
    x, y = tiny_data()
    train(model, x, y, steps=100)
    values, info = hessian_eigenvalues(model, loss_fn, (x, y), k=1, info=True)
    h = 1e-3
    land = loss_landscape(model, loss_fn, (x, y), dims=1, steps=3, span=h, directions=[info.eigenvectors[0]])
    curvature = (land.losses[0] + land.losses[2] - 2 * land.losses[1]).item() / h**2
    assert curvature == pytest.approx(values[0].item(), rel=1e-4)
    assert land.normalization == "none"


def test_seeded_directions():
    model, data = conv_setup()
    a = loss_landscape(model, loss_fn, data, dims=1, steps=3, seed=1)
    b = loss_landscape(model, loss_fn, data, dims=1, steps=3, seed=1)
    c = loss_landscape(model, loss_fn, data, dims=1, steps=3, seed=2)
    assert torch.equal(a.losses, b.losses) and not torch.equal(a.losses, c.losses)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs_atomically(tmp_path):
    model, data = conv_setup()
    curve = loss_landscape(model, loss_fn, data, dims=1, steps=5)
    surface = loss_landscape(model, loss_fn, data, dims=2, steps=5)
    one = curve.plot(tmp_path / "sub" / "one.png", title="conv")
    both = plot_landscapes({"SGD": surface, "SAM": surface}, tmp_path / "both.png")
    for path in (one, both):
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["both.png", "one.png"]  # no temp files
    assert surface.as_dict()["losses"] == surface.losses.tolist()


def test_plot_errors(tmp_path):
    model, data = conv_setup()
    one = loss_landscape(model, loss_fn, data, dims=1, steps=3)
    two = loss_landscape(model, loss_fn, data, dims=2, steps=3)
    with pytest.raises(ValueError, match="must end in .png, got '.*x.jpg'"):
        one.plot(tmp_path / "x.jpg")
    with pytest.raises(ValueError, match=r"same dims .* got dims \[1, 2\]"):
        plot_landscapes([one, two], tmp_path / "x.png")
    with pytest.raises(ValueError, match="landscapes is empty"):
        plot_landscapes([], tmp_path / "x.png")
    assert not any(tmp_path.iterdir())
