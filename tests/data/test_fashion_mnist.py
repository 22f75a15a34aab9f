"""Fashion-MNIST: the installed files, the search order, the offline error and the checksummed download."""

import gzip
import hashlib
import io
import urllib.error
import warnings

import numpy as np
import pytest

from samkit.data import DatasetNotFoundError, load_dataset, read_idx
from samkit.data import fashion_mnist as fm


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $SAMKIT_DATA, an empty system folder and cache, and a network that must not be used."""
    monkeypatch.delenv("SAMKIT_DATA", raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []

    def offline(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(fm, "urlopen", offline)
    return calls


def test_installed_test_set_reads_with_the_right_shapes():
    found = fm.find_files(fm.SYSTEM_DIR)
    assert found is not None, f"no Fashion-MNIST in {fm.SYSTEM_DIR}: apt-get install dataset-fashion-mnist"
    images = read_idx(found["t10k-images-idx3-ubyte"])
    labels = read_idx(found["t10k-labels-idx1-ubyte"])
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 1000))
    assert images.max() == 255 and images.min() == 0


def test_search_order_data_dir_then_env_then_system(isolated, monkeypatch, tmp_path, write_fake_fashion):
    write_fake_fashion(tmp_path / "given", n_train=11)
    write_fake_fashion(tmp_path / "env" / "fashion-mnist", n_train=12)  # the subfolder layout
    write_fake_fashion(tmp_path / "system", n_train=13, compressed=False)  # raw, uncompressed names
    monkeypatch.setenv("SAMKIT_DATA", str(tmp_path / "env"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the named folder is used: nothing to warn about
        assert load_dataset("fashion-mnist", data_dir=tmp_path / "given").x_train.shape[0] == 11
    assert load_dataset("fashion-mnist").x_train.shape[0] == 12  # no --data-dir: $SAMKIT_DATA first
    monkeypatch.delenv("SAMKIT_DATA")
    assert load_dataset("fashion-mnist").x_train.shape[0] == 13
    assert isolated == []  # no download attempted


def test_torchvision_layout_and_cache_are_found(isolated, tmp_path, write_fake_fashion):
    write_fake_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", n_train=14)
    assert load_dataset("fashion-mnist", data_dir=tmp_path / "tv").x_train.shape[0] == 14
    write_fake_fashion(tmp_path / "cache" / "samkit" / "fashion-mnist", n_train=15)
    assert load_dataset("fashion-mnist").x_train.shape[0] == 15


def test_loaded_values_match_the_files(isolated, tmp_path, write_fake_fashion):
    arrays = write_fake_fashion(tmp_path / "d", n_train=20, n_test=7)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path / "d")
    pixels = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255.0
    mean, std = pixels.mean(), pixels.std()
    expected_test = (arrays["t10k-images-idx3-ubyte"].astype(np.float64) / 255.0 - mean) / std
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(), expected_test, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.classes[0] == "T-shirt/top" and ds.num_classes == 10 and ds.image_size == 28


def test_offline_error_says_how_to_get_it(isolated, tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    for needle in ("apt-get install dataset-fashion-mnist", fm.FASHION_URLS[0], "--data-dir", "SAMKIT_DATA",
                   str(tmp_path / "system"), "no network in this test"):
        assert needle in message
    assert isolated and all(timeout == fm.DOWNLOAD_TIMEOUT_S == 10.0 for _, timeout in isolated)


def test_download_disabled_never_touches_the_network(isolated):
    with pytest.raises(DatasetNotFoundError, match="download disabled"):
        load_dataset("fashion-mnist", download=False)
    assert isolated == []


def _serve(monkeypatch, files):
    def fake_urlopen(url, timeout=None):
        return io.BytesIO(files[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(fm, "urlopen", fake_urlopen)


def test_download_verifies_checksums_and_caches(isolated, monkeypatch, tmp_path, write_fake_fashion):
    write_fake_fashion(tmp_path / "server", n_train=16)
    served = {p.name: p.read_bytes() for p in (tmp_path / "server").iterdir()}
    checksums = {name[:-3]: hashlib.md5(blob).hexdigest() for name, blob in served.items()}
    monkeypatch.setattr(fm, "FASHION_FILES", checksums)
    _serve(monkeypatch, served)
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape[0] == 16
    cached = sorted(p.name for p in (tmp_path / "cache" / "samkit" / "fashion-mnist").iterdir())
    assert cached == sorted(served)  # the four files, no leftover temp file


def test_download_rejects_a_file_with_the_wrong_checksum(isolated, monkeypatch, tmp_path, write_fake_fashion):
    write_fake_fashion(tmp_path / "server")
    served = {p.name: p.read_bytes() for p in (tmp_path / "server").iterdir()}
    _serve(monkeypatch, served)  # right format, but not the published files: the official MD5s do not match
    with pytest.raises(DatasetNotFoundError, match="checksum mismatch") as info:
        load_dataset("fashion-mnist")
    assert fm.FASHION_FILES["train-images-idx3-ubyte"] in str(info.value)
    cache = tmp_path / "cache" / "samkit" / "fashion-mnist"
    assert list(cache.iterdir()) == []  # nothing half-written or unverified is kept


def test_damaged_files_are_errors_naming_the_file(isolated, tmp_path, write_fake_fashion):
    folder = tmp_path / "d"
    write_fake_fashion(folder)
    labels = folder / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-3]))
    with pytest.raises(ValueError, match="truncated") as info:
        load_dataset("fashion-mnist", data_dir=folder)
    assert str(labels) in str(info.value)


def test_label_count_and_range_are_checked(isolated, tmp_path, write_fake_fashion, idx_bytes):
    folder = tmp_path / "d"
    write_fake_fashion(folder, n_test=6)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(0x08, (5,), bytes(5))))
    with pytest.raises(ValueError, match=r"labels of shape \(6,\)"):
        load_dataset("fashion-mnist", data_dir=folder)
    labels.write_bytes(gzip.compress(idx_bytes(0x08, (6,), bytes([0, 1, 2, 3, 10, 4]))))
    with pytest.raises(ValueError, match="label 10"):
        load_dataset("fashion-mnist", data_dir=folder)


def test_images_must_be_28x28(isolated, tmp_path, write_fake_fashion, idx_bytes):
    folder = tmp_path / "d"
    write_fake_fashion(folder, n_test=6)
    images = folder / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(idx_bytes(0x08, (6, 32, 32), bytes(6 * 32 * 32))))
    with pytest.raises(ValueError, match=r"shape \(6, 32, 32\)") as info:
        load_dataset("fashion-mnist", data_dir=folder)
    assert str(images) in str(info.value)


def test_download_keeps_verified_files_and_fetches_only_the_rest(isolated, monkeypatch, tmp_path, write_fake_fashion):
    write_fake_fashion(tmp_path / "server")
    served = {p.name: p.read_bytes() for p in (tmp_path / "server").iterdir()}
    checksums = {name[:-3]: hashlib.md5(blob).hexdigest() for name, blob in served.items()}
    monkeypatch.setattr(fm, "FASHION_FILES", checksums)
    cache = tmp_path / "cache" / "samkit" / "fashion-mnist"
    cache.mkdir(parents=True)
    (cache / "train-images-idx3-ubyte.gz").write_bytes(served["train-images-idx3-ubyte.gz"])  # verified: kept
    (cache / "t10k-images-idx3-ubyte.gz").write_bytes(b"half a download")  # wrong MD5: fetched again
    fetched = []

    def fake_urlopen(url, timeout=None):
        fetched.append(url.rsplit("/", 1)[1])
        return io.BytesIO(served[fetched[-1]])

    monkeypatch.setattr(fm, "urlopen", fake_urlopen)
    assert load_dataset("fashion-mnist").x_test.shape[0] == 6
    assert sorted(fetched) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_a_data_dir_without_the_four_files_is_an_error_naming_the_missing_ones(isolated, tmp_path, write_fake_fashion):
    # another complete copy is on the search path: the run must not train on it while its config names the folder
    write_fake_fashion(tmp_path / "system", n_train=13)
    partial = tmp_path / "partial"
    write_fake_fashion(partial)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (partial / name).unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=partial)
    message = str(info.value)
    assert f"--data-dir {str(partial)!r} holds 2 of the 4 Fashion-MNIST files" in message
    assert "missing: t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte" in message
    with pytest.raises(DatasetNotFoundError, match=r"--data-dir '.*nowhere' does not exist; missing: train-images"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere")
    assert load_dataset("fashion-mnist").x_train.shape[0] == 13  # without --data-dir the search goes on


def test_swapped_train_and_test_files_are_refused(isolated, tmp_path, write_fake_fashion):
    folder = tmp_path / "d"
    write_fake_fashion(folder, n_train=6, n_test=12)  # the t10k files hold the larger set
    with pytest.raises(ValueError, match=r"holds 6 images and .*t10k-images.* 12: .* look swapped"):
        load_dataset("fashion-mnist", data_dir=folder)
