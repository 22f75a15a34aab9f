"""loss_landscape: filter normalization, the grid's center, grid values against an independent loss, plots."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samkit.sharpness import Landscape, hessian_eigenvalues, loss_landscape, plot_landscapes
from samkit.sharpness.plotting import landscape_figure
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


def bowl(dims: int, offset: float = 0.5, steps: int = 5) -> Landscape:
    """A hand-made landscape, lowest at coords (offset, −offset): not at the center, so both marks show."""
    coords = torch.linspace(-1, 1, steps, dtype=torch.float64)
    if dims == 1:
        losses = (coords - offset) ** 2 + 0.1
    else:
        losses = (coords[:, None] - offset) ** 2 + (coords[None, :] + offset) ** 2 + 0.1
    center = float(losses[(steps // 2,) * dims])
    return Landscape(coords=coords, losses=losses, center_loss=center, dims=dims, span=1.0, directions=[])


def marker_lines(ax, marker):
    return [line for line in ax.get_lines() if line.get_marker() == marker]


def test_2d_picture_has_contour_and_surface_labelled_with_the_marks():
    lands = [bowl(2), bowl(2, offset=0.0)]
    figure = landscape_figure(lands, ["SGD", "SAM"])
    flat = [ax for ax in figure.axes if ax.get_xlabel().startswith("step along direction 1")]
    surfaces = [ax for ax in figure.axes if ax.name == "3d"]
    assert len(flat) == 2 and len(surfaces) == 2
    colorbars = [ax for ax in figure.axes if ax not in flat and ax not in surfaces]
    assert len(colorbars) == 2 and all(ax.get_ylabel().startswith("loss") for ax in colorbars)
    for ax, land, title in zip(flat, lands, ["SGD", "SAM"]):
        assert ax.get_ylabel().startswith("step along direction 2") and ax.get_title().startswith(title)
        assert len(ax.collections) > 0  # the filled contour and its lines
        (star,) = marker_lines(ax, "*")
        assert list(star.get_xdata()) == [0.0] and list(star.get_ydata()) == [0.0]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend[0] == f"model weights w, L(w) = {land.center_loss:.4g}"
    # the first bowl's lowest grid point is (0.5, -0.5), away from w: marked with an X on the contour
    (lowest,) = marker_lines(flat[0], "X")
    assert list(lowest.get_xdata()) == [0.5] and list(lowest.get_ydata()) == [-0.5]
    assert marker_lines(flat[1], "X") == []  # the second's lowest point IS w: nothing more to mark
    for ax in surfaces:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_zlabel() == "loss"
        assert any(type(c).__name__ == "Poly3DCollection" for c in ax.collections)
        assert "model weights w" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "lowest grid point" in [t.get_text() for t in surfaces[0].get_legend().get_texts()]
    assert surfaces[0].get_zlim() == surfaces[1].get_zlim()  # one z-scale for the side-by-side columns


def test_1d_picture_is_labelled_with_the_marks():
    land = bowl(1)
    figure = landscape_figure([land, bowl(1, offset=0.0)], ["SGD", "SAM"])
    assert len(figure.axes) == 2
    ax = figure.axes[0]
    assert ax.get_xlabel().startswith("step along direction 1") and ax.get_ylabel() == "loss"
    assert ax.get_title() == "SGD"
    curve = [line for line in ax.get_lines() if len(line.get_xdata()) == 5]
    assert curve and list(curve[0].get_ydata()) == land.losses.tolist()
    (star,) = marker_lines(ax, "*")
    assert list(star.get_xdata()) == [0.0] and list(star.get_ydata()) == [land.center_loss]
    (lowest,) = marker_lines(ax, "X")
    assert list(lowest.get_xdata()) == [0.5] and list(lowest.get_ydata()) == [0.1]
    assert figure.axes[0].get_ylim() == figure.axes[1].get_ylim()
