"""Reading single image files (PNG, JPEG, BMP, TIFF, DICOM) as uint8 RGB arrays.

Every reader in :data:`IMAGE_READERS` (keyed by lower-case file suffix) returns uint8 (H, W, 3):

* 8-bit images are kept; grayscale is repeated to 3 channels; alpha is composited on black;
  palette images are expanded; JPEG EXIF orientation is applied.
* 16-bit images (PNG ``I;16``/``I``, TIFF) are scaled by the **dtype range**, not per image:
  ``round(value * 255 / 65535)`` (as :func:`medmerge.data.npz.to_uint8`), so intensities stay
  comparable across images. Float images must lie in [0, 1].
* DICOM: pydicom's modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence), then its VOI
  LUT (a VOI LUT Sequence, else the first WindowCenter/WindowWidth) mapped from its output range to
  0..255, or the min-max of the rescaled pixels when there is neither; MONOCHROME1 inverted.

:func:`load_and_resize` is the one way a file (or array) becomes a model input of a given size and
resize policy: preparation and prediction both call it.

Unreadable (truncated, corrupt) files raise :class:`~medmerge.data.npz.DataError` naming the file.
"""

from __future__ import annotations

import importlib
import logging
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medmerge.data.npz import DataError, to_uint8
from medmerge.data.resize import DEFAULT_RESIZE, resize_image, to_rgb

log = logging.getLogger("medmerge.data")

DEFAULT_IMAGE_SIZE = 224


# ---------------------------------------------------------------- arrays -> uint8 RGB


def _int_to_uint16(pixels: np.ndarray, where: str) -> np.ndarray:
    lo, hi = int(pixels.min()), int(pixels.max())
    if lo < 0 or hi > 65535:
        raise DataError(f"{where}: integer pixels in [{lo}, {hi}]; expected 16-bit values in 0..65535")
    return pixels.astype(np.uint16)


#: dtype name -> pre-conversion to a dtype that :func:`to_uint8` accepts (uint8, uint16, float)
_DTYPE_ADAPTERS: dict[str, Callable[[np.ndarray, str], np.ndarray]] = {
    "int32": _int_to_uint16,
    "int64": _int_to_uint16,
}


def pixels_to_rgb(pixels: np.ndarray, where: str) -> np.ndarray:
    """(H, W) or (H, W, C) pixels (C in 1/3/4; uint8, 16-bit or float in [0, 1]) -> uint8 (H, W, 3)."""
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (1, 3, 4)):
        raise DataError(
            f"{where}: pixel array of shape {pixels.shape}; expected (H, W) or (H, W, C), C in 1/3/4"
        )
    adapt = _DTYPE_ADAPTERS.get(pixels.dtype.name)
    if adapt is not None:
        pixels = adapt(pixels, where)
    return to_rgb(to_uint8(pixels, where)[None])[0]


# ---------------------------------------------------------------- Pillow (PNG, JPEG, BMP, TIFF)


def _palette_mode(image: Image.Image) -> str:
    return "RGBA" if "transparency" in image.info else "RGB"


#: Pillow mode -> the mode it is converted to before :func:`pixels_to_rgb` (modes not listed are kept)
PIL_MODE_CONVERSIONS: dict[str, str | Callable[[Image.Image], str]] = {
    "1": "L",
    "P": _palette_mode,
    "PA": "RGBA",
    "LA": "RGBA",
    "La": "RGBA",
    "RGBa": "RGBA",
    "RGBX": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
}
_PIL_KEPT_MODES = ("L", "RGB", "RGBA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def _pil_pixels(image: Image.Image, where: str) -> np.ndarray:
    target = PIL_MODE_CONVERSIONS.get(image.mode, image.mode)
    target = target(image) if callable(target) else target
    if target not in _PIL_KEPT_MODES:
        raise DataError(
            f"{where}: unsupported image mode {image.mode!r}; "
            f"supported: {sorted(set(_PIL_KEPT_MODES) | set(PIL_MODE_CONVERSIONS))}"
        )
    return np.asarray(image if target == image.mode else image.convert(target))


def _single_frame(n_frames: int, where: str) -> None:
    if n_frames > 1:
        raise DataError(f"{where}: has {n_frames} frames/pages; expected a single 2-D image")


def read_pil(path: Path, min_size: int | None = None) -> np.ndarray:
    """An image file Pillow can decode (PNG, JPEG, BMP, TIFF) -> uint8 (H, W, 3).

    With ``min_size``, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps both sides at
    least ``min_size`` (libjpeg's scaled decoding: several times faster for large photographs).
    """
    try:
        with Image.open(path) as image:
            _single_frame(getattr(image, "n_frames", 1), str(path))
            if min_size is not None and image.format == "JPEG":
                image.draft(image.mode, (min_size, min_size))
            image.load()
            pixels = _pil_pixels(ImageOps.exif_transpose(image), str(path))
    except DataError:
        raise
    except UnidentifiedImageError as err:
        raise DataError(f"{path}: unreadable image file (not a recognised image format: {err})") from None
    except _PIL_ERRORS as err:
        raise DataError(f"{path}: unreadable image file (truncated or corrupt: {err})") from None
    return pixels_to_rgb(pixels, str(path))


# ---------------------------------------------------------------- optional libraries


def _optional_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _require(name: str, path: Path, why: str) -> ModuleType:
    module = _optional_module(name)
    if module is None:
        raise DataError(
            f"{path}: reading {why} needs the '{name}' package; install it with `pip install {name}`"
        )
    return module


# ---------------------------------------------------------------- TIFF


def read_tiff(path: Path, min_size: int | None = None) -> np.ndarray:
    """A single-page TIFF -> uint8 (H, W, 3), via tifffile when installed (exact 16-bit RGB), else Pillow."""
    tifffile = _optional_module("tifffile")
    if tifffile is None:
        return read_pil(path)
    try:
        with tifffile.TiffFile(path) as tif:
            _single_frame(len(tif.pages), str(path))
            page = tif.pages[0]
            pixels = page.asarray()
            if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and pixels.ndim == 3:
                pixels = np.moveaxis(pixels, 0, -1)
    except DataError:
        raise
    except (OSError, ValueError, KeyError, IndexError, struct.error, tifffile.TiffFileError) as err:
        raise DataError(f"{path}: unreadable image file (truncated or corrupt TIFF: {err})") from None
    return pixels_to_rgb(np.ascontiguousarray(pixels), str(path))


# ---------------------------------------------------------------- DICOM


def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] to 0..255 (clipped, rounded); a flat range maps to 0."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint(np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_window_width(ds: object) -> None:
    width = getattr(ds, "WindowWidth", None)
    if width is None:
        return
    first = width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width
    if float(first) <= 0:
        raise ValueError(f"WindowWidth must be > 0, got {first}")


def _voi_range(ds: object, processing: ModuleType) -> tuple[float, float] | None:
    """The output range of the dataset's VOI transform, or None when it has none."""
    if ds.get("VOILUTSequence"):
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        low, high = processing.apply_windowing(np.array([-np.inf, np.inf]), ds)
        return float(low), float(high)
    return None


def dicom_gray_to_uint8(pixels: np.ndarray, ds: object) -> np.ndarray:
    """Monochrome DICOM pixels -> uint8 through pydicom's modality and VOI LUTs, MONOCHROME1 inverted."""
    from pydicom.pixels import processing

    _check_window_width(ds)
    values = processing.apply_modality_lut(pixels, ds)
    voi = _voi_range(ds, processing)
    if voi is None:
        out = window_to_uint8(values, float(values.min()), float(values.max()))
    else:
        out = window_to_uint8(processing.apply_voi_lut(values, ds, index=0).astype(np.float64), *voi)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip()
    return 255 - out if photometric == "MONOCHROME1" else out


def _dicom_pixels(ds: object, path: Path) -> np.ndarray:
    _single_frame(int(getattr(ds, "NumberOfFrames", 1) or 1), str(path))
    pixels = ds.pixel_array
    if int(getattr(ds, "SamplesPerPixel", 1)) > 1:
        return pixels_to_rgb(pixels, str(path))  # RGB (pydicom converts YBR to RGB); 16-bit by dtype range
    try:
        gray = dicom_gray_to_uint8(pixels, ds)
    except ValueError as err:
        raise DataError(f"{path}: {err}") from None
    return pixels_to_rgb(gray, str(path))


def read_dicom(path: Path, min_size: int | None = None) -> np.ndarray:
    """A single-frame DICOM file -> uint8 (H, W, 3) (pydicom is imported only when needed)."""
    pydicom = _require("pydicom", path, "DICOM files")
    try:
        ds = pydicom.dcmread(path)
        return _dicom_pixels(ds, path)
    except DataError:
        raise
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, AttributeError, KeyError,
            EOFError, NotImplementedError, RuntimeError, TypeError, struct.error) as err:  # fmt: skip
        raise DataError(f"{path}: unreadable DICOM file ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------- registry and batch reading

ImageReader = Callable[..., np.ndarray]

#: lower-case file suffix -> ``reader(path, min_size=None)`` returning uint8 (H, W, 3); ``min_size`` is a
#: hint that the image will be shrunk to that size (a reader may decode at a reduced scale)
IMAGE_READERS: dict[str, ImageReader] = {
    ".png": read_pil,
    ".jpg": read_pil,
    ".jpeg": read_pil,
    ".bmp": read_pil,
    ".tif": read_tiff,
    ".tiff": read_tiff,
    ".dcm": read_dicom,
}


def is_image_file(path: Path) -> bool:
    """A visible regular file with a suffix in :data:`IMAGE_READERS`."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_READERS and path.is_file()


def read_image(path: str | Path, image_size: int | None = None, policy: str = DEFAULT_RESIZE) -> np.ndarray:
    """One image file -> uint8 (H, W, 3), resized to (image_size, image_size) by ``policy`` when given."""
    if image_size is not None:
        return load_and_resize(path, image_size, policy)
    return _decode(Path(path))


def _decode(path: Path, min_size: int | None = None) -> np.ndarray:
    reader = IMAGE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: no image reader for suffix {path.suffix!r}; supported: {sorted(IMAGE_READERS)}"
        )
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    return reader(path, min_size=min_size)


def load_rgb(source: str | Path | np.ndarray, size_hint: int | None = None) -> np.ndarray:
    """A file path or a pixel array (see :func:`pixels_to_rgb`) -> uint8 (H, W, 3), before resizing."""
    if isinstance(source, np.ndarray):
        return pixels_to_rgb(source, "image array")
    return _decode(Path(source), size_hint)


def load_and_resize(source: str | Path | np.ndarray, size: int, policy: str = DEFAULT_RESIZE) -> np.ndarray:
    """An image file (PNG, JPEG, BMP, TIFF, DICOM) or pixel array -> the uint8 (size, size, 3) model input.

    ``policy`` is a resize policy of :data:`medmerge.data.resize.RESIZE_POLICIES` (squash, pad,
    center_crop). The prepare stage writes exactly this for every image, so prediction on new files
    that calls it sees what training saw.
    """
    return resize_image(load_rgb(source, size), size, policy)


def warn_upscaled(small: Sequence[object], total: int, image_size: int, label: str) -> None:
    """One warning for all images smaller than ``image_size`` (they were upscaled)."""
    if small:
        log.warning(
            "%s: %d of %d image(s) are smaller than %d px and were upscaled (e.g. %s)",
            label or "images", len(small), total, image_size, small[0],
        )  # fmt: skip


def read_images(
    paths: Sequence[Path], image_size: int = DEFAULT_IMAGE_SIZE, label: str = "", policy: str = DEFAULT_RESIZE
) -> np.ndarray:
    """Read and resize a few files into uint8 (N, S, S, 3) in memory; one warning for all images below S px.

    For whole datasets the prepare stage streams the files into a memory map instead
    (:func:`medmerge.data.prepare.prepare_dataset`).
    """
    if int(image_size) != image_size or image_size < 1:
        raise DataError(f"{label or 'images'}: image_size must be a positive integer, got {image_size!r}")
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    small = []
    for i, path in enumerate(paths):
        image = load_rgb(path, image_size)
        if min(image.shape[:2]) < image_size:
            small.append(path)
        out[i] = resize_image(image, image_size, policy)
    warn_upscaled(small, len(paths), image_size, label)
    return out
