"""The PNGs: written, and epochs on the x axis are whole numbers (a 3-epoch run has no epoch 1.25)."""

import pytest

from samkit.experiments import run_figures

ROWS = [
    {"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5, "test_loss": 1.2 / e, "test_acc": 0.4,
     "lambda_max": 10.0 * e, "lambda_ratio": 2.0}
    for e in (1, 2, 3)
]  # fmt: skip


@pytest.mark.parametrize("draw", [run_figures.learning_curves, run_figures.hessian_evolution])
def test_run_plots_have_whole_epoch_ticks(tmp_path, monkeypatch, draw):
    figures = []
    real_save = run_figures._save
    monkeypatch.setattr(run_figures, "_save", lambda figure, path: figures.append(figure) or real_save(figure, path))
    path = draw(ROWS, tmp_path / "plot.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for axis in figures[0].axes:
        low, high = axis.get_xlim()
        ticks = [t for t in axis.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_the_error_bar_chart_says_its_bars_are_95_percent_intervals(tmp_path, monkeypatch):
    figures = []
    real_save = run_figures._save
    monkeypatch.setattr(run_figures, "_save", lambda figure, path: figures.append(figure) or real_save(figure, path))
    rows = [{"label": "SGD", "mean": 10.0, "half_width": 1.0}, {"label": "SAM", "mean": 9.0, "half_width": 0.5}]
    run_figures.error_bars(rows, tmp_path / "bars.png", title="SGD, SAM on digits: test error")
    axis = figures[0].axes[0]
    assert "95 % CI" in axis.get_ylabel() and axis.get_title() == "SGD, SAM on digits: test error"
