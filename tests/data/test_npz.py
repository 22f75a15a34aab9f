"""--data npz:PATH: the accepted layouts and dtypes give the same images, and every bad file is an error that
names the file, the key and the fix."""

import json

import numpy as np
import pytest
import torch

from samkit.cli import main
from samkit.data import DatasetNotFoundError, check_dataset_name, load_dataset
from samkit.data.npz import load_npz_arrays

RNG = np.random.default_rng(0)
X_NCHW = RNG.integers(0, 256, size=(6, 3, 5, 5), dtype=np.uint8)  # channels first, uint8
X_TEST = RNG.integers(0, 256, size=(4, 3, 5, 5), dtype=np.uint8)
Y = np.array([0, 1, 2, 0, 1, 2])
Y_TEST = np.array([2, 1, 0, 0])


def save(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def good(**changes):
    arrays = {"x_train": X_NCHW, "y_train": Y, "x_test": X_TEST, "y_test": Y_TEST}
    arrays.update(changes)
    return {key: value for key, value in arrays.items() if value is not None}


def test_channels_first_and_last_give_the_same_images(tmp_path):
    first = load_npz_arrays(save(tmp_path / "nchw.npz", **good()))
    last = load_npz_arrays(save(tmp_path / "nhwc.npz", **good(x_train=X_NCHW.transpose(0, 2, 3, 1),
                                                               x_test=X_TEST.transpose(0, 2, 3, 1))))
    (x_train, y_train, x_test, y_test), classes = first
    assert x_train.shape == (6, 3, 5, 5) and x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    # pixel (image 4, channel 2, row 1, col 3) of the NCHW array, / 255
    assert float(x_train[4, 2, 1, 3]) == pytest.approx(X_NCHW[4, 2, 1, 3] / 255.0, abs=1e-7)
    for a, b in zip(first[0], last[0]):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(y_test.numpy(), Y_TEST)
    assert classes == ["0", "1", "2"]


def test_grey_images_and_float_pixels(tmp_path):
    grey = X_NCHW[:, 0].astype(np.float64) / 255.0  # (N, H, W) floats on [0, 1]
    (x_train, *_), _ = load_npz_arrays(save(tmp_path / "g.npz", **good(x_train=grey, x_test=X_TEST[:, 0])))
    assert x_train.shape == (6, 1, 5, 5)
    np.testing.assert_allclose(x_train[:, 0].numpy(), grey, rtol=0, atol=1e-7)


def test_class_names_and_a_normalized_dataset(tmp_path):
    spec = save(tmp_path / "n.npz", **good(classes=np.array(["cat", "dog", "eel", "fox"])))
    ds = load_dataset(spec, val_fraction=0.5, seed=1)
    assert ds.classes == ["cat", "dog", "eel", "fox"] and ds.num_classes == 4
    assert ds.x_train.shape == (3, 3, 5, 5) and ds.x_val.shape == (3, 3, 5, 5) and ds.x_test.shape == (4, 3, 5, 5)
    train = X_NCHW[ds.train_indices.numpy()].astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.mean, train.mean(axis=(0, 2, 3)), rtol=0, atol=1e-7)


@pytest.mark.parametrize("changes, message", [
    ({"y_test": None}, r"missing \['y_test'\], unknown \[\]"),
    ({"X_val": X_TEST}, r"unknown \['X_val'\]"),
    ({"y_train": Y[:5]}, r"y_train has shape \(5,\); expected \(6,\), one label per image of x_train"),
    ({"y_train": Y - 1}, r"y_train has label -1; labels must be >= 0"),
    ({"y_train": Y.astype(np.float32)}, r"y_train has dtype float32; labels must be integers: convert with"),
    ({"x_train": X_NCHW.astype(np.int16)}, r"x_train has dtype int16; .*convert with x.astype\(np.uint8\)"),
    ({"x_train": X_NCHW.astype(np.float32)}, r"float pixels in \[0, 255\]; floats must be on \[0, 1\].*divide"),
    ({"x_train": np.where(np.arange(6)[:, None, None, None] == 4, np.nan, np.full((6, 3, 5, 5), 0.5))},
     r"x_train has 75 NaN or infinite values \(first in image 4\)"),  # all 3 x 5 x 5 values of image 4
    ({"x_train": X_NCHW[:, :, :, :4]}, r"x_train has shape \(6, 3, 5, 4\); accepted: .*square images"),
    ({"x_train": X_NCHW[:, :2]}, r"x_train has shape \(6, 2, 5, 5\); accepted: .*C in \(1, 3\)"),
    ({"x_train": X_NCHW[:, :, :3, :3], "x_test": X_TEST[:, :, :3, :3]}, r"both \(N, H, W, C\) and \(N, C, H, W\)"),
    ({"x_train": X_NCHW[:, 0, 0]}, r"x_train has 2 dimensions"),
    ({"x_test": X_TEST[:, :1]}, r"x_train images are .* \(3, 5, 5\) but x_test images are \(1, 5, 5\)"),
    ({"x_train": np.zeros((3, 7, 5), np.uint8), "y_train": Y[:3]}, r"holds 7x5 images; .*square"),
    ({"y_train": Y * 0, "y_test": Y_TEST * 0}, r"the labels name 1 class; classification needs at least 2"),
    ({"classes": np.array(["a", "b"])}, r"has label 2 but classes names 2 classes"),
    ({"classes": np.array([1, 2, 3])}, r"classes must be a 1-D string array"),
])
def test_bad_arrays_are_errors_naming_the_file_and_the_fix(tmp_path, changes, message):
    path = tmp_path / "bad.npz"
    with pytest.raises(ValueError, match=message) as info:
        load_npz_arrays(save(path, **good(**changes)))
    assert str(path) in str(info.value)


def test_pickled_objects_truncated_files_and_missing_files(tmp_path):
    spec = save(tmp_path / "obj.npz", **good(y_train=np.array([0, 1, "x", None, 1, 2], dtype=object)))
    with pytest.raises(ValueError, match=r"holds pickled Python objects, which samkit does not load"):
        load_npz_arrays(spec)
    spec = save(tmp_path / "cut.npz", **good())
    path = tmp_path / "cut.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut.npz' is not a readable .npz file"):
        load_npz_arrays(spec)
    with pytest.raises(DatasetNotFoundError, match=r"no file .*absent.npz.*np.savez"):
        load_npz_arrays(f"npz:{tmp_path / 'absent.npz'}")
    with pytest.raises(ValueError, match=r"names no file: write npz:PATH"):
        check_dataset_name("npz:")


def test_train_runs_on_an_npz_file(tmp_path, capsys):
    spec = save(tmp_path / "mine.npz", **good())
    out = tmp_path / "run"
    args = ["train", "--data", spec, "--model", "cnn", "--epochs", "1", "--batch-size", "3", "--device", "cpu",
            "--quiet", "--out", str(out)]
    assert main(args) in (0, 1)  # 1: finished but flagged (e.g. collapsed): 6 random images teach nothing
    assert json.loads((out / "config.json").read_text())["data"] == spec
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and summary["prediction_counts"] is not None
    assert main([*args[:2], "npz:" + str(tmp_path / "nope.npz"), *args[3:-1], str(tmp_path / "r2")]) == 2
    assert "no file" in capsys.readouterr().err
