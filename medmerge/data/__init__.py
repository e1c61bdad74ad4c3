"""Datasets: synthetic demo data, MedMNIST-layout npz IO, image files (PNG/JPEG/TIFF/DICOM), image
folders and CSV manifests, fetching, checks and preparation."""

from medmerge.data.fetch import DATA_ORIGINS, MEDMNIST_FLAGS, fetch_dataset, medmnist_filename
from medmerge.data.images import IMAGE_READERS, read_image, read_images
from medmerge.data.npz import SPLITS, DataError, RawDataset, load_npz, save_npz_atomic
from medmerge.data.prepare import load_split, prepare_dataset, read_meta, resize_images, to_rgb
from medmerge.data.sources import fetch_csv, fetch_imagefolder
from medmerge.data.splits import assign_splits
from medmerge.data.synthetic import SYNTHETIC_TASKS, SyntheticTask, generate_synthetic
from medmerge.data.validate import duplicates_across_splits

__all__ = [
    "DATA_ORIGINS",
    "IMAGE_READERS",
    "MEDMNIST_FLAGS",
    "SPLITS",
    "SYNTHETIC_TASKS",
    "DataError",
    "RawDataset",
    "SyntheticTask",
    "assign_splits",
    "duplicates_across_splits",
    "fetch_csv",
    "fetch_dataset",
    "fetch_imagefolder",
    "generate_synthetic",
    "load_npz",
    "load_split",
    "medmnist_filename",
    "prepare_dataset",
    "read_image",
    "read_images",
    "read_meta",
    "resize_images",
    "save_npz_atomic",
    "to_rgb",
]
