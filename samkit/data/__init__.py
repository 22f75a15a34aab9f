"""Datasets (IDX reader, digits, fashion-mnist, CIFAR-10/100, .npz arrays, synthetic), label noise,
augmentation and corruptions."""

from samkit.data.augmentation import AUGMENTATIONS, augment
from samkit.data.corruptions import CORRUPTIONS, corrupt
from samkit.data.dataset import Dataset
from samkit.data.errors import DatasetNotFoundError
from samkit.data.idx import read_idx
from samkit.data.label_noise import add_label_noise
from samkit.data.load import DATASETS, check_dataset_name, load_dataset
from samkit.data.normalization import denormalize, normalize

__all__ = [
    "AUGMENTATIONS",
    "CORRUPTIONS",
    "DATASETS",
    "Dataset",
    "DatasetNotFoundError",
    "add_label_noise",
    "augment",
    "check_dataset_name",
    "corrupt",
    "denormalize",
    "load_dataset",
    "normalize",
    "read_idx",
]
