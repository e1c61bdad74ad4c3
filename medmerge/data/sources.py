"""The ``imagefolder`` and ``csv`` data origins: image files on disk -> a split manifest.

Both collect :class:`ImageRecords` (which file, which class, which patient, which split if given),
check everything that is cheap to check, assign missing splits (:mod:`medmerge.data.splits`), then
write ``<name>.splits.csv`` and ``<name>.classes.json`` (:mod:`medmerge.data.manifest`) atomically.
The pixels are not copied: the prepare stage reads each image from where it is.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medmerge.data.images import IMAGE_READERS, is_image_file
from medmerge.data.manifest import write_image_manifest
from medmerge.data.npz import SPLITS, DataError
from medmerge.data.splits import assign_splits, canonical_split, check_fractions, split_order

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
    val_fraction: float,
    test_fraction: float,
    seed: int,
    source: str,
) -> Path:
    """Assign splits and write the manifest (in split order) + class list next to ``out_path``."""
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
    rows = [
        (records.names[i], class_names[records.labels[i]], splits[i], records.groups[i], records.files[i].as_posix())
        for i in flat
    ]
    manifest = write_image_manifest(Path(out_path), rows, class_names, source)
    counts = {split: len(idx) for split, idx in order.items()}
    log.info(
        "%s: %d images, %d classes, splits %s -> %s", source, len(flat), len(class_names), counts, manifest
    )
    return manifest


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
        Path(out_path), records, class_names, val_fraction=val_fraction, test_fraction=test_fraction,
        seed=seed, source=str(root),
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


def _find(name: str, roots: list[Path]) -> Path:
    """The first of ``root / name`` that exists (the first candidate when none does)."""
    candidates = [root / name for root in roots]
    return next((c for c in candidates if c.is_file()), candidates[0])


def _image_files(values: list[str], roots: list[Path], template: str, path: Path) -> list[Path]:
    files = []
    for row, value in enumerate(values):
        if not value:
            raise DataError(f"{path}, {_line(row)}: empty image path")
        name = template.format(value)
        if Path(name).suffix.lower() not in IMAGE_READERS:
            raise DataError(
                f"{path}, {_line(row)}: {name!r} is not a supported image file; "
                f"expected a suffix in {sorted(IMAGE_READERS)} (option path_template={template!r})"
            )
        files.append(_find(name, roots))
    missing = [row for row, file in enumerate(files) if not file.is_file()]
    if missing:
        row = missing[0]
        raise DataError(
            f"{path}, {_line(row)}: image {template.format(values[row])!r} not found at {files[row]} "
            f"({len(missing)} missing file(s) in total; image_root={[str(r) for r in roots]})"
        )
    return files


def _one_hot_labels(table: pd.DataFrame, columns: list[str], path: Path) -> np.ndarray:
    """Class index per row from one-hot columns (exactly one column is 1 in each row)."""
    try:
        values = table[columns].astype(float).to_numpy()
    except ValueError as err:
        raise DataError(f"{path}: label_columns {columns} must hold numbers 0/1 ({err})") from None
    hot = values > 0.5
    bad = np.flatnonzero(hot.sum(axis=1) != 1)
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{path}, {_line(row)}: {int(hot[row].sum())} of the one-hot label_columns {columns} are set; "
            f"expected exactly one ({len(bad)} such row(s); leave out columns of classes without images)"
        )
    return hot.argmax(axis=1).astype(np.int64)


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


def _groups(values: list[str], path: Path, column: str, pattern: str | None) -> np.ndarray:
    empty = [row for row, value in enumerate(values) if not value]
    if empty:
        raise DataError(f"{path}, {_line(empty[0])}: empty {column!r} ({len(empty)} row(s) without a group)")
    if pattern is None:
        return np.array(values)
    regex = re.compile(pattern)
    groups = []
    for row, value in enumerate(values):
        match = regex.search(value)
        if match is None:
            raise DataError(f"{path}, {_line(row)}: {column} {value!r} does not match group_regex {pattern!r}")
        groups.append(match.group(1) if regex.groups else match.group(0))
    return np.array(groups)


def fetch_csv(
    out_path: Path,
    *,
    path: str | Path,
    image_root: str | Path | list[str | Path] | None = None,
    path_column: str = "path",
    path_template: str = "{}",
    label_column: str | None = "label",
    label_columns: list[str] | None = None,
    split_column: str | None = None,
    group_column: str | None = None,
    group_regex: str | None = None,
    classes: list[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Path:
    """A CSV manifest of image paths and labels (+ optional split and patient/group columns).

    ``path_template`` turns a path-column value into a file name (``"{}.png"`` for APTOS' ``id_code``);
    ``image_root`` may list several folders (the first holding the file wins). Labels are either one
    column (``label_column``: class names or indices) or one-hot columns (``label_columns``, which are
    then the class names unless ``classes`` renames them). ``group_regex`` takes the group from the
    group column (or the path column when there is none): its first capture group, e.g. ``^(\\d+)_``
    for EyePACS' ``<patient>_left``. ``split_column`` None uses a column named ``split`` when there is
    one; without a split column the splits are stratified by label and grouped.
    """
    path = Path(path)
    table = _read_csv(path)
    if split_column is None and "split" in table.columns:
        split_column = "split"
    if label_columns is not None:
        label_column = None
    columns = {"path_column": path_column, "label_column": label_column,
               "split_column": split_column, "group_column": group_column}  # fmt: skip
    _require_columns(table, columns, path)
    if label_columns is not None:
        _require_columns(table, {f"label_columns[{i}]": c for i, c in enumerate(label_columns)}, path)
        labels = _one_hot_labels(table, list(label_columns), path)
        class_names = [str(c) for c in (classes if classes is not None else label_columns)]
        if len(class_names) != len(label_columns):
            raise DataError(f"{path}: {len(class_names)} classes for {len(label_columns)} label_columns")
    else:
        labels_raw = table[label_column].tolist()
        class_names = [str(c) for c in classes] if classes is not None else _default_classes(labels_raw)
        labels = label_indices(labels_raw, class_names, path)
    roots = image_root if isinstance(image_root, list) else [image_root if image_root is not None else path.parent]
    names = table[path_column].tolist()
    files = _image_files(names, [Path(r) for r in roots], path_template, path)
    group_values = table[group_column].tolist() if group_column else names
    groups = _groups(group_values, path, group_column or path_column, group_regex)
    given = _given_splits(table[split_column].tolist(), path, split_column) if split_column else None
    records = ImageRecords(files, names, labels, groups, given)
    return write_image_dataset(
        Path(out_path), records, class_names, val_fraction=val_fraction, test_fraction=test_fraction,
        seed=seed, source=str(path),
    )  # fmt: skip
