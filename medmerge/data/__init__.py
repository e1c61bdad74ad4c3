"""Datasets: synthetic demo data, MedMNIST-layout npz IO, image files (PNG/JPEG/TIFF/DICOM), image
folders and CSV manifests, fetching, checks, resize policies, subsampling and streaming preparation."""

from medmerge.data.fetch import DATA_ORIGINS, MEDMNIST_FLAGS, fetch_dataset, medmnist_filename
from medmerge.data.images import IMAGE_READERS, load_and_resize, read_image, read_images
from medmerge.data.manifest import ImageManifest, read_image_manifest
from medmerge.data.npz import SPLITS, DataError, RawDataset, load_npz, save_npz_atomic
from medmerge.data.prepare import load_split, open_raw_dataset, prepare_dataset, read_meta
from medmerge.data.resize import RESIZE_POLICIES, resize_image, resize_images, to_rgb
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
    "ImageManifest",
    "RESIZE_POLICIES",
    "RawDataset",
    "SyntheticTask",
    "assign_splits",
    "duplicates_across_splits",
    "fetch_csv",
    "fetch_dataset",
    "fetch_imagefolder",
    "generate_synthetic",
    "load_and_resize",
    "load_npz",
    "load_split",
    "medmnist_filename",
    "open_raw_dataset",
    "prepare_dataset",
    "read_image",
    "read_image_manifest",
    "read_images",
    "read_meta",
    "resize_image",
    "resize_images",
    "save_npz_atomic",
    "to_rgb",
]
