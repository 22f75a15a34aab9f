"""A user's own arrays: ``--data npz:PATH``, one NumPy .npz file (``np.savez(PATH, x_train=..., ...)``).

    x_train, x_test   images, the same layout and size in both; accepted layouts:
                        (N, H, W)       grey
                        (N, H, W, C)    channels last  (C = 1 or 3; what PIL, TensorFlow and Keras give)
                        (N, C, H, W)    channels first (C = 1 or 3; what PyTorch uses)
                      square images (H = W); the layout is read from where the 1 or 3 sits, and a shape where
                      both readings are possible (e.g. (N, 3, 3, 3)) is refused as ambiguous
                      dtype uint8 (pixels 0..255, divided by 255) or float16/32/64 already on [0, 1];
                      no NaN or infinity
    y_train, y_test   integer class labels >= 0, one per image
    classes           optional: the class names (a string array, e.g. np.array(["cat", "dog"])); without it
                      the classes are 0 .. max label, numbered

The file is opened with ``allow_pickle=False``: an .npz holding pickled objects is refused, never run. Any other
key is an error (a typo such as "X_train" would otherwise be silently ignored). Then the shared recipe of
samkit.data.dataset applies: --subset, --val-fraction, per-channel normalization from the training split.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from samkit.data.errors import DatasetNotFoundError

NPZ_PREFIX = "npz:"
REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL_KEYS = ("classes",)
CHANNELS = (1, 3)
_FIX = "save it with np.savez(PATH, x_train=..., y_train=..., x_test=..., y_test=...)"


def npz_path(spec: str) -> Path:
    """The path of an ``npz:PATH`` spec; ValueError when there is none."""
    path = spec[len(NPZ_PREFIX):] if spec.startswith(NPZ_PREFIX) else ""
    if not path.strip():
        raise ValueError(f"--data {spec!r} names no file: write npz:PATH, e.g. npz:/data/mine.npz")
    return Path(path).expanduser()


def _layout(x: np.ndarray, key: str, path: str) -> np.ndarray:
    """``x`` as (N, C, H, W) from one of the accepted layouts."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        last = x.shape[3] in CHANNELS and x.shape[1] == x.shape[2]
        first = x.shape[1] in CHANNELS and x.shape[2] == x.shape[3]
        if last and first:
            raise ValueError(f"{path!r}: {key} has shape {x.shape}, both (N, H, W, C) and (N, C, H, W): ambiguous; "
                             "store images larger than 3x3 pixels")
        if last:
            x = x.transpose(0, 3, 1, 2)
        elif not first:
            raise ValueError(f"{path!r}: {key} has shape {x.shape}; accepted: (N, H, W), (N, H, W, C) or (N, C, H, W) "
                             f"with C in {CHANNELS} and square images (H = W)")
    else:
        raise ValueError(f"{path!r}: {key} has {x.ndim} dimensions (shape {x.shape}); accepted: (N, H, W), "
                         f"(N, H, W, C) or (N, C, H, W)")
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"{path!r}: {key} holds {x.shape[2]}x{x.shape[3]} images; samkit needs square images: "
                         "crop or pad them to H = W")
    if x.shape[0] == 0:
        raise ValueError(f"{path!r}: {key} holds no images")
    return x


def _pixels(x: np.ndarray, key: str, path: str) -> Tensor:
    """float32 on [0, 1] from uint8 (/ 255) or floats already on [0, 1]."""
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    if x.dtype.kind != "f":
        fix = "convert with x.astype(np.uint8)" if x.dtype.kind in "iu" else "store uint8 or float pixels"
        raise ValueError(f"{path!r}: {key} has dtype {x.dtype}; accepted: uint8 (0..255) or float on [0, 1]: {fix}")
    finite = np.isfinite(x)
    if not finite.all():
        first = np.unravel_index(int(np.argmin(finite)), x.shape)[0]
        raise ValueError(f"{path!r}: {key} has {int((~finite).sum())} NaN or infinite values (first in image {first}); "
                         "remove or repair those images")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{path!r}: {key} has float pixels in [{low:g}, {high:g}]; floats must be on [0, 1] (samkit "
                         "normalizes them itself): divide 0..255 values by 255, or store uint8")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _labels(y: np.ndarray, key: str, path: str, n: int) -> Tensor:
    if y.dtype.kind not in "iu" or y.dtype == np.bool_:
        raise ValueError(f"{path!r}: {key} has dtype {y.dtype}; labels must be integers: convert with "
                         "y.astype(np.int64)")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{path!r}: {key} has shape {y.shape}; expected ({n},), one label per image of "
                         f"x_{key[2:]}")
    if y.size and int(y.min()) < 0:
        raise ValueError(f"{path!r}: {key} has label {int(y.min())}; labels must be >= 0 (0 .. classes - 1)")
    return torch.from_numpy(y.astype(np.int64))


def load_npz_arrays(spec: str) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], list[str]]:
    """((x_train, y_train, x_test, y_test), class names) from ``npz:PATH``: float32 (N, C, H, W) images on
    [0, 1] and int64 labels, every property checked (see the module doc)."""
    path = npz_path(spec)
    name = os.fspath(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"--data {spec}: no file {name!r} (working folder {os.getcwd()!r}): give the path "
                                   f"of an .npz file holding {', '.join(REQUIRED_KEYS)}; {_FIX}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            unknown = sorted(keys - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
            missing = [key for key in REQUIRED_KEYS if key not in keys]
            if missing or unknown:
                raise ValueError(f"{name!r} has keys {sorted(keys)}: missing {missing}, unknown {unknown}; expected "
                                 f"{', '.join(REQUIRED_KEYS)} (and optionally classes); {_FIX}")
            arrays = {key: archive[key] for key in keys}
    except ValueError as err:
        if "allow_pickle" in str(err) or "Object arrays" in str(err):
            raise ValueError(f"{name!r} holds pickled Python objects, which samkit does not load (allow_pickle=False): "
                             f"store plain numeric arrays; {_FIX}") from err
        if str(err).startswith(repr(name)):
            raise
        raise ValueError(f"{name!r} is not a readable .npz file ({err}); {_FIX}") from err
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{name!r} is not a readable .npz file ({type(err).__name__}: {err}): the file is truncated "
                         f"or not an .npz; {_FIX}") from err

    x_train = _layout(arrays["x_train"], "x_train", name)
    x_test = _layout(arrays["x_test"], "x_test", name)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{name!r}: x_train images are (C, H, W) = {x_train.shape[1:]} but x_test images are "
                         f"{x_test.shape[1:]}; both splits need the same size and channels")
    y_train = _labels(arrays["y_train"], "y_train", name, x_train.shape[0])
    y_test = _labels(arrays["y_test"], "y_test", name, x_test.shape[0])
    top = int(max(y_train.max(), y_test.max() if y_test.numel() else 0))
    if "classes" in arrays:
        names = arrays["classes"]
        if names.dtype.kind not in "US" or names.ndim != 1:
            raise ValueError(f"{name!r}: classes must be a 1-D string array (np.array(['cat', 'dog'])), got "
                             f"{names.dtype} of shape {names.shape}")
        classes = [str(c) for c in names.tolist()]
        if top >= len(classes):
            raise ValueError(f"{name!r} has label {top} but classes names {len(classes)} classes (labels 0 .. "
                             f"{len(classes) - 1}): add the missing names or fix the labels")
    else:
        classes = [str(c) for c in range(top + 1)]
    if len(classes) < 2:
        raise ValueError(f"{name!r}: the labels name {len(classes)} class; classification needs at least 2")
    arrays_out = (_pixels(x_train, "x_train", name), y_train, _pixels(x_test, "x_test", name), y_test)
    return arrays_out, classes
