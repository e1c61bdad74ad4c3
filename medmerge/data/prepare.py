"""Turn a raw dataset into memory-mappable, fixed-size RGB arrays, streaming in bounded chunks.

A raw dataset is either a MedMNIST-layout ``.npz`` (:class:`RawDataset`, arrays in memory) or the
manifest of an image-file dataset (:class:`ImageManifest`: the files are read where they are). Each
split's image array is preallocated on disk (``np.lib.format.open_memmap``) and filled chunk by chunk
of :data:`CHUNK` images: every image goes through :func:`medmerge.data.images.load_and_resize` (the
dataset's resize policy), files are decoded by ``workers`` processes (:mod:`medmerge.data.decode`), each
writing its chunk straight into the memory map. So no step holds a split in memory, and the output does not depend on ``workers``.

Output directory layout (written atomically)::

    {split}_images.npy   uint8 (N, S, S, 3), C-contiguous: np.load(..., mmap_mode="r") works
    {split}_labels.npy   int64 (N,)
    meta.json            classes, num_classes, image_size, resize, ordinal, counts, source,
                         imbalance_ratio, train_subsample, duplicates_across_splits
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import subprocess
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from medmerge.data import decode
from medmerge.data.decode import ChunkReport
from medmerge.data.images import warn_upscaled
from medmerge.data.manifest import ImageManifest, manifest_path, read_image_manifest
from medmerge.data.npz import SPLITS, DataError, RawDataset, load_npz
from medmerge.data.resize import DEFAULT_RESIZE, check_policy, resize_images, to_rgb  # noqa: F401
from medmerge.data.subsample import subsample_train
from medmerge.data.validate import check_missing_classes, log_imbalance, warn_duplicates
from medmerge.io import atomic_directory

log = logging.getLogger("medmerge.data")

CHUNK = 64  # images decoded, resized and written by one task
META_FILE = "meta.json"


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def open_raw_dataset(npz_path: Path, num_classes: int | None = None) -> RawDataset | ImageManifest:
    """What ``fetch_data`` wrote for a dataset: its ``.npz``, else its split manifest of image files."""
    npz_path = Path(npz_path)
    if npz_path.is_file():
        return load_npz(npz_path, num_classes=num_classes)
    if manifest_path(npz_path).is_file():
        return read_image_manifest(npz_path)
    raise DataError(f"{npz_path}: not found (nor {manifest_path(npz_path).name}); run the fetch_data stage first")


# ---------------------------------------------------------------- classes and counts


def _check_same_order(raw: RawDataset | ImageManifest, names: list[str]) -> None:
    """The given names may rename the file's classes, but not reorder the same names (labels would swap)."""
    if raw.class_names is not None and set(raw.class_names) == set(names) and raw.class_names != names:
        raise DataError(
            f"{raw.source}: the file's classes {raw.class_names} are the given classes {names} in another "
            "order, so labels would be swapped; pass the classes to the fetch step too (or reorder them)"
        )


def resolve_class_names(raw: RawDataset | ImageManifest, class_names: list[str] | None = None) -> list[str]:
    """The given names, else the file's names, else ``class_{i}`` for 0..max label."""
    if class_names is not None:
        names = [str(n) for n in class_names]
        _check_same_order(raw, names)
    elif raw.class_names is not None:
        names = list(raw.class_names)
    else:
        names = [f"class_{i}" for i in range(raw.num_classes)]
    if len(set(names)) != len(names):
        raise DataError(f"{raw.source}: class names are not unique: {names}")
    top = max(int(labels.max()) for labels in raw.labels.values())
    if top >= len(names):
        raise DataError(f"{raw.source}: label {top} but only {len(names)} class names: {names}")
    return names


def class_counts(labels: dict[str, np.ndarray], class_names: list[str]) -> dict[str, dict[str, int]]:
    """{split: {class_name: n}} including classes with zero samples."""
    return {
        split: dict(zip(class_names, np.bincount(y, minlength=len(class_names)).tolist(), strict=True))
        for split, y in labels.items()
    }


def imbalance_ratio(counts: dict[str, int]) -> float | None:
    """max/min class count; None when a class has no samples."""
    low = min(counts.values())
    return None if low == 0 else max(counts.values()) / low


# ---------------------------------------------------------------- writing


def _chunks(items: Sequence) -> Iterator[tuple[int, Sequence]]:
    for start in range(0, len(items), CHUNK):
        yield start, items[start : start + CHUNK]


def _files(items: Sequence) -> bool:
    return not isinstance(items, np.ndarray)


class DecodingWorkers:
    """``count`` worker processes (:func:`medmerge.data.decode.serve`) fed chunks over pipes.

    Chunk ``k`` goes to worker ``k % count`` and each worker answers in order, so the reports come back in
    chunk order; at most two chunks per worker are in flight. The workers are fresh interpreters that
    import only NumPy, Pillow and the readers: neither this process's memory (torch, the labels) nor its
    threads are inherited.
    """

    def __init__(self, count: int) -> None:
        paths = [path or os.getcwd() for path in sys.path]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        # imported, not run as __main__, so that its classes unpickle here under their module's name
        command = [sys.executable, "-c", "from medmerge.data.decode import serve; serve()"]
        self.processes = [
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) for _ in range(count)
        ]

    def map(self, tasks: Iterator[tuple]) -> Iterator[ChunkReport]:
        pending: deque[subprocess.Popen] = deque()
        for k, task in enumerate(tasks):
            worker = self.processes[k % len(self.processes)]
            pickle.dump(task, worker.stdin)
            worker.stdin.flush()
            pending.append(worker)
            if len(pending) >= 2 * len(self.processes):
                yield self._answer(pending.popleft())
        while pending:
            yield self._answer(pending.popleft())

    @staticmethod
    def _answer(worker: subprocess.Popen) -> ChunkReport:
        try:
            status, value = pickle.load(worker.stdout)
        except EOFError:
            raise RuntimeError(f"decoding worker {worker.pid} exited with status {worker.wait()}") from None
        if status == "error":
            raise value
        return value

    def close(self, kill: bool = False) -> None:
        for worker in self.processes:
            if kill:
                worker.kill()
            else:
                worker.stdin.close()
        for worker in self.processes:
            worker.wait()
            worker.stdout.close()
            if kill:
                worker.stdin.close()


@contextlib.contextmanager
def decoding_workers(workers: int, splits: Sequence[Sequence]) -> Iterator[DecodingWorkers | None]:
    """``workers`` decoding processes when there are files to decode in more than one chunk, else None;
    one set serves every split, and they are stopped (killed on an error) when the block ends."""
    if workers <= 1 or not any(_files(items) and len(items) > CHUNK for items in splits):
        yield None
        return
    pool = DecodingWorkers(workers)
    try:
        yield pool
    except BaseException:
        pool.close(kill=True)
        raise
    pool.close()


def write_images(
    dest: Path,
    items: Sequence,
    size: int,
    policy: str = DEFAULT_RESIZE,
    workers: DecodingWorkers | None = None,
    label: str = "",
) -> set[bytes]:
    """Preallocate ``dest`` as uint8 (N, size, size, 3) ``.npy`` and fill it; return the image hashes.

    Files are decoded by the ``workers`` processes when given (see :func:`decoding_workers`), arrays
    always in this process (they are in memory already).
    """
    check_policy(policy)
    np.lib.format.open_memmap(dest, mode="w+", dtype=np.uint8, shape=(len(items), size, size, 3)).flush()
    reports = (
        workers.map((str(dest), start, list(chunk), size, policy) for start, chunk in _chunks(items))
        if workers is not None and _files(items)
        else (decode.fill_chunk(str(dest), start, chunk, size, policy) for start, chunk in _chunks(items))
    )
    hashes: set[bytes] = set()
    small: list[str] = []
    for report in reports:
        hashes.update(report.hashes)
        small += report.small
    warn_upscaled(small, len(items), size, label)
    return hashes


def _take(items: Sequence, index: np.ndarray) -> Sequence:
    return items[index] if isinstance(items, np.ndarray) else [items[i] for i in index]


def _subsample(
    raw: RawDataset | ImageManifest, num_classes: int, fraction: float | None, per_class: int | None, seed: int,
    subset: str = "kept",
) -> tuple[Sequence, np.ndarray, dict | None]:
    """The training items and labels to write (the subsample, or with ``subset="rest"`` every image it leaves
    out), and what the subsampling did (None: all kept)."""
    images, labels = raw.images["train"], raw.labels["train"]
    if fraction is None and per_class is None:
        return images, labels, None
    groups = getattr(raw, "groups", {}).get("train")
    groups = np.arange(len(labels)) if groups is None else groups
    keep = subsample_train(labels, groups, num_classes, fraction=fraction, per_class=per_class, seed=seed)
    if subset == "rest":
        keep = np.setdiff1d(np.arange(len(labels)), keep)
    info = {"train_fraction": fraction, "n_train_per_class": per_class, "seed": seed, "subset": subset,
            "images_before": len(labels), "images_after": len(keep)}  # fmt: skip
    log.info("%s: training split subsampled %s", raw.source.name, info)
    return _take(images, keep), labels[keep], info


def prepare_dataset(
    raw: RawDataset | ImageManifest,
    image_size: int,
    out_dir: Path,
    class_names: list[str] | None = None,
    *,
    resize: str = DEFAULT_RESIZE,
    workers: int = 1,
    allow_missing_classes: bool = False,
    train_fraction: float | None = None,
    n_train_per_class: int | None = None,
    subsample_seed: int = 0,
    train_subset: str = "kept",
    ordinal: bool = False,
) -> dict:
    """Write resized RGB uint8 arrays, int64 labels and ``meta.json`` to ``out_dir``; return the meta.

    ``resize`` is the aspect-ratio policy; ``train_fraction`` / ``n_train_per_class`` subsample the
    training split (:mod:`medmerge.data.subsample`), ``train_subset="rest"`` keeps its complement; a train
    split without some class is a DataError unless ``allow_missing_classes``. Everything is written into a
    temporary sibling directory that replaces ``out_dir`` only when complete, so a failure leaves the
    previous ``out_dir`` (or none).
    """
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    check_policy(resize)
    out_dir, size, source = Path(out_dir), int(image_size), raw.source.name
    names = resolve_class_names(raw, class_names)
    train_images, train_labels, subsample = _subsample(
        raw, len(names), train_fraction, n_train_per_class, subsample_seed, train_subset
    )
    items = {"train": train_images, **{split: raw.images[split] for split in SPLITS[1:]}}
    labels = {"train": train_labels, **{split: raw.labels[split] for split in SPLITS[1:]}}
    counts = class_counts(labels, names)
    check_missing_classes(counts, source, allow_missing_classes)
    imbalance = imbalance_ratio(counts["train"])
    log_imbalance(counts["train"], imbalance, source)
    hashes = {}
    with atomic_directory(out_dir) as tmp, decoding_workers(workers, list(items.values())) as decoders:
        for split in SPLITS:
            hashes[split] = write_images(
                tmp / f"{split}_images.npy", items[split], size, resize, decoders, f"{source} [{split}]"
            )
            np.save(tmp / f"{split}_labels.npy", labels[split].astype(np.int64))
        meta = {
            "classes": names,
            "num_classes": len(names),
            "image_size": size,
            "resize": resize,
            "ordinal": bool(ordinal),
            "counts": counts,
            "source": source,
            "imbalance_ratio": imbalance,
            "train_subsample": subsample,
            "duplicates_across_splits": warn_duplicates(hashes, source),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("prepared %s -> %s (%d classes, %d px, %s)", source, out_dir, len(names), size, resize)
    return meta


# ---------------------------------------------------------------- reading


def read_meta(prepared_dir: Path) -> dict:
    """The ``meta.json`` of a prepared dataset directory."""
    path = Path(prepared_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; run the prepare stage first")
    return json.loads(path.read_text())


def load_split(prepared_dir: Path, split: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, S, S, 3) (read-only memmap when ``mmap``) and labels int64 (N,) of one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    prepared_dir = Path(prepared_dir)
    paths = [prepared_dir / f"{split}_{kind}.npy" for kind in ("images", "labels")]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: not found; run the prepare stage first")
    images = np.load(paths[0], mmap_mode="r" if mmap else None, allow_pickle=False)
    labels = np.load(paths[1], allow_pickle=False)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{paths[0]}: expected uint8 (N, S, S, 3), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or labels.dtype != np.int64:
        raise DataError(f"{paths[1]}: expected int64 ({len(images)},), got {labels.dtype} {labels.shape}")
    return images, labels
