"""PNG pictures of landscapes and spectra, readable by a person and comparable side by side.

Plots use matplotlib's object API with the Agg canvas (no pyplot state, no backend switch in the
caller's process) and are written atomically: a temporary file in the target folder, then os.replace.

    2-D landscape:  per model one column: filled contour (log color scale when every loss is > 0)
                    above a 3-D surface; all columns share levels and z-limits
    1-D landscape:  per model one column: loss against the step along the direction; shared y-axis
    marks:          the model weights w (center, red star, with L(w)) and the lowest grid point (white X)
    spectrum:       the Gaussian-broadened SLQ density on a log axis
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure


def _png_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"the picture is written as PNG, so path must end in .png, got {str(path)!r}")
    return path


def save_png(figure: Figure, path) -> Path:
    """Write ``figure`` to ``path`` atomically (temporary file, then ``os.replace``)."""
    path = _png_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            figure.savefig(handle, format="png", dpi=110)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _axis_label(landscape, which: int) -> str:
    kind = " (filter-normalized)" if landscape.normalization == "filter" else ""
    return f"step along direction {which}{kind}"


def _mark_minimum(ax, landscape, losses: np.ndarray, coords: np.ndarray) -> None:
    """A red star at the weights w (the center) and an x at the lowest grid point when it lies elsewhere."""

    def position(index: tuple) -> tuple[list, list]:
        if landscape.dims == 2:
            return [coords[index[0]]], [coords[index[1]]]
        return [coords[index[0]]], [losses[index]]

    center = (landscape.center,) * landscape.dims
    lowest = tuple(
        int(i) for i in np.unravel_index(np.argmin(np.where(np.isfinite(losses), losses, np.inf)), losses.shape)
    )
    ax.plot(
        *position(center),
        marker="*",
        color="red",
        markersize=14,
        linestyle="none",
        label=f"model weights w, L(w) = {landscape.center_loss:.4g}",
    )
    if lowest != center:
        ax.plot(
            *position(lowest),
            marker="X",  # filled, white with a black edge: visible on dark and light colors and in the legend
            markerfacecolor="white",
            markeredgecolor="black",
            markeredgewidth=0.8,
            markersize=11,
            linestyle="none",
            label=f"lowest grid point, L = {losses[lowest]:.4g}",
        )
    ax.legend(loc="upper right", fontsize=8, framealpha=0.8)


def _levels(all_losses: Sequence[np.ndarray]):
    finite = np.concatenate([x[np.isfinite(x)].ravel() for x in all_losses])
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        high = low + max(abs(low), 1.0) * 1e-6
    if low > 0:
        return np.geomspace(low, high, 30), LogNorm(vmin=low, vmax=high), low, high
    return np.linspace(low, high, 30), None, low, high


def _plot_2d(figure: Figure, landscapes, titles) -> None:
    from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  (registers the 3-D projection)

    count = len(landscapes)
    arrays = [land.losses.numpy() for land in landscapes]
    levels, norm, low, high = _levels(arrays)
    for column, (land, losses, title) in enumerate(zip(landscapes, arrays, titles)):
        coords = land.coords.numpy()
        # losses[i, j] is at (coords[i], coords[j]): "ij" meshes put direction 1 on the x axis, no transpose.
        x, y = np.meshgrid(coords, coords, indexing="ij")
        shown = np.clip(np.where(np.isfinite(losses), losses, high), low, high)
        ax = figure.add_subplot(2, count, column + 1)
        filled = ax.contourf(x, y, shown, levels=levels, norm=norm, cmap="viridis")
        ax.contour(x, y, shown, levels=levels[::3], colors="black", linewidths=0.4)
        label = "loss" + (" (log color scale)" if norm is not None else "")
        figure.colorbar(filled, ax=ax, label=label, ticks=levels[::4], format="%.3g")
        ax.set_xlabel(_axis_label(land, 1))
        ax.set_ylabel(_axis_label(land, 2))
        ax.set_aspect("equal")
        ax.set_title(f"{title}\ncontour of the loss" if title else "contour of the loss")
        _mark_minimum(ax, land, losses, coords)
        # computed_zorder=False: the markers are drawn over the surface instead of hidden under it
        surface = figure.add_subplot(2, count, count + column + 1, projection="3d", computed_zorder=False)
        surface.plot_surface(
            x, y, shown, cmap="viridis", norm=norm, linewidth=0, antialiased=True, alpha=0.9, zorder=1
        )
        surface.scatter(
            [0.0], [0.0], [land.center_loss], color="red", marker="*", s=160, depthshade=False, zorder=3,
            edgecolors="white", linewidths=0.8, label="model weights w",
        )
        lowest = np.unravel_index(np.argmin(np.where(np.isfinite(losses), losses, np.inf)), losses.shape)
        if tuple(int(i) for i in lowest) != (land.center,) * 2:
            surface.scatter(
                [coords[lowest[0]]], [coords[lowest[1]]], [losses[lowest]], color="white", marker="X", s=90,
                depthshade=False, zorder=3, edgecolors="black", linewidths=0.8, label="lowest grid point",
            )
        surface.set_zlim(low, high)
        surface.set_xlabel("direction 1")
        surface.set_ylabel("direction 2")
        surface.set_zlabel("loss", labelpad=10)
        try:
            surface.set_box_aspect(None, zoom=0.85)  # room for the z label inside the column
        except TypeError:  # matplotlib < 3.6 has no zoom: the label may touch the column's edge
            pass
        surface.set_title("surface of the loss" + (" (same z-scale in every column)" if count > 1 else ""))
        surface.legend(loc="upper left", fontsize=8)


def _plot_1d(figure: Figure, landscapes, titles) -> None:
    count = len(landscapes)
    arrays = [land.losses.numpy() for land in landscapes]
    _, _, low, high = _levels(arrays)
    first = None
    for column, (land, losses, title) in enumerate(zip(landscapes, arrays, titles)):
        coords = land.coords.numpy()
        ax = figure.add_subplot(1, count, column + 1, sharey=first)
        first = first or ax
        ax.plot(coords, losses, color="tab:blue", linewidth=1.8)
        _mark_minimum(ax, land, losses, coords)
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        ax.set_xlabel(_axis_label(land, 1))
        ax.set_ylabel("loss")
        ax.set_title(title or "loss along one direction")
        ax.grid(alpha=0.3)


def plot_landscapes(
    landscapes: Union[Mapping[str, Any], Sequence[Any]],  # of Landscape (landscape.py imports this module)
    path,
    *,
    titles: Optional[Sequence[str]] = None,
) -> Path:
    """Side-by-side PNG of several landscapes of the same ``dims`` on shared scales (e.g. SGD vs SAM).

    Args:
        landscapes: ``{"SGD": land_sgd, "SAM": land_sam}`` or a list of ``Landscape``.
        path: the PNG to write (atomically); its folder is created.
        titles: column titles for a list (the mapping's keys otherwise).

    Returns:
        The path written.
    """
    if isinstance(landscapes, Mapping):
        titles, landscapes = list(landscapes.keys()), list(landscapes.values())
    landscapes = list(landscapes)
    if not landscapes:
        raise ValueError("landscapes is empty; pass at least one Landscape")
    titles = list(titles) if titles is not None else [""] * len(landscapes)
    if len(titles) != len(landscapes):
        raise ValueError(f"titles has {len(titles)} entries for {len(landscapes)} landscapes")
    dims = {land.dims for land in landscapes}
    if len(dims) != 1:
        raise ValueError(f"landscapes must all have the same dims to share a picture, got dims {sorted(dims)}")
    _png_path(path)
    return save_png(landscape_figure(landscapes, titles), path)


def landscape_figure(landscapes: Sequence[Any], titles: Sequence[str]) -> Figure:
    """The matplotlib Figure that ``plot_landscapes`` writes (one column per landscape, same ``dims``)."""
    if {land.dims for land in landscapes} == {2}:
        figure = Figure(figsize=(6.0 * len(landscapes), 10.5))
        _plot_2d(figure, landscapes, titles)
    else:
        figure = Figure(figsize=(5.5 * len(landscapes), 4.5))
        _plot_1d(figure, landscapes, titles)
    figure.tight_layout()
    return figure


def plot_spectrum(spectrum, path, *, title: Optional[str] = None, sigma: Optional[float] = None) -> Path:
    """PNG of an SLQ eigenvalue density (log scale), the largest node marked."""
    grid = spectrum.grid(2000, sigma=sigma)
    density = spectrum.density(grid, sigma=sigma).numpy()
    figure = Figure(figsize=(6.5, 4.5))
    ax = figure.add_subplot(1, 1, 1)
    floor = max(float(density.max()) * 1e-6, 1e-300)  # below a millionth of the peak is quadrature noise
    ax.semilogy(grid.numpy(), np.maximum(density, floor), color="tab:blue")
    ax.set_ylim(bottom=floor)
    top = float(spectrum.nodes.max())
    ax.axvline(top, color="red", linestyle="--", linewidth=1, label=f"largest node {top:.4g}")
    ax.set_xlabel("eigenvalue of the Hessian")
    ax.set_ylabel("density (Gaussian-broadened, log scale)")
    ax.set_title(title or f"Hessian eigenvalue density (SLQ, {spectrum.runs} run(s) × {spectrum.iterations} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return save_png(figure, path)
