"""`load_dataset`: one name, one Dataset, ready for training.

    digits           scikit-learn's 8x8 digits (bundled, the default: works offline with nothing installed)
    fashion-mnist    28x28 Zalando articles (IDX files: --data-dir, $SAMKIT_DATA, the Debian package, cache,
                     download; see samkit.data.fashion_mnist)
    synthetic        tiny seeded 8x8, 4-class problem for tests
    cifar10          CIFAR-10, 32x32 colour, 10 classes (python-version files, never downloaded; samkit.data.cifar)
    cifar100         CIFAR-100, its 100 fine labels
    cifar100-coarse  CIFAR-100, its 20 coarse labels (superclasses)
    npz:PATH         a user's own arrays in an .npz file (samkit.data.npz)

then the shared recipe of samkit.data.dataset: --subset, a seeded validation split (the SAM paper tuned
rho on 10 % of train), per-channel normalization with statistics of the training split.

Example:
    >>> ds = load_dataset("synthetic", subset=64, val_fraction=0.25, seed=0)
    >>> ds.x_train.shape, ds.x_val.shape, ds.num_classes
    (torch.Size([48, 1, 8, 8]), torch.Size([16, 1, 8, 8]), 4)
"""

from __future__ import annotations

from typing import Optional

from samkit.data.cifar import CIFAR_DATASETS, load_cifar_arrays
from samkit.data.dataset import Dataset, check_split_options, split_and_normalize
from samkit.data.digits import DIGITS_CLASSES, load_digits_arrays
from samkit.data.fashion_mnist import FASHION_CLASSES, load_fashion_mnist_arrays
from samkit.data.idx import PathLike
from samkit.data.npz import NPZ_PREFIX, load_npz_arrays, npz_path
from samkit.data.synthetic import SYNTHETIC_CLASSES, load_synthetic_arrays

DATASETS = ("digits", "fashion-mnist", "synthetic", *CIFAR_DATASETS)


def check_dataset_name(name: object) -> None:
    """ValueError unless ``name`` is one of DATASETS or an ``npz:PATH`` spec (the file is checked on loading)."""
    if isinstance(name, str) and name.startswith(NPZ_PREFIX):
        npz_path(name)
        return
    if name not in DATASETS:
        raise ValueError(f"unknown data {name!r}; valid: {', '.join(DATASETS)}, or npz:PATH for your own arrays")


def load_dataset(
    name: str,
    *,
    data_dir: Optional[PathLike] = None,
    subset: Optional[int] = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    download: bool = True,
) -> Dataset:
    """Load ``name`` (one of DATASETS, or ``npz:PATH``) as a normalized Dataset.

    ``subset``: keep the first N of a seeded permutation of the training set (the test set stays whole,
    except for ``synthetic``). ``val_fraction``: hold out that seeded fraction of the (subset) training
    set as validation. ``data_dir``: where to look first for files (fashion-mnist, cifar*). ``download``: allow
    fetching fashion-mnist into the cache when no folder has it (10 s timeout, MD5-checked).
    """
    if not (isinstance(name, str) and name.startswith(NPZ_PREFIX)) and name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}, or npz:PATH")
    check_split_options(subset, val_fraction, seed)  # before a 30 MB read, not after
    if name.startswith(NPZ_PREFIX):
        arrays, classes = load_npz_arrays(name)
    elif name in CIFAR_DATASETS:
        arrays, classes = load_cifar_arrays(name, data_dir)
    elif name == "digits":
        arrays, classes = load_digits_arrays(), DIGITS_CLASSES
    elif name == "fashion-mnist":
        arrays, classes = load_fashion_mnist_arrays(data_dir, download=download), FASHION_CLASSES
    else:
        arrays, classes = load_synthetic_arrays(), SYNTHETIC_CLASSES
    return split_and_normalize(
        name, *arrays, classes=classes, subset=subset, val_fraction=val_fraction, seed=seed,
        subset_test=name == "synthetic",
    )
