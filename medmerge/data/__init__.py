"""Datasets: synthetic demo data, MedMNIST-layout npz IO, fetching and preparation."""

from medmerge.data.fetch import DATA_ORIGINS, MEDMNIST_FLAGS, fetch_dataset, medmnist_filename
from medmerge.data.npz import SPLITS, DataError, RawDataset, load_npz, save_npz_atomic
from medmerge.data.prepare import load_split, prepare_dataset, read_meta, resize_images, to_rgb
from medmerge.data.synthetic import SYNTHETIC_TASKS, SyntheticTask, generate_synthetic

__all__ = [
    "DATA_ORIGINS",
    "MEDMNIST_FLAGS",
    "SPLITS",
    "SYNTHETIC_TASKS",
    "DataError",
    "RawDataset",
    "SyntheticTask",
    "fetch_dataset",
    "generate_synthetic",
    "load_npz",
    "load_split",
    "medmnist_filename",
    "prepare_dataset",
    "read_meta",
    "resize_images",
    "save_npz_atomic",
    "to_rgb",
]
