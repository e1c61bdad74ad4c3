"""Tests for real inputs: image files (PNG/JPEG/TIFF/DICOM), the imagefolder and csv origins, the
split assignment and the pre-preparation checks. Every fixture is written into tmp_path."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from medmerge.data import (
    DATA_ORIGINS,
    SPLITS,
    DataError,
    fetch_dataset,
    load_split,
    open_raw_dataset,
    prepare_dataset,
    read_image,
    read_images,
)
from medmerge.data import images as images_module
from medmerge.data import prepare as prepare_module
from medmerge.data.splits import assign_splits, manifest_path

# ---------------------------------------------------------------- fixture writers


def save(path: Path, pixels: np.ndarray | Image.Image, **kwargs) -> Path:
    """Write an image or array with Pillow (array mode inferred: L, RGB, RGBA, I;16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    image.save(path, **kwargs)
    return path


def pattern(seed: int, size: int = 12, channels: int | None = 3) -> np.ndarray:
    """A distinct random uint8 image (so no two fixtures are duplicates by accident)."""
    shape = (size, size) if channels is None else (size, size, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_class_images(folder: Path, seed: int, n: int) -> None:
    """n images of mixed kinds: RGB PNG, grayscale PNG, RGB JPEG, RGBA PNG, 16-bit PNG, palette PNG."""
    writers = [
        lambda p, s: save(p.with_suffix(".png"), pattern(s)),
        lambda p, s: save(p.with_suffix(".png"), pattern(s, channels=None)),
        lambda p, s: save(p.with_suffix(".jpg"), pattern(s), quality=90),
        lambda p, s: save(p.with_suffix(".png"), pattern(s, channels=4)),
        lambda p, s: save(p.with_suffix(".png"), pattern(s, channels=None).astype(np.uint16) * 257),
        lambda p, s: save(p.with_suffix(".png"), Image.fromarray(pattern(s)).quantize(8)),
    ]
    for i in range(n):
        writers[i % len(writers)](folder / f"img{i:02d}", seed * 100 + i)


def image_folder(root: Path, classes=("benign", "malignant", "nevus"), n: int = 9, splits=None) -> Path:
    """root/<class>/* (splits None) or root/<split>/<class>/*, plus files that must be skipped."""
    for s, split in enumerate(splits or [None]):
        for c, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            write_class_images(folder, seed=10 * s + c, n=n)
            (folder / ".DS_Store").write_bytes(b"\x00junk")
            (folder / "notes.txt").write_text("not an image")
    return root


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, **attributes) -> Path:
    """A minimal uncompressed DICOM file (Secondary Capture) holding ``pixels``."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_manifest(npz_path: Path) -> list[dict]:
    with open(manifest_path(npz_path), newline="") as f:
        return list(csv.DictReader(f))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def prepared(out: Path, image_size: int, classes=None, **options) -> SimpleNamespace:
    """Prepare what fetch_dataset wrote for ``out`` (its manifest) and read it back: classes, labels, images."""
    target = out.with_name(f"{out.stem}_prepared")
    meta = prepare_dataset(open_raw_dataset(out), image_size, target, class_names=classes, **options)
    splits = {split: load_split(target, split) for split in SPLITS}
    return SimpleNamespace(class_names=meta["classes"], meta=meta, dir=target,
                           images={s: x for s, (x, _) in splits.items()}, labels={s: y for s, (_, y) in splits.items()})


# ---------------------------------------------------------------- single images


def test_read_png_jpeg_gray_rgba_palette(tmp_path):
    rgb = pattern(1)
    assert np.array_equal(read_image(save(tmp_path / "rgb.png", rgb)), rgb)
    gray = read_image(save(tmp_path / "gray.png", pattern(2, channels=None)))
    assert gray.shape == (12, 12, 3) and (gray[..., 0] == gray[..., 2]).all()
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[...] = (200, 100, 50, 51)
    assert (read_image(save(tmp_path / "rgba.png", rgba)) == (40, 20, 10)).all()  # composited on black
    palette = Image.fromarray(rgb).quantize(4)
    assert np.array_equal(read_image(save(tmp_path / "p.png", palette)), np.asarray(palette.convert("RGB")))
    flat = np.full((16, 16, 3), (200, 100, 50), dtype=np.uint8)
    jpeg = read_image(save(tmp_path / "x.jpeg", flat, quality=95))
    assert jpeg.dtype == np.uint8 and np.abs(jpeg.astype(int) - flat).max() <= 4
    assert read_image(tmp_path / "rgb.png", image_size=5).shape == (5, 5, 3)


def test_16bit_png_scaled_by_dtype_range(tmp_path):
    pixels = np.array([[0, 10000], [32768, 65535]], dtype=np.uint16)
    path = save(tmp_path / "deep.png", pixels)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
    expected = np.array([[0, 39], [128, 255]], dtype=np.uint8)  # round(v * 255 / 65535)
    assert np.array_equal(read_image(path)[..., 0], expected)


def test_16bit_tiff_with_and_without_tifffile(tmp_path, monkeypatch):
    pixels = np.array([[0, 10000, 65535]], dtype=np.uint16)
    path = save(tmp_path / "deep.tif", pixels)
    expected = np.array([[0, 39, 255]], dtype=np.uint8)
    assert np.array_equal(read_image(path)[..., 1], expected)
    real = images_module._optional_module
    monkeypatch.setattr(
        images_module, "_optional_module", lambda name: None if name == "tifffile" else real(name)
    )
    assert np.array_equal(read_image(path)[..., 1], expected)  # Pillow path, same rule


def test_16bit_rgb_tiff_via_tifffile(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    pixels = np.zeros((1, 2, 3), dtype=np.uint16)
    pixels[0, 1] = (65535, 3000, 0)
    tifffile.imwrite(tmp_path / "rgb16.tiff", pixels, photometric="rgb")
    assert read_image(tmp_path / "rgb16.tiff")[0, 1].tolist() == [255, 12, 0]


def test_dicom_monochrome1_rescale_and_window(tmp_path):
    # stored values -> HU = 2 * v - 1 -> window [c - w/2, c + w/2] = [-255, 255] -> (HU + 255) / 2 -> inverted
    stored = np.array([[-127, 0, 1], [128, 600, -500]], dtype=np.int16)
    path = write_dicom(
        tmp_path / "ct.dcm", stored, "MONOCHROME1",
        RescaleSlope=2, RescaleIntercept=-1, WindowCenter=[0, 40], WindowWidth=[510, 400],
    )  # fmt: skip
    windowed = np.array([[0, 127, 128], [255, 255, 0]])
    image = read_image(path)
    assert image.shape == (2, 3, 3) and (image[..., 0] == image[..., 2]).all()
    assert np.array_equal(image[..., 0], 255 - windowed)


def test_dicom_without_window_uses_min_max_and_rgb_is_kept(tmp_path):
    stored = np.array([[100, 150, 200]], dtype=np.uint16)
    gray = read_image(write_dicom(tmp_path / "mr.dcm", stored, "MONOCHROME2"))
    assert gray[..., 0].tolist() == [[0, 128, 255]]  # min-max of the pixel data
    rgb = pattern(3, size=4)
    assert np.array_equal(read_image(write_dicom(tmp_path / "photo.dcm", rgb, "RGB")), rgb)


def test_read_images_resizes_mixed_sizes_and_warns_once(tmp_path, caplog):
    paths = [
        save(tmp_path / "big.png", pattern(1, size=40)),
        save(tmp_path / "small.png", pattern(2, size=8)),
    ]
    paths.append(save(tmp_path / "tiny.png", pattern(3, size=4)))
    with caplog.at_level(logging.WARNING, logger="medmerge.data"):
        stacked = read_images(paths, image_size=16, label="mixed")
    assert stacked.shape == (3, 16, 16, 3) and stacked.dtype == np.uint8
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "2 of 3" in warnings[0] and "small.png" in warnings[0]


# ---------------------------------------------------------------- bad single files


def test_bad_truncated_png(tmp_path):
    path = save(tmp_path / "cut.png", pattern(4, size=64))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"cut\.png: unreadable image file"):
        read_image(path)


def test_bad_corrupt_dicom(tmp_path):
    pytest.importorskip("pydicom")
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"this is not DICOM")
    with pytest.raises(DataError, match=r"scan\.dcm: unreadable DICOM file"):
        read_image(path)


def test_bad_dicom_without_pydicom(tmp_path, monkeypatch):
    real = images_module._optional_module
    monkeypatch.setattr(
        images_module, "_optional_module", lambda name: None if name == "pydicom" else real(name)
    )
    (tmp_path / "scan.dcm").write_bytes(b"")
    with pytest.raises(DataError, match=r"scan\.dcm: reading DICOM files needs the 'pydicom' package"):
        read_image(tmp_path / "scan.dcm")


def test_bad_unsupported_suffix(tmp_path):
    (tmp_path / "scan.nii").write_bytes(b"")
    with pytest.raises(DataError, match=r"scan\.nii: no image reader for suffix '\.nii'; supported: \["):
        read_image(tmp_path / "scan.nii")


def test_bad_multipage_tiff(tmp_path):
    frames = [Image.fromarray(pattern(i, channels=None)) for i in range(2)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=r"stack\.tif: has 2 frames/pages; expected a single 2-D image"):
        read_image(tmp_path / "stack.tif")


def test_bad_dicom_window_width(tmp_path):
    stored = np.zeros((2, 2), dtype=np.uint16)
    path = write_dicom(tmp_path / "w.dcm", stored, "MONOCHROME2", WindowCenter=10, WindowWidth=0)
    with pytest.raises(DataError, match=r"w\.dcm: WindowWidth must be > 0, got 0"):
        read_image(path)


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_without_split_folders(tmp_path):
    root = image_folder(tmp_path / "images", n=12)
    out = tmp_path / "raw" / "derm.npz"
    fetch_dataset("imagefolder", {"root": str(root), "seed": 3}, out)
    assert not out.exists()  # the pixels stay where they are: only the manifest is written
    raw = prepared(out, 16)
    assert raw.class_names == ["benign", "malignant", "nevus"]
    counts = {split: len(y) for split, y in raw.labels.items()}
    assert sum(counts.values()) == 36 and 4 <= counts["val"] <= 7 and 4 <= counts["test"] <= 7  # ~1/7 each
    for labels in raw.labels.values():
        assert set(labels.tolist()) == {0, 1, 2}  # stratified: every class in every split
    assert raw.images["train"].shape == (counts["train"], 16, 16, 3)
    manifest = read_manifest(out)
    assert len(manifest) == 36 and list(manifest[0]) == ["path", "label", "split", "group", "file"]
    assert all(Path(row["file"]) == root / row["path"] for row in manifest)
    assert not any(row["path"].endswith((".txt", ".DS_Store")) for row in manifest)
    assert {row["path"].split("/")[0] for row in manifest} == {"benign", "malignant", "nevus"}
    assert all(row["path"].startswith(row["label"] + "/") for row in manifest)
    assert leftovers(out.parent) == []


def test_imagefolder_with_split_folders_and_classes_order(tmp_path):
    root = image_folder(tmp_path / "images", classes=("a", "b"), n=3, splits=["train", "val", "test"])
    out = tmp_path / "x.npz"
    fetch_dataset("imagefolder", {"root": str(root)}, out, classes=["b", "a"])
    raw = prepared(out, 8, classes=["b", "a"])
    assert raw.class_names == ["b", "a"]
    assert {split: len(y) for split, y in raw.labels.items()} == {"train": 6, "val": 6, "test": 6}
    for row in read_manifest(out):
        split, label = row["path"].split("/")[:2]
        assert row["split"] == split and row["label"] == label
    assert raw.labels["train"].tolist() == [1, 1, 1, 0, 0, 0]  # folder a (sorted first) is class 1


def test_imagefolder_custom_split_folder_names(tmp_path):
    root = image_folder(tmp_path / "images", classes=("a", "b"), n=2, splits=["tr", "dev2", "holdout"])
    out = tmp_path / "x.npz"
    options = {"root": str(root), "splits": {"train": "tr", "val": "dev2", "test": "holdout"}}
    fetch_dataset("imagefolder", options, out)
    assert [len(y) for y in prepared(out, 8).labels.values()] == [4, 4, 4]
    with pytest.raises(DataError, match=r"images/nope: folder for the test split not found"):
        fetch_dataset("imagefolder", {**options, "splits": {"train": "tr", "test": "nope"}}, out)


def test_imagefolder_carves_missing_test_split(tmp_path):
    root = image_folder(tmp_path / "images", classes=("a", "b"), n=8, splits=["train", "validation"])
    out = tmp_path / "x.npz"
    fetch_dataset("imagefolder", {"root": str(root), "test_fraction": 0.25}, out)
    counts = {split: len(y) for split, y in prepared(out, 8).labels.items()}
    assert counts == {"train": 12, "val": 16, "test": 4}
    assert all(row["path"].startswith("train/") for row in read_manifest(out) if row["split"] == "test")


def test_bad_imagefolder_empty_class_folder(tmp_path):
    root = image_folder(tmp_path / "images", classes=("a", "b"), n=4)
    for file in (root / "b").iterdir():
        file.unlink()
    (root / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"images/b: class folder has no image files"):
        fetch_dataset("imagefolder", {"root": str(root)}, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_bad_imagefolder_class_not_in_list(tmp_path):
    root = image_folder(tmp_path / "images", classes=("a", "b", "zzz"), n=2)
    with pytest.raises(
        DataError, match=r"images/zzz: class folder 'zzz' is not one of the classes \['a', 'b'\]"
    ):
        fetch_dataset("imagefolder", {"root": str(root), "classes": ["a", "b"]}, tmp_path / "x.npz")


def test_bad_imagefolder_truncated_image(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK", 4)  # several chunks, so the worker processes are used
    root = image_folder(tmp_path / "images", classes=("a", "b"), n=8)
    bad = save(root / "a" / "cut.png", pattern(9, size=64))
    bad.write_bytes(bad.read_bytes()[:150])
    out = tmp_path / "raw" / "x.npz"
    fetch_dataset("imagefolder", {"root": str(root)}, out)
    with pytest.raises(DataError, match=r"images/a/cut\.png: unreadable image file"):
        prepared(out, 8, workers=2)  # raised in a worker process, named all the same
    target = out.with_name("x_prepared")
    assert not target.exists() and leftovers(target.parent) == []


# ---------------------------------------------------------------- csv


def patient_csv(tmp_path: Path, n_patients: int = 24, per_patient: int = 3, label_of=None) -> Path:
    """images/p<id>_<k>.png with a patient_id column; label by patient (default: patient % 3)."""
    rows = []
    for p in range(n_patients):
        for k in range(per_patient):
            name = f"images/p{p:02d}_{k}.png"
            save(tmp_path / name, pattern(1000 + p * 10 + k, size=6))
            label = label_of(p) if label_of else ["cyst", "normal", "tumour"][p % 3]
            rows.append({"file": name, "diagnosis": label, "patient_id": f"P{p:02d}"})
    return write_csv(tmp_path / "labels.csv", rows)


def test_csv_grouped_stratified_splits(tmp_path):
    manifest = patient_csv(tmp_path)
    out = tmp_path / "raw" / "us.npz"
    options = {"path": str(manifest), "path_column": "file", "label_column": "diagnosis",
               "group_column": "patient_id", "seed": 5}  # fmt: skip
    fetch_dataset("csv", options, out)
    raw = prepared(out, 8)
    assert raw.class_names == ["cyst", "normal", "tumour"]
    assert set(raw.labels["train"].tolist()) == {0, 1, 2}  # every class in train
    rows = read_manifest(out)
    splits_of = {}
    for row in rows:
        splits_of.setdefault(row["group"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in splits_of.values())  # no patient crosses splits
    counts = {split: sum(row["split"] == split for row in rows) for split in ("train", "val", "test")}
    assert counts == {split: len(y) for split, y in raw.labels.items()} and min(counts.values()) > 0
    fetch_dataset("csv", options, tmp_path / "again.npz")
    assert read_manifest(tmp_path / "again.npz") == rows  # deterministic for a seed


def test_csv_int_labels_split_column_and_image_root(tmp_path):
    images = tmp_path / "store"
    rows = []
    for i, split in enumerate(["train"] * 4 + ["validation"] * 2 + ["test"] * 2):
        save(images / f"{i}.png", pattern(i, size=5))
        rows.append({"path": f"{i}.png", "label": str(i % 2), "split": split})
    path = write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "x.npz"
    fetch_dataset("csv", {"path": str(path), "image_root": str(images), "classes": ["neg", "pos"]}, out)
    raw = prepared(out, 5)
    assert raw.class_names == ["neg", "pos"] and raw.labels["train"].tolist() == [0, 1, 0, 1]
    assert [len(raw.labels[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    fetch_dataset("csv", {"path": str(path), "image_root": str(images)}, out)
    assert prepared(out, 5).class_names == ["0", "1"]  # integer labels are class indices


def test_csv_warns_when_given_splits_share_a_patient(tmp_path, caplog):
    rows = []
    for i, (split, patient) in enumerate([("train", "A"), ("train", "B"), ("val", "A"), ("test", "C")]):
        save(tmp_path / f"{i}.png", pattern(50 + i, size=5))
        rows.append({"path": f"{i}.png", "label": "x", "split": split, "pid": patient})
    path = write_csv(tmp_path / "m.csv", rows)
    with caplog.at_level(logging.WARNING, logger="medmerge.data"):
        fetch_dataset("csv", {"path": str(path), "group_column": "pid"}, tmp_path / "x.npz")
    assert "1 group(s) have images in more than one split (e.g. 'A')" in caplog.text


def test_bad_csv_label_not_in_classes(tmp_path):
    path = patient_csv(tmp_path, n_patients=3, per_patient=1)
    options = {
        "path": str(path),
        "path_column": "file",
        "label_column": "diagnosis",
        "classes": ["cyst", "normal"],
    }
    with pytest.raises(DataError, match=r"labels\.csv, line 4: label 'tumour' is not one of the classes"):
        fetch_dataset("csv", options, tmp_path / "x.npz")


def test_bad_csv_missing_image(tmp_path):
    path = patient_csv(tmp_path, n_patients=4, per_patient=1)
    (tmp_path / "images" / "p02_0.png").unlink()
    options = {"path": str(path), "path_column": "file", "label_column": "diagnosis"}
    with pytest.raises(DataError, match=r"labels\.csv, line 4: image 'images/p02_0\.png' not found"):
        fetch_dataset("csv", options, tmp_path / "x.npz")


def test_bad_csv_missing_column(tmp_path):
    path = patient_csv(tmp_path, n_patients=2, per_patient=1)
    with pytest.raises(
        DataError,
        match=r"missing column\(s\) path_column='path'.*columns found: \['file', 'diagnosis', 'patient_id'\]",
    ):
        fetch_dataset("csv", {"path": str(path), "label_column": "diagnosis"}, tmp_path / "x.npz")


def test_bad_csv_too_few_patients(tmp_path):
    path = patient_csv(tmp_path, n_patients=4, per_patient=2)
    options = {
        "path": str(path),
        "path_column": "file",
        "label_column": "diagnosis",
        "group_column": "patient_id",
    }
    with pytest.raises(
        DataError, match=r"carving the test split: only 4 group\(s\) to split.*needs at least 7 groups"
    ):
        fetch_dataset("csv", options, tmp_path / "x.npz")


# ---------------------------------------------------------------- splits and validation


def test_assign_splits_keeps_every_class_in_train():
    labels = np.array([0] * 20 + [1] * 20 + [2])  # class 2: a single image
    groups = np.arange(len(labels)).astype(str)
    for seed in range(5):
        splits = assign_splits(labels, groups, None, 0.2, 0.2, seed, "test")
        assert 2 in labels[splits == "train"]
        assert all(7 <= (splits == split).sum() <= 10 for split in ("val", "test"))  # about 1/5 of 41


def test_bad_duplicates_across_splits(tmp_path, caplog):
    root = image_folder(tmp_path / "images", classes=("a", "b"), n=3, splits=["train", "val", "test"])
    shutil.copy(root / "train" / "a" / "img00.png", root / "test" / "b" / "copy.png")
    out = tmp_path / "x.npz"
    fetch_dataset("imagefolder", {"root": str(root)}, out)
    with caplog.at_level(logging.WARNING, logger="medmerge.data"):
        meta = prepare_dataset(open_raw_dataset(out), 8, tmp_path / "prepared")
    assert meta["duplicates_across_splits"] == 1
    assert "1 image(s) appear in both the 'train' and 'test' splits" in caplog.text


def test_bad_prepare_classes_in_another_order(tmp_path):
    root = image_folder(tmp_path / "images", classes=("a", "b"), n=3, splits=["train", "val", "test"])
    fetch_dataset("imagefolder", {"root": str(root)}, tmp_path / "x.npz")
    with pytest.raises(DataError, match=r"in another order, so labels would be swapped"):
        prepare_dataset(open_raw_dataset(tmp_path / "x.npz"), 8, tmp_path / "p", class_names=["b", "a"])


def test_bad_classes_given_twice(tmp_path):
    root = image_folder(tmp_path / "images", classes=("a", "b"), n=2)
    with pytest.raises(ValueError, match=r"options.classes \['a', 'b'\] differs from the dataset's classes"):
        fetch_dataset(
            "imagefolder", {"root": str(root), "classes": ["a", "b"]}, tmp_path / "x.npz", ["b", "a"]
        )


def test_new_origins_registered():
    assert {"imagefolder", "csv"} <= set(DATA_ORIGINS)
