"""Channels and size: every image becomes uint8 (S, S, 3) by one of the resize policies.

A policy maps an image of any aspect ratio to a square (see :data:`RESIZE_POLICIES`):

* ``squash`` (the default): both sides scaled to S independently; the aspect ratio is not kept;
* ``pad``: the longer side scaled to S, the image centred on a black square (letterbox);
* ``center_crop``: the central square of side min(H, W) cut out, then scaled to S.

Downscaling averages pixels (Pillow's BOX filter), upscaling is bilinear. Preparation
(:mod:`medmerge.data.prepare`) and prediction use the same functions
(:func:`medmerge.data.images.load_and_resize`), so a model sees its inputs as it was trained.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from medmerge.data.npz import DataError

DEFAULT_RESIZE = "squash"


# ---------------------------------------------------------------- channels


def _alpha_over_black(images: np.ndarray) -> np.ndarray:
    rgb, alpha = images[..., :3].astype(np.uint16), images[..., 3:].astype(np.uint16)
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


#: channel count -> converter of a (n, H, W, C) uint8 chunk to (n, H, W, 3)
CHANNEL_CONVERTERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda images: np.repeat(images, 3, axis=-1),
    3: lambda images: images,
    4: _alpha_over_black,
}


def to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W) or (n, H, W, C) with C in 1/3/4 -> (n, H, W, 3); RGBA is composited on black."""
    if images.ndim == 3:
        images = images[..., None]
    channels = images.shape[-1]
    if images.ndim != 4 or channels not in CHANNEL_CONVERTERS:
        raise DataError(f"cannot make RGB from images of shape {images.shape}")
    return CHANNEL_CONVERTERS[channels](images)


# ---------------------------------------------------------------- size


def _scaled(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, 3) scaled to (height, width): BOX when shrinking both sides, else bilinear."""
    if image.shape[:2] == (height, width):
        return image
    shrink = height <= image.shape[0] and width <= image.shape[1]
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def squash(image: np.ndarray, size: int) -> np.ndarray:
    """Both sides scaled to ``size`` (aspect ratio not kept)."""
    return _scaled(image, size, size)


def pad(image: np.ndarray, size: int) -> np.ndarray:
    """Longer side scaled to ``size``, centred on black (the aspect ratio is kept, nothing is cut)."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = _scaled(image, new_w, new_h)
    return out


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Central square of side min(H, W), scaled to ``size`` (the aspect ratio is kept, the edges are cut)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return _scaled(image[top : top + side, left : left + side], size, size)


#: policy name -> ``fn(uint8 (H, W, 3), size) -> uint8 (size, size, 3)``
RESIZE_POLICIES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "squash": squash,
    "pad": pad,
    "center_crop": center_crop,
}


def check_policy(policy: str) -> str:
    if policy not in RESIZE_POLICIES:
        raise DataError(f"unknown resize policy {policy!r}; expected one of {sorted(RESIZE_POLICIES)}")
    return policy


def resize_image(image: np.ndarray, size: int, policy: str = DEFAULT_RESIZE) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3) by ``policy`` (a key of :data:`RESIZE_POLICIES`)."""
    return np.ascontiguousarray(RESIZE_POLICIES[check_policy(policy)](image, int(size)))


def resize_images(images: np.ndarray, size: int, policy: str = DEFAULT_RESIZE) -> np.ndarray:
    """uint8 (n, H, W, 3) -> (n, size, size, 3); no-op when already that size."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = resize_image(image, size, policy)
    return out
