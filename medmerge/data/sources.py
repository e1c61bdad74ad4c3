"""The ``imagefolder`` and ``csv`` data origins: image files on disk -> one MedMNIST-layout ``.npz``.

Both collect :class:`ImageRecords` (which file, which class, which patient, which split if given),
check everything that is cheap to check, assign missing splits (:mod:`medmerge.data.splits`), read
and resize the images (:mod:`medmerge.data.images`), then write ``<name>.splits.csv`` and the
``.npz`` atomically.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medmerge.data.images import DEFAULT_IMAGE_SIZE, IMAGE_READERS, is_image_file, read_images
from medmerge.data.npz import SPLITS, DataError, save_npz_atomic
from medmerge.data.splits import (
    assign_splits,
    canonical_split,
    check_fractions,
    manifest_path,
    split_order,
    write_manifest,
)

log = logging.getLogger("medmerge.data")


@dataclass
class ImageRecords:
    """One entry per image: file to read, name in the manifest, class index, group, given split."""

    files: list[Path]
    names: list[str]
    labels: np.ndarray
    groups: np.ndarray
    splits: np.ndarray | None


def _warn_shared_groups(groups: np.ndarray, splits: np.ndarray, source: str) -> None:
    """Warn when a group (patient) has images in more than one split (possible with given splits)."""
    frame = pd.DataFrame({"group": groups, "split": splits})
    per_group = frame.groupby("group")["split"].nunique()
    shared = per_group[per_group > 1]
    if len(shared):
        log.warning(
            "%s: %d group(s) have images in more than one split (e.g. %r); the given splits leak patients",
            source,
            len(shared),
            shared.index[0],
        )


def write_image_dataset(
    out_path: Path,
    records: ImageRecords,
    class_names: list[str],
    *,
    image_size: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    source: str,
) -> Path:
    """Assign splits, read the images in split order, write the manifest, then the npz."""
    check_fractions(val_fraction, test_fraction, source)
    splits = assign_splits(
        records.labels, records.groups, records.splits, val_fraction, test_fraction, seed, source
    )
    _warn_shared_groups(records.groups, splits, source)
    try:
        order = split_order(splits)
    except DataError as err:
        raise DataError(f"{source}: {err}") from None
    flat = np.concatenate(list(order.values()))
    images = read_images([records.files[i] for i in flat], image_size, label=source)
    arrays, start = {}, 0
    for split, idx in order.items():
        arrays[f"{split}_images"] = images[start : start + len(idx)]
        arrays[f"{split}_labels"] = records.labels[idx].astype(np.int64)[:, None]
        start += len(idx)
    arrays["class_names"] = np.array(class_names, dtype=str)
    rows = [(records.names[i], class_names[records.labels[i]], splits[i], records.groups[i]) for i in flat]
    manifest = write_manifest(manifest_path(out_path), rows)
    try:
        save_npz_atomic(out_path, arrays)
    except BaseException:
        manifest.unlink(missing_ok=True)  # no manifest without its npz
        raise
    counts = {split: len(idx) for split, idx in order.items()}
    log.info(
        "%s: %d images, %d classes, splits %s -> %s", source, len(flat), len(class_names), counts, out_path
    )
    return out_path


# ---------------------------------------------------------------- imagefolder


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _auto_split_folders(root: Path) -> dict[str | None, Path]:
    found: dict[str, Path] = {}
    for folder in _visible_dirs(root):
        split = canonical_split(folder.name)
        if split is None:
            continue
        if split in found:
            raise DataError(
                f"{root}: folders {found[split].name!r} and {folder.name!r} both name the {split} split"
            )
        found[split] = folder
    if not found:
        return {None: root}
    if "train" not in found:
        raise DataError(
            f"{root}: split folder(s) {sorted(f.name for f in found.values())} but no train folder"
        )
    ignored = [f.name for f in _visible_dirs(root) if f not in found.values()]
    if ignored:
        log.warning("%s: folder(s) %s are not split folders and were ignored", root, ignored)
    return dict(found)


def _given_split_folders(root: Path, splits: dict[str, str]) -> dict[str | None, Path]:
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or "train" not in splits:
        raise DataError(
            f"{root}: option splits={splits!r}; expected keys from {list(SPLITS)} including 'train'"
        )
    folders = {split: root / name for split, name in splits.items()}
    for split, folder in folders.items():
        if not folder.is_dir():
            raise DataError(f"{folder}: folder for the {split} split not found (option splits={splits!r})")
    return dict(folders)


def _hidden(path: Path, base: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(base).parts)


def _class_images(class_dir: Path) -> list[Path]:
    """Image files under a class folder (recursively), hidden files/folders and other files skipped."""
    files = [p for p in sorted(class_dir.rglob("*")) if not _hidden(p, class_dir) and is_image_file(p)]
    if not files:
        raise DataError(
            f"{class_dir}: class folder has no image files; expected files ending in {sorted(IMAGE_READERS)}"
        )
    return files


def _list_split_folder(folder: Path) -> dict[str, list[Path]]:
    """{class name: image files} of one split folder (or of the root without split folders)."""
    class_dirs = _visible_dirs(folder)
    if not class_dirs:
        raise DataError(f"{folder}: no class folders; expected <class>/<image> files inside")
    loose = [p.name for p in folder.iterdir() if is_image_file(p)]
    if loose:
        log.warning(
            "%s: %d image file(s) outside any class folder were ignored (e.g. %s)",
            folder,
            len(loose),
            loose[0],
        )
    return {d.name: _class_images(d) for d in class_dirs}


def _folder_class_names(listing: dict[Path, dict[str, list[Path]]], classes: list[str] | None) -> list[str]:
    """Sorted class folder names, or ``classes`` (then every class folder must be one of them)."""
    if classes is None:
        return sorted({name for per_class in listing.values() for name in per_class})
    for folder, per_class in listing.items():
        unknown = [name for name in per_class if name not in classes]
        if unknown:
            raise DataError(
                f"{folder / unknown[0]}: class folder {unknown[0]!r} is not one of the classes {classes}"
            )
    return [str(c) for c in classes]


def fetch_imagefolder(
    out_path: Path,
    *,
    root: str | Path,
    image_size: int = DEFAULT_IMAGE_SIZE,
    splits: dict[str, str] | None = None,
    classes: list[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Path:
    """``root/<split>/<class>/<image>`` or ``root/<class>/<image>`` (splits then stratified by class)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (option root)")
    folders = _auto_split_folders(root) if splits is None else _given_split_folders(root, splits)
    listing = {split: _list_split_folder(folder) for split, folder in folders.items()}
    class_names = _folder_class_names(
        {folders[split]: per_class for split, per_class in listing.items()}, classes
    )
    index = {name: i for i, name in enumerate(class_names)}
    files, labels, given = [], [], []
    for split, per_class in listing.items():
        for name, paths in per_class.items():
            files += paths
            labels += [index[name]] * len(paths)
            given += [split or "train"] * len(paths)
    names = [p.relative_to(root).as_posix() for p in files]
    records = ImageRecords(files, names, np.array(labels, dtype=np.int64), np.array(names), np.array(given))
    return write_image_dataset(
        Path(out_path), records, class_names, image_size=image_size, val_fraction=val_fraction,
        test_fraction=test_fraction, seed=seed, source=str(root),
    )  # fmt: skip


# ---------------------------------------------------------------- csv


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: CSV manifest not found (option path)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
    if table.empty:
        raise DataError(f"{path}: CSV manifest has no rows")
    return table.apply(lambda column: column.str.strip())


def _require_columns(table: pd.DataFrame, columns: dict[str, str | None], path: Path) -> None:
    missing = {
        option: name for option, name in columns.items() if name is not None and name not in table.columns
    }
    if missing:
        wanted = ", ".join(f"{option}={name!r}" for option, name in missing.items())
        raise DataError(f"{path}: missing column(s) {wanted}; columns found: {list(table.columns)}")


def _line(row: int) -> str:
    """CSV line of a 0-based data row (line 1 is the header)."""
    return f"line {row + 2}"


_INT = re.compile(r"[+-]?\d+")


def _default_classes(values: list[str]) -> list[str]:
    """Integer labels -> names "0".."max" (labels are class indices); otherwise sorted unique labels."""
    if all(_INT.fullmatch(v) for v in values) and min(int(v) for v in values) >= 0:
        return [str(i) for i in range(max(int(v) for v in values) + 1)]
    return sorted(set(values))


def label_indices(values: list[str], classes: list[str], path: Path) -> np.ndarray:
    """Class index per label: a class name, else an integer index into ``classes``."""
    lookup = {name: i for i, name in enumerate(classes)}
    out = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        index = lookup.get(value)
        if index is None and _INT.fullmatch(value) and 0 <= int(value) < len(classes):
            index = int(value)
        if index is None:
            raise DataError(
                f"{path}, {_line(row)}: label {value!r} is not one of the classes {classes} "
                f"(nor a class index 0..{len(classes) - 1})"
            )
        out[row] = index
    return out


def _image_files(values: list[str], image_root: Path, path: Path) -> list[Path]:
    files = []
    for row, value in enumerate(values):
        if not value:
            raise DataError(f"{path}, {_line(row)}: empty image path")
        file = image_root / value
        if file.suffix.lower() not in IMAGE_READERS:
            raise DataError(
                f"{path}, {_line(row)}: {value!r} is not a supported image file; "
                f"expected a suffix in {sorted(IMAGE_READERS)}"
            )
        files.append(file)
    missing = [row for row, file in enumerate(files) if not file.is_file()]
    if missing:
        row = missing[0]
        raise DataError(
            f"{path}, {_line(row)}: image {values[row]!r} not found at {files[row]} "
            f"({len(missing)} missing file(s) in total; image_root={image_root})"
        )
    return files


def _given_splits(values: list[str], path: Path, column: str) -> np.ndarray:
    out = []
    for row, value in enumerate(values):
        split = canonical_split(value)
        if split is None:
            raise DataError(
                f"{path}, {_line(row)}: {column} {value!r} is not a split; expected one of {list(SPLITS)}"
            )
        out.append(split)
    return np.array(out)


def _groups(values: list[str], path: Path, column: str) -> np.ndarray:
    empty = [row for row, value in enumerate(values) if not value]
    if empty:
        raise DataError(f"{path}, {_line(empty[0])}: empty {column!r} ({len(empty)} row(s) without a group)")
    return np.array(values)


def fetch_csv(
    out_path: Path,
    *,
    path: str | Path,
    image_root: str | Path | None = None,
    path_column: str = "path",
    label_column: str = "label",
    split_column: str | None = None,
    group_column: str | None = None,
    classes: list[str] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Path:
    """A CSV manifest of image paths and labels (+ optional split and patient/group columns).

    ``split_column`` None uses a column named ``split`` when there is one; without a split column
    the splits are stratified by label and grouped by ``group_column`` (one group per row if unset).
    """
    path = Path(path)
    table = _read_csv(path)
    if split_column is None and "split" in table.columns:
        split_column = "split"
    columns = {"path_column": path_column, "label_column": label_column,
               "split_column": split_column, "group_column": group_column}  # fmt: skip
    _require_columns(table, columns, path)
    image_root = Path(image_root) if image_root is not None else path.parent
    labels_raw = table[label_column].tolist()
    class_names = [str(c) for c in classes] if classes is not None else _default_classes(labels_raw)
    labels = label_indices(labels_raw, class_names, path)
    names = table[path_column].tolist()
    files = _image_files(names, image_root, path)
    groups = _groups(table[group_column].tolist(), path, group_column) if group_column else np.array(names)
    given = _given_splits(table[split_column].tolist(), path, split_column) if split_column else None
    records = ImageRecords(files, names, labels, groups, given)
    return write_image_dataset(
        Path(out_path), records, class_names, image_size=image_size, val_fraction=val_fraction,
        test_fraction=test_fraction, seed=seed, source=str(path),
    )  # fmt: skip
