"""CIFAR-10/100 python-version files: pixel layout, labels, search order, the no-download error, damaged files
and the restricted unpickler (tiny files written by tests/data/cifar_files.py)."""

import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from samkit.data import DatasetNotFoundError, cifar, load_dataset
from tests.data.cifar_files import py2_cifar_pickle, write_cifar10, write_cifar100

pytestmark = pytest.mark.filterwarnings("ignore:.*a partial or modified copy:UserWarning")


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $SAMKIT_DATA and an empty cache."""
    monkeypatch.delenv("SAMKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_cifar10_pixels_follow_the_documented_layout(isolated, tmp_path):
    files = write_cifar10(tmp_path / "d", per_batch=3, n_test=4)
    (x_train, y_train, x_test, y_test), classes = cifar.load_cifar_arrays("cifar10", tmp_path / "d")
    assert x_train.shape == (15, 3, 32, 32) and x_test.shape == (4, 3, 32, 32)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    raw = files["x_train"]
    # row j of a file: 1024 red values, then green, then blue; each 32 rows of 32 (documented format)
    for image, channel, row, col in [(0, 0, 0, 0), (4, 1, 1, 2), (14, 2, 31, 31), (7, 2, 5, 30)]:
        expected = raw[image, channel * 1024 + row * 32 + col] / 255.0
        assert float(x_train[image, channel, row, col]) == pytest.approx(expected, abs=1e-7)
    np.testing.assert_array_equal(y_train.numpy(), files["y_train"])  # batches 1..5 in order
    np.testing.assert_array_equal(y_test.numpy(), files["y_test"])
    assert float(x_test[3, 1, 0, 1]) == pytest.approx(files["x_test"][3, 1024 + 1] / 255.0, abs=1e-7)
    assert classes == [f"name{k}" for k in range(10)]


def test_cifar100_fine_and_coarse_labels(isolated, tmp_path):
    files = write_cifar100(tmp_path, n_train=8, n_test=4)
    fine = load_dataset("cifar100", data_dir=tmp_path)
    coarse = load_dataset("cifar100-coarse", data_dir=tmp_path)
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert fine.classes[:2] == ["fine0", "fine1"] and coarse.classes[-1] == "coarse19"
    np.testing.assert_array_equal(fine.y_test.numpy(), files["y_test"])
    np.testing.assert_array_equal(coarse.y_test.numpy(), files["coarse_test"])
    assert fine.x_train.shape == (8, 3, 32, 32) and fine.in_channels == 3 and fine.image_size == 32
    # normalized with the training split's per-channel statistics (float64 reference)
    pixels = files["x_train"].reshape(8, 3, 1024).astype(np.float64) / 255.0
    mean, std = pixels.mean(axis=(0, 2)), pixels.std(axis=(0, 2))
    np.testing.assert_allclose(fine.mean, mean, rtol=0, atol=1e-7)  # pixels are float32 (x / 255) before the sums
    expected = (files["x_test"].reshape(4, 3, 1024) / 255.0 - mean[None, :, None]) / std[None, :, None]
    np.testing.assert_allclose(fine.x_test.reshape(4, 3, 1024).numpy(), expected, rtol=0, atol=1e-5)


def test_without_meta_the_classes_are_numbered(isolated, tmp_path):
    write_cifar10(tmp_path, meta=False)
    assert load_dataset("cifar10", data_dir=tmp_path).classes == [str(k) for k in range(10)]


def test_search_order_data_dir_then_env_then_cache(isolated, monkeypatch, tmp_path):
    write_cifar10(tmp_path / "given", per_batch=1)
    write_cifar10(tmp_path / "env", per_batch=2)
    write_cifar10(tmp_path / "cache" / "samkit", per_batch=3)
    monkeypatch.setenv("SAMKIT_DATA", str(tmp_path / "env"))
    assert load_dataset("cifar10", data_dir=tmp_path / "given").x_train.shape[0] == 5
    # the batches folder itself may be given, too
    assert load_dataset("cifar10", data_dir=tmp_path / "given" / "cifar-10-batches-py").x_train.shape[0] == 5
    with pytest.warns(UserWarning, match=r"--data-dir .*empty.* holds no complete CIFAR-10; using .*env"):
        assert load_dataset("cifar10", data_dir=tmp_path / "empty").x_train.shape[0] == 10
    monkeypatch.delenv("SAMKIT_DATA")
    assert load_dataset("cifar10").x_train.shape[0] == 15


@pytest.mark.parametrize("name, url, folder", [
    ("cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py"),
    ("cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python"),
    ("cifar100-coarse", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python"),
])
def test_missing_data_says_where_to_put_it_and_downloads_nothing(isolated, tmp_path, name, url, folder):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, data_dir=tmp_path / "nowhere")
    message = str(info.value)
    for needle in (url, folder, "tar xzf", "--data-dir FOLDER", "SAMKIT_DATA", str(tmp_path / "nowhere"),
                   "downloads nothing"):
        assert needle in message, needle
    assert not (tmp_path / "cache").exists()


def test_an_incomplete_folder_names_the_missing_files(isolated, tmp_path):
    files = write_cifar10(tmp_path)
    (files["folder"] / "data_batch_3").unlink()
    (files["folder"] / "test_batch").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-batches-py lacks data_batch_3, test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_truncated_and_empty_files_are_errors_naming_the_file(isolated, tmp_path):
    files = write_cifar10(tmp_path)
    path = files["folder"] / "data_batch_2"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"data_batch_2' is truncated or damaged .*extract the official archive"):
        load_dataset("cifar10", data_dir=tmp_path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"data_batch_2' is empty"):
        load_dataset("cifar10", data_dir=tmp_path)


def _replace(folder, name, record):
    with open(folder / name, "wb") as f:
        pickle.dump(record, f, protocol=2)


@pytest.mark.parametrize("record, message", [
    ([1, 2, 3], r"holds a list, not the dict of a CIFAR data file"),
    ({"data": np.zeros((2, 3072), np.uint8)}, r"has no \['labels'\] entry"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1, 2]}, r"holds 2 images but 3 'labels'"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, r"'labels' in \[0, 10\]; they must be in \[0, 9\]"),
    ({"data": np.zeros((2, 3071), np.uint8), "labels": [0, 1]}, r"uint8 of shape \(2, 3071\).*\(N, 3072\)"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0.0, 1.0]}, r"'labels' must be a list of integer labels"),
    ({"data": np.zeros((2, 3072)), "labels": [0, 1]}, r"refused numpy dtype .*uint8 \('u1'\) arrays only"),
])
def test_files_that_are_not_what_cifar_holds(isolated, tmp_path, record, message):
    files = write_cifar10(tmp_path)
    _replace(files["folder"], "test_batch", record)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "test_batch" in str(info.value)


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_pickle_that_would_run_code_is_refused_before_running(isolated, tmp_path):
    files = write_cifar10(tmp_path)
    marker = tmp_path / "was_run"
    _replace(files["folder"], "data_batch_1", {"data": _Payload(str(marker)), "labels": [0]})
    with pytest.raises(ValueError, match=r"data_batch_1' is not a CIFAR file \(refused to load (os|posix)\.mkdir.*"
                                         r"nothing in it was run"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()
    # an ordinary pickle loader would have run it: the test's payload is real
    with open(files["folder"] / "data_batch_1", "rb") as f:
        pickle.load(f)
    assert marker.is_dir()


def test_official_counts_differ_warns(isolated, tmp_path):
    write_cifar10(tmp_path, per_batch=2)
    with pytest.warns(UserWarning, match=r"data_batch_1' holds 2 images where the official CIFAR-10 file holds 10000"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_unknown_cifar_name():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"unknown CIFAR dataset 'cifar1000'"):
            cifar.load_cifar_arrays("cifar1000")


def test_python2_pickles_like_the_official_files_load(isolated, tmp_path):
    files = write_cifar10(tmp_path, per_batch=3)
    data = np.random.default_rng(5).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    (files["folder"] / "data_batch_1").write_bytes(py2_cifar_pickle(data, [9, 0, 4]))
    (x_train, y_train, *_), _ = cifar.load_cifar_arrays("cifar10", tmp_path)
    assert y_train[:3].tolist() == [9, 0, 4]
    assert float(x_train[1, 2, 3, 4]) == pytest.approx(data[1, 2048 + 3 * 32 + 4] / 255.0, abs=1e-7)
