"""Datasets: synthetic demo data, MedMNIST-layout npz IO, image files (PNG/JPEG/TIFF/DICOM), image
folders and CSV manifests, fetching, checks, resize policies, subsampling and streaming preparation.

The names below are imported on first use, so that a process that needs one module (a decoding worker
needs :mod:`medmerge.data.decode`) does not import them all (pandas, scikit-learn).
"""

from __future__ import annotations

from medmerge.lazy import lazy_exports

_EXPORTS = {
    "DATA_ORIGINS": "fetch",
    "MEDMNIST_FLAGS": "fetch",
    "fetch_dataset": "fetch",
    "medmnist_filename": "fetch",
    "IMAGE_READERS": "images",
    "load_and_resize": "images",
    "read_image": "images",
    "read_images": "images",
    "ImageManifest": "manifest",
    "read_image_manifest": "manifest",
    "SPLITS": "npz",
    "DataError": "npz",
    "RawDataset": "npz",
    "load_npz": "npz",
    "save_npz_atomic": "npz",
    "load_split": "prepare",
    "open_raw_dataset": "prepare",
    "prepare_dataset": "prepare",
    "read_meta": "prepare",
    "RESIZE_POLICIES": "resize",
    "resize_image": "resize",
    "resize_images": "resize",
    "to_rgb": "resize",
    "fetch_csv": "sources",
    "fetch_imagefolder": "sources",
    "assign_splits": "splits",
    "SYNTHETIC_TASKS": "synthetic",
    "SyntheticTask": "synthetic",
    "generate_synthetic": "synthetic",
    "duplicates_across_splits": "validate",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
