"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv 1708.07747): 70000 grey 28x28 images of Zalando
articles in 10 classes, 60000 train / 10000 test, in four IDX files.

Where the files are looked for, first hit wins (a folder counts when it holds all four files, each
either gzip-compressed ``NAME.gz`` or raw ``NAME``, directly or in a ``fashion-mnist/`` or
torchvision-style ``FashionMNIST/raw/`` subfolder):

    1. data_dir                       (the CLI's --data-dir)
    2. $SAMKIT_DATA
    3. /usr/share/datasets/fashion-mnist/   (Debian/Ubuntu: apt-get install dataset-fashion-mnist)
    4. the cache: $XDG_CACHE_HOME/samkit/fashion-mnist, else ~/.cache/samkit/fashion-mnist
    5. download=True: fetch into the cache from the official location (the Zalando S3 bucket, then the
       project's GitHub as a mirror), 10 s network timeout, each file checked against its published
       MD5 before it is moved into place (temp file + os.replace: never a half file in the cache)
    otherwise DatasetNotFoundError saying where it looked and how to get the files.

A data_dir that does not hold all four files is an error naming the missing ones (the search does not go on
past a folder the user named: the run would train on other files than its config records).

Every file goes through `read_idx` (magic, dtype, dims, exact size) and then through checks of what
Fashion-MNIST must be (uint8 28x28 images, as many labels as images, labels in 0..9, a training set larger
than the test set: swapped train/t10k files are refused), so a damaged file is a ValueError naming it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional
from urllib.request import urlopen

import numpy as np
import torch
from torch import Tensor

from samkit.data.errors import DatasetNotFoundError
from samkit.data.idx import PathLike, read_idx

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Published MD5s of the gzip files (https://github.com/zalandoresearch/fashion-mnist#get-the-data).
FASHION_FILES = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_TIMEOUT_S = 10.0
_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024  # the largest file is 26 MB; anything far bigger is not it
_SUBFOLDERS = (".", "fashion-mnist", "FashionMNIST/raw")


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/samkit/fashion-mnist, or ~/.cache/samkit/fashion-mnist."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "samkit" / "fashion-mnist"


def _file_in(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_files(folder: PathLike) -> Optional[dict[str, Path]]:
    """The four files in ``folder`` (or its fashion-mnist/ or FashionMNIST/raw/ subfolder), else None."""
    for sub in _SUBFOLDERS:
        candidate = Path(folder) / sub
        found = {stem: _file_in(candidate, stem) for stem in FASHION_FILES}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def search_dirs(data_dir: Optional[PathLike] = None) -> list[Path]:
    """The folders searched, in order (see the module doc)."""
    dirs = [Path(data_dir)] if data_dir is not None else []
    if os.environ.get("SAMKIT_DATA"):
        dirs.append(Path(os.environ["SAMKIT_DATA"]))
    return dirs + [SYSTEM_DIR, cache_dir()]


def how_to_get_it(searched: list[Path], reason: str) -> str:
    places = ", ".join(str(p) for p in searched)
    return (
        f"Fashion-MNIST not found ({reason}). Searched: {places}. To get it: "
        f"`sudo apt-get install dataset-fashion-mnist` (installs {SYSTEM_DIR}/), or download "
        f"{', '.join(FASHION_FILES)} (.gz) from {FASHION_URLS[0]} into a folder and pass --data-dir FOLDER "
        "or set SAMKIT_DATA=FOLDER."
    )


def _fetch(url: str, destination: Path, md5: str, timeout: float) -> None:
    digest = hashlib.md5()
    fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=destination.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=timeout) as response:
            size = 0
            while chunk := response.read(1 << 20):
                size += len(chunk)
                if size > _MAX_DOWNLOAD_BYTES:
                    raise ValueError(f"{url} sent more than {_MAX_DOWNLOAD_BYTES} bytes: not the expected file")
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, destination)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(folder: PathLike, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> dict[str, Path]:
    """Download the four .gz files into ``folder``, verifying each MD5; returns their paths.

    A file already there with the right MD5 is kept. Each URL of FASHION_URLS is tried in turn;
    DatasetNotFoundError names every failure (network error, checksum mismatch) when none serves a file
    with the published MD5.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetNotFoundError(f"cannot create the download folder {str(folder)!r}: {err}") from err
    paths = {}
    for stem, md5 in FASHION_FILES.items():
        destination = folder / (stem + ".gz")
        failures = []
        if not (destination.is_file() and _md5_of(destination) == md5):
            for base in FASHION_URLS:
                try:
                    _fetch(base + stem + ".gz", destination, md5, timeout)
                    break
                except (OSError, ValueError) as err:  # URLError, HTTPError and socket timeouts are OSErrors
                    failures.append(f"{base + stem}.gz: {err}")
            else:
                raise DatasetNotFoundError("; ".join(failures))
        paths[stem] = destination
    return paths


def _incomplete_data_dir(data_dir: PathLike) -> DatasetNotFoundError:
    """The error for a --data-dir without the four files: which of them it holds, and which it lacks."""
    folder = Path(data_dir)
    best = max(
        ({stem: _file_in(folder / sub, stem) for stem in FASHION_FILES} for sub in _SUBFOLDERS),
        key=lambda found: sum(path is not None for path in found.values()),
    )
    present = [stem for stem, path in best.items() if path is not None]
    missing = [stem for stem, path in best.items() if path is None]
    state = "does not exist" if not folder.exists() else f"holds {len(present)} of the 4 Fashion-MNIST files"
    have = f" ({', '.join(present)})" if present else ""
    return DatasetNotFoundError(
        f"--data-dir {os.fspath(data_dir)!r} {state}{have}; missing: {', '.join(missing)} (.gz or raw). Put all "
        "four there, or drop --data-dir to use the search order ($SAMKIT_DATA, "
        f"{SYSTEM_DIR}, the cache, a download)"
    )


def locate(data_dir: Optional[PathLike] = None, *, download_missing: bool = True) -> dict[str, Path]:
    """Paths of the four files, searching as the module doc says; may download into the cache."""
    if data_dir is not None:
        # a folder the user named is the data, or an error: going on to another copy would train on files other
        # than the ones the run's config records
        found = find_files(data_dir)
        if found is None:
            raise _incomplete_data_dir(data_dir)
        return found
    searched = search_dirs(data_dir)
    for folder in searched:
        found = find_files(folder)
        if found is not None:
            return found
    if not download_missing:
        raise DatasetNotFoundError(how_to_get_it(searched, "download disabled"))
    try:
        return download(cache_dir())
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(how_to_get_it(searched, f"download failed: {err}")) from err


def _load_split(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{str(images_path)!r} holds {images.dtype} of shape {images.shape}; Fashion-MNIST "
                         "images are uint8 of shape (N, 28, 28)")
    if labels.dtype != np.uint8 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{str(labels_path)!r} holds {labels.dtype} of shape {labels.shape}; expected uint8 "
                         f"labels of shape ({images.shape[0]},), one per image of {str(images_path)!r}")
    if labels.size and labels.max() >= len(FASHION_CLASSES):
        raise ValueError(f"{str(labels_path)!r} has label {int(labels.max())}; Fashion-MNIST labels are 0..9")
    x = torch.from_numpy(images).unsqueeze(1).float().div_(255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist_arrays(
    data_dir: Optional[PathLike] = None, *, download: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): float32 images on [0, 1] of shape (N, 1, 28, 28), int64 labels."""
    paths = locate(data_dir, download_missing=download)
    x_train, y_train = _load_split(paths["train-images-idx3-ubyte"], paths["train-labels-idx1-ubyte"])
    x_test, y_test = _load_split(paths["t10k-images-idx3-ubyte"], paths["t10k-labels-idx1-ubyte"])
    if x_train.shape[0] <= x_test.shape[0]:
        raise ValueError(
            f"{str(paths['train-images-idx3-ubyte'])!r} holds {x_train.shape[0]} images and "
            f"{str(paths['t10k-images-idx3-ubyte'])!r} {x_test.shape[0]}: the training set must be the larger one "
            "(Fashion-MNIST: 60000 train, 10000 t10k), so the train and t10k files look swapped: check their names"
        )
    return x_train, y_train, x_test, y_test
