"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html) in their "python
version": 60000 colour 32x32 images, 50000 train / 10000 test, stored as Python pickles.

    cifar10          cifar-10-batches-py/   data_batch_1 .. data_batch_5 (10000 images each), test_batch,
                                            batches.meta (class names; optional here)
    cifar100         cifar-100-python/      train (50000), test (10000), meta (class names; optional)
                     100 fine labels ("fine_labels")
    cifar100-coarse  the same files, 20 superclass labels ("coarse_labels")

Every data file is a pickled dict: "data" a uint8 array (N, 3072) -- 1024 red, then 1024 green, then 1024 blue
values, each a 32x32 image in row-major order, i.e. (N, 3, 32, 32) after a reshape -- and a list of N labels.

Loading a pickle runs code chosen by the file. These files are read with `RestrictedUnpickler`, which accepts
only what the CIFAR files hold (dicts, lists, strings, ints; numpy arrays of uint8 rebuilt by numpy's own
``_reconstruct``) and refuses anything else, naming it, before it is called: a tampered file cannot run code.

Where the files are looked for, first complete folder wins (the folder itself, or its ``cifar-10-batches-py/``
/ ``cifar-100-python/`` subfolder, i.e. the folder the official archive extracts to):

    1. data_dir (the CLI's --data-dir)     2. $SAMKIT_DATA     3. $XDG_CACHE_HOME/samkit (else ~/.cache/samkit)

Nothing is downloaded: DatasetNotFoundError says where it looked, the official URL and the command to unpack.
Each file is checked (a dict with the expected keys, uint8 data of shape (N, 3072), N integer labels in range,
the same N everywhere), so a truncated or damaged file is a ValueError naming it and saying how to fix it. A
file with another image count than the official one (10000 per CIFAR-10 batch, ...) is read with a warning.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from samkit.data.errors import DatasetNotFoundError
from samkit.data.idx import PathLike

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
IMAGE_SHAPE = (3, 32, 32)
_ROW = 3 * 32 * 32


class _Spec:
    def __init__(self, name, folder, archive, md5, train, test, meta, label_key, names_key, num_classes, counts):
        self.name, self.folder, self.archive, self.md5 = name, folder, archive, md5
        self.train, self.test, self.meta = train, test, meta
        self.label_key, self.names_key, self.num_classes, self.counts = label_key, names_key, num_classes, counts

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test)


_C10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
SPECS = {
    "cifar10": _Spec("CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                     _C10_TRAIN, "test_batch", "batches.meta", "labels", "label_names", 10,
                     {**{f: 10000 for f in _C10_TRAIN}, "test_batch": 10000}),
    "cifar100": _Spec("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106ba0c2ae5f7e5e",
                      ("train",), "test", "meta", "fine_labels", "fine_label_names", 100,
                      {"train": 50000, "test": 10000}),
    "cifar100-coarse": _Spec("CIFAR-100 (coarse labels)", "cifar-100-python", "cifar-100-python.tar.gz",
                             "eb9058c3a382ffc7106ba0c2ae5f7e5e", ("train",), "test", "meta", "coarse_labels",
                             "coarse_label_names", 20, {"train": 50000, "test": 10000}),
}
CIFAR_DATASETS = tuple(SPECS)


# ------------------------------------------------------------------------------------------------ unpickling

class RefusedPickle(pickle.UnpicklingError):
    """A pickle asked for something a CIFAR file does not hold; nothing of it was called."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles written by Python 3 use it for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _uint8_dtype(name: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype`` restricted to the one dtype CIFAR arrays have."""
    if name not in ("u1", "uint8", b"u1"):
        raise RefusedPickle(f"refused numpy dtype {name!r}: CIFAR files hold uint8 ('u1') arrays only")
    return np.dtype("u1")


class _NdarrayName:
    """What ``numpy.ndarray`` unpickles to: a name for `_reconstruct` to check, not something callable."""


_NDARRAY = _NdarrayName()


def _reconstruct(cls: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` with the arguments numpy writes (an empty plain array; its state comes next)."""
    if cls is not _NDARRAY or tuple(shape) != (0,) or dtype_code not in (b"b", "b"):
        raise RefusedPickle(f"refused _reconstruct({cls!r}, {shape!r}, {dtype_code!r}): not a plain numpy array")
    return np.ndarray.__new__(np.ndarray, (0,), "b")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # pickles written by numpy 1.x (the official files)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # ... and by numpy 2.x
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _uint8_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only what CIFAR files hold; any other global (os.system, builtins.eval, a
    class of some package...) raises ``pickle.UnpicklingError`` naming it, before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise RefusedPickle(
                f"refused to load {module}.{name}: a CIFAR file holds only dicts, lists, strings, numbers and uint8 "
                "numpy arrays"
            )
        return allowed


def load_pickle(path: PathLike) -> Any:
    """Unpickle ``path`` with `RestrictedUnpickler` (latin-1 for Python 2 strings, as the CIFAR files need).

    Raises ValueError naming the file when it is empty, truncated, not a pickle, or asks for anything else.
    """
    name = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError(f"{name!r} is empty (0 bytes): the archive was not fully extracted; extract it again")
    try:
        return RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except RefusedPickle as err:
        raise ValueError(f"{name!r} is not a CIFAR file ({err}); nothing in it was run. Replace it with the file "
                         "from the official archive") from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            MemoryError) as err:
        raise ValueError(f"{name!r} is truncated or damaged ({type(err).__name__}: {err}): extract the official "
                         "archive again") from err


# ------------------------------------------------------------------------------------------------ checks

def _text_keys(record: Any) -> Any:
    if isinstance(record, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in record.items()}
    return record


def read_batch(path: PathLike, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) from one CIFAR data file, every property checked."""
    name = os.fspath(path)
    record = _text_keys(load_pickle(path))
    if not isinstance(record, dict):
        raise ValueError(f"{name!r} holds a {type(record).__name__}, not the dict of a CIFAR data file: replace it "
                         "with the file from the official archive")
    missing = [key for key in ("data", label_key) if key not in record]
    if missing:
        raise ValueError(f"{name!r} has no {missing} entry (it has {sorted(record)}): not a CIFAR file of this kind "
                         "(cifar100 files hold fine_labels and coarse_labels, cifar10 files labels)")
    data, labels = record["data"], record[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        shape = getattr(data, "shape", None)
        raise ValueError(f"{name!r}: 'data' is {getattr(data, 'dtype', type(data).__name__)} of shape {shape}; "
                         f"CIFAR images are uint8 of shape (N, {_ROW})")
    if not isinstance(labels, (list, tuple, np.ndarray)) or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels
    ):
        raise ValueError(f"{name!r}: {label_key!r} must be a list of integer labels")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.shape[0] != data.shape[0]:
        raise ValueError(f"{name!r} holds {data.shape[0]} images but {y.shape[0]} {label_key!r}: the file is damaged; "
                         "extract the official archive again")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name!r} has {label_key!r} in [{y.min()}, {y.max()}]; they must be in "
                         f"[0, {num_classes - 1}]")
    return data.reshape(-1, *IMAGE_SHAPE).copy(), y


def _class_names(folder: Path, spec: _Spec) -> list[str]:
    """Names from the meta file when it is there and valid, else the label numbers."""
    path = folder / spec.meta
    if path.is_file():
        meta = _text_keys(load_pickle(path))
        names = meta.get(spec.names_key) if isinstance(meta, dict) else None
        if isinstance(names, list) and len(names) == spec.num_classes and all(isinstance(n, str) for n in names):
            return list(names)
        warnings.warn(f"{str(path)!r} has no list of {spec.num_classes} {spec.names_key!r}: classes are numbered",
                      UserWarning, stacklevel=3)
    return [str(i) for i in range(spec.num_classes)]


# ------------------------------------------------------------------------------------------------ location

def cache_root() -> Path:
    """$XDG_CACHE_HOME/samkit, or ~/.cache/samkit."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "samkit"


def search_dirs(data_dir: Optional[PathLike] = None) -> list[Path]:
    dirs = [Path(data_dir)] if data_dir is not None else []
    if os.environ.get("SAMKIT_DATA"):
        dirs.append(Path(os.environ["SAMKIT_DATA"]))
    return dirs + [cache_root()]


def how_to_get_it(spec: _Spec, searched: list[Path], notes: list[str]) -> str:
    places = ", ".join(str(p) for p in searched)
    seen = f" ({'; '.join(notes)})" if notes else ""
    return (
        f"{spec.name} not found: looked for {spec.folder}/ with {', '.join(spec.files)} in {places}{seen}. "
        f"samkit downloads nothing: get {CIFAR_URL}{spec.archive} (the python version; md5 {spec.md5}), unpack it "
        f"with `tar xzf {spec.archive} -C FOLDER` (it creates FOLDER/{spec.folder}/), then pass --data-dir FOLDER "
        f"or set SAMKIT_DATA=FOLDER (or unpack into {cache_root()})."
    )


def locate(name: str, data_dir: Optional[PathLike] = None) -> Path:
    """The folder holding ``name``'s files (see the module doc), else DatasetNotFoundError."""
    spec = SPECS[name]
    searched, notes = search_dirs(data_dir), []
    for base in searched:
        for folder in (base / spec.folder, base):
            present = [f for f in spec.files if (folder / f).is_file()]
            if len(present) == len(spec.files):
                if data_dir is not None and base != Path(data_dir):
                    warnings.warn(f"--data-dir {os.fspath(data_dir)!r} holds no complete {spec.name}; using "
                                  f"{str(folder)!r} instead", UserWarning, stacklevel=3)
                return folder
            if present:
                missing = [f for f in spec.files if f not in present]
                notes.append(f"{folder} lacks {', '.join(missing)}")
    raise DatasetNotFoundError(how_to_get_it(spec, searched, notes))


def load_cifar_arrays(
    name: str, data_dir: Optional[PathLike] = None
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], list[str]]:
    """((x_train, y_train, x_test, y_test), class names): float32 images on [0, 1] of shape (N, 3, 32, 32)
    and int64 labels; ``name`` one of CIFAR_DATASETS."""
    if name not in SPECS:
        raise ValueError(f"unknown CIFAR dataset {name!r}; choose one of {CIFAR_DATASETS}")
    spec = SPECS[name]
    folder = locate(name, data_dir)
    parts = {}
    for file in spec.files:
        images, labels = read_batch(folder / file, spec.label_key, spec.num_classes)
        if images.shape[0] != spec.counts[file]:
            warnings.warn(f"{str(folder / file)!r} holds {images.shape[0]} images where the official {spec.name} file "
                          f"holds {spec.counts[file]}: a partial or modified copy", UserWarning, stacklevel=2)
        parts[file] = (images, labels)
    train = [parts[f] for f in spec.train]
    x_train = np.concatenate([images for images, _ in train])
    y_train = np.concatenate([labels for _, labels in train])
    x_test, y_test = parts[spec.test]

    def as_float(images: np.ndarray) -> Tensor:
        return torch.from_numpy(images).float().div_(255.0)

    arrays = (as_float(x_train), torch.from_numpy(y_train), as_float(x_test), torch.from_numpy(y_test))
    return arrays, _class_names(folder, spec)
