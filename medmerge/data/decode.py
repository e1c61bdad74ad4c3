"""The work of one decoding worker: load, resize and write a chunk of images into a ``.npy`` memory map.

:func:`serve` is the loop of a worker process (started by :mod:`medmerge.data.prepare`): it
reads pickled tasks ``(dest, start, items, size, policy)`` from stdin and answers each on stdout with
``("ok", ChunkReport)`` or ``("error", exception)``, until stdin closes. It imports only NumPy, Pillow
and the image readers, not the stage that started it (no torch).
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medmerge.data.images import load_rgb
from medmerge.data.resize import resize_image
from medmerge.data.validate import image_digest


@dataclass
class ChunkReport:
    """What a filled chunk tells the caller: the image hashes (duplicate check) and upscaled files."""

    hashes: list[bytes]
    small: list[str]


def fill_chunk(dest: str, start: int, items: Sequence, size: int, policy: str) -> ChunkReport:
    """Load, resize and write ``items`` (files or arrays) into rows ``start:`` of the ``.npy`` at ``dest``."""
    out = np.empty((len(items), size, size, 3), dtype=np.uint8)
    small = []
    for i, item in enumerate(items):
        image = load_rgb(item, size)
        if not isinstance(item, np.ndarray) and min(image.shape[:2]) < size:
            small.append(str(item))
        out[i] = resize_image(image, size, policy)
    target = np.load(dest, mmap_mode="r+")
    target[start : start + len(items)] = out
    target.flush()
    del target  # unmapped: the written pages leave this process
    return ChunkReport([image_digest(image) for image in out], small)


def serve() -> None:
    """The worker loop (see the module docstring)."""
    tasks, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the answer pipe
    while True:
        try:
            task = pickle.load(tasks)
        except EOFError:
            return
        try:
            answer = ("ok", fill_chunk(*task))
        except Exception as error:  # noqa: BLE001 (sent to the parent, which raises it)
            answer = ("error", error)
        pickle.dump(answer, answers)
        answers.flush()
