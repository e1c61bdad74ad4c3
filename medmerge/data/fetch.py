"""Write ``data/raw/<dataset>/`` from an origin spec (see docs/data_sources.md): ``<dataset>.npz`` for
synthetic, local npz and MedMNIST data; ``<dataset>.splits.csv`` + ``<dataset>.classes.json`` (the split
manifest, no pixels) for an image folder or a CSV manifest of image files.

Every origin is a function of :data:`DATA_ORIGINS`, registered with the pydantic model of its options:
``fn(out_path, options) -> written path`` (``out_path`` is the ``.npz`` path); what it writes appears only
once it is complete and validated. The config validates ``data.datasets.<name>.options`` with the models
(:func:`dataset_options`) when params load, so this module imports pandas (image folders, CSV manifests)
only inside its functions.
"""

from __future__ import annotations

import io
import logging
import shutil
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medmerge.data.npz import DataError, load_npz, save_npz_atomic
from medmerge.data.synthetic import generate_synthetic
from medmerge.download import ChecksumError, DownloadError, download_file, file_digest
from medmerge.io import atomic_file
from medmerge.registry import Options, OptionsError, Registry

log = logging.getLogger("medmerge.data")

MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{filename}?download=1"
MEDMNIST_SIZES = (28, 64, 128, 224)


@dataclass(frozen=True)
class MedMNISTInfo:
    """A 2-D MedMNIST v3 dataset: class names (None = unknown), multi-label flag, md5 per image size."""

    class_names: list[str] | None
    md5: dict[int, str]
    multi_label: bool = False


_ORGANS = [
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
    "liver", "lung-left", "lung-right", "pancreas", "spleen",
]  # fmt: skip


def _md5s(*digests: str) -> dict[int, str]:
    return dict(zip(MEDMNIST_SIZES, digests, strict=True))


#: MedMNIST v3 2-D datasets (class names and checksums from the medmnist package's INFO table)
MEDMNIST_FLAGS: dict[str, MedMNISTInfo] = {
    "pathmnist": MedMNISTInfo(
        ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
         "cancer-associated stroma", "colorectal adenocarcinoma epithelium"],
        _md5s("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
              "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"),
    ),
    "chestmnist": MedMNISTInfo(
        None,
        _md5s("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
              "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa"),
        multi_label=True,
    ),
    "dermamnist": MedMNISTInfo(
        ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
         "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions"],
        _md5s("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
              "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"),
    ),
    "octmnist": MedMNISTInfo(
        ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
        _md5s("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
              "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"),
    ),
    "pneumoniamnist": MedMNISTInfo(
        ["normal", "pneumonia"],
        _md5s("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
              "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"),
    ),
    "retinamnist": MedMNISTInfo(
        ["0", "1", "2", "3", "4"],
        _md5s("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
              "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"),
    ),
    "breastmnist": MedMNISTInfo(
        ["malignant", "normal, benign"],
        _md5s("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
              "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"),
    ),
    "bloodmnist": MedMNISTInfo(
        ["basophil", "eosinophil", "erythroblast",
         "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
         "neutrophil", "platelet"],
        _md5s("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
              "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"),
    ),
    "tissuemnist": MedMNISTInfo(
        ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
         "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
         "Thick Ascending Limb"],
        _md5s("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
              "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"),
    ),
    "organamnist": MedMNISTInfo(
        _ORGANS,
        _md5s("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
              "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"),
    ),
    "organcmnist": MedMNISTInfo(
        _ORGANS,
        _md5s("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
              "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"),
    ),
    "organsmnist": MedMNISTInfo(
        _ORGANS,
        _md5s("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
              "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"),
    ),
}  # fmt: skip


# ---------------------------------------------------------------- file helpers


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    return file_digest(path, "md5")


def _add_class_names(npz_path: Path, class_names: list[str]) -> None:
    """Append a ``class_names.npy`` member to an npz (zip) file that lacks one."""
    with zipfile.ZipFile(npz_path) as zf:
        if "class_names.npy" in zf.namelist():
            return
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array(class_names, dtype=str), allow_pickle=False)
    with zipfile.ZipFile(npz_path, "a") as zf:
        zf.writestr("class_names.npy", buffer.getvalue())


def _stage(
    out_path: Path,
    fill: Callable[[Path], object],
    label: str,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> Path:
    """Fill a temporary sibling of ``out_path``, add class names, validate, then move it into place.

    Validation errors name ``label`` (the source file or URL) instead of the temporary file.
    """
    with atomic_file(out_path) as tmp:
        fill(tmp)
        try:
            if class_names is not None:
                _add_class_names(tmp, class_names)
            load_npz(tmp, num_classes=num_classes)
        except zipfile.BadZipFile as err:
            raise DataError(f"{label}: not a readable .npz file ({err})") from None
        except DataError as err:
            raise DataError(str(err).replace(str(tmp), label)) from None
    return out_path


def _check_md5(path: Path, expected: str | None, what: str) -> None:
    if expected is None:
        return
    actual = file_md5(path)
    if actual != expected.lower():
        raise DataError(f"md5 mismatch for {what}: expected {expected}, got {actual}")


def download(url: str, dest: Path, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` into ``dest`` and verify ``md5`` when given (:func:`medmerge.download.download_file`:
    progress bar, retries); DataError on failure, and ``dest`` is then absent."""
    try:
        download_file(url, dest, md5=md5, timeout=timeout)
    except ChecksumError as err:
        raise DataError(str(err)) from None
    except DownloadError as err:
        raise DataError(str(err)) from err
    return Path(dest)


# ---------------------------------------------------------------- origins

#: origin name -> ``fn(out_path, options) -> written path``, with the model of its options
DATA_ORIGINS: Registry[Callable[[Path, Options], Path]] = Registry("data origin")


class SyntheticOptions(Options):
    task: str  # a key of medmerge.data.synthetic.SYNTHETIC_TASKS
    n_train: int
    n_val: int
    n_test: int
    image_size: int = 64
    seed: int = 0


@DATA_ORIGINS.register("synthetic", options=SyntheticOptions)
def fetch_synthetic(out_path: Path, options: SyntheticOptions) -> Path:
    """Generate a synthetic task (see :mod:`medmerge.data.synthetic`) and save it."""
    task = generate_synthetic(options.task, options.n_train, options.n_val, options.n_test,
                              options.image_size, options.seed)
    save_npz_atomic(out_path, task)
    return out_path


class NpzOptions(Options):
    path: str | Path
    num_classes: int | None = None


@DATA_ORIGINS.register("npz", options=NpzOptions)
def fetch_npz(out_path: Path, options: NpzOptions) -> Path:
    """Validate a local MedMNIST-layout file and copy it to ``out_path``."""
    path = Path(options.path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return _stage(out_path, lambda tmp: shutil.copyfile(path, tmp), str(path), options.num_classes)


def medmnist_filename(flag: str, size: int) -> str:
    """MedMNIST v3 file name: ``{flag}.npz`` for 28 px, ``{flag}_{size}.npz`` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def medmnist_info(flag: str) -> MedMNISTInfo:
    """Known 2-D MedMNIST flag; DataError for unknown or multi-label ones."""
    if flag not in MEDMNIST_FLAGS:
        raise DataError(f"unknown MedMNIST flag {flag!r}; known 2-D flags: {sorted(MEDMNIST_FLAGS)}")
    info = MEDMNIST_FLAGS[flag]
    if info.multi_label:
        raise DataError(f"MedMNIST {flag!r} is multi-label: multi-label data is not supported")
    return info


class MedMNISTOptions(Options):
    flag: str  # a key of MEDMNIST_FLAGS
    size: int = 28  # one of MEDMNIST_SIZES
    root: str | Path | None = None  # a folder that may hold the file already
    url: str | None = None  # default: Zenodo's
    md5: str | None = None  # default: the known checksum of a Zenodo download


@DATA_ORIGINS.register("medmnist", options=MedMNISTOptions)
def fetch_medmnist(out_path: Path, options: MedMNISTOptions) -> Path:
    """A MedMNIST file from ``root`` if present (md5 checked when given), else downloaded.

    Downloads from the default Zenodo URL are checked against the known v3 checksum unless ``md5`` is
    given. The copy at ``out_path`` gets the known class names added as ``class_names``.
    """
    flag, size, root, url, md5 = options.flag, options.size, options.root, options.url, options.md5
    info = medmnist_info(flag)
    if size not in MEDMNIST_SIZES:
        raise DataError(f"MedMNIST size must be one of {MEDMNIST_SIZES}, got {size!r}")
    filename = medmnist_filename(flag, size)
    num_classes = len(info.class_names) if info.class_names else None
    local = Path(root) / filename if root is not None else None
    if local is not None and local.is_file():
        _check_md5(local, md5, str(local))
        return _stage(
            out_path, lambda tmp: shutil.copyfile(local, tmp), str(local), num_classes, info.class_names
        )
    if url is None:
        url, md5 = MEDMNIST_URL.format(filename=filename), md5 or info.md5.get(size)
    return _stage(out_path, lambda tmp: download(url, tmp, md5), url, num_classes, info.class_names)


class ImageFolderOptions(Options):
    root: str | Path
    splits: dict[str, str] | None = None  # split -> its folder under root; None: found, or assigned
    classes: list[str] | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0


@DATA_ORIGINS.register("imagefolder", options=ImageFolderOptions)
def fetch_image_folder(out_path: Path, options: ImageFolderOptions) -> Path:
    """:func:`medmerge.data.sources.fetch_imagefolder` with these options."""
    from medmerge.data.sources import fetch_imagefolder

    return fetch_imagefolder(out_path, **options.model_dump())


class CsvOptions(Options):
    path: str | Path
    image_root: str | Path | list[str | Path] | None = None
    path_column: str = "path"
    path_template: str = "{}"
    label_column: str | None = "label"
    label_columns: list[str] | None = None
    split_column: str | None = None
    group_column: str | None = None
    group_regex: str | None = None
    classes: list[str] | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0


@DATA_ORIGINS.register("csv", options=CsvOptions)
def fetch_csv_manifest(out_path: Path, options: CsvOptions) -> Path:
    """:func:`medmerge.data.sources.fetch_csv` with these options."""
    from medmerge.data.sources import fetch_csv

    return fetch_csv(out_path, **options.model_dump())


def dataset_options(origin: str, options: Mapping[str, Any], classes: list[str] | None = None) -> Options:
    """``options`` validated by ``origin``'s options model (:class:`~medmerge.registry.OptionsError` naming
    the bad keys otherwise), with the dataset's ``classes`` for an origin that takes a ``classes`` option (it
    fixes the label order)."""
    model = DATA_ORIGINS.entry(origin).options
    if classes is not None and "classes" in model.model_fields:
        if options.get("classes") not in (None, list(classes)):
            raise ValueError(f"data origin {origin!r}: options.classes {options['classes']} differs from the "
                             f"dataset's classes {list(classes)}; give the list once")
        options = {**options, "classes": list(classes)}
    return DATA_ORIGINS.options(origin, options)


def fetch_dataset(origin: str, options: Mapping[str, Any], out_path: Path,
                  classes: list[str] | None = None) -> Path:
    """Write the dataset described by ``origin`` + ``options`` to ``out_path`` (MedMNIST npz layout).

    ``classes`` (the dataset's class list) is passed on to origins with a ``classes`` option.
    """
    fetch = DATA_ORIGINS.get(origin)
    try:
        resolved = dataset_options(origin, options or {}, classes)
    except OptionsError as error:
        if not (error.unknown or error.missing):
            raise
        raise ValueError(f"data origin {origin!r}: unknown option(s) {error.unknown}, missing option(s) "
                         f"{error.missing}; allowed options: {error.takes} (required: {error.requires})"
                         ) from None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = Path(fetch(out_path, resolved))
    _remove_other_forms(out_path, written)
    return written


def _remove_other_forms(out_path: Path, written: Path) -> None:
    """A dataset's raw form is its npz or its manifest: remove the one the origin did not write now."""
    from medmerge.data.manifest import classes_path, manifest_path

    stale = [out_path] if written != out_path else [manifest_path(out_path), classes_path(out_path)]
    for path in stale:
        path.unlink(missing_ok=True)
