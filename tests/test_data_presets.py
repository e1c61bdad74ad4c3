"""Every dataset preset in configs/ on a tiny fabricated copy of its dataset's official layout: merged into
the repository's params, validated, then fetched and prepared as the stages do."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medmerge.config import parse_params
from medmerge.data import fetch_dataset, load_split, open_raw_dataset, prepare_dataset
from medmerge.data.manifest import manifest_path
from medmerge.data.presets import _main, apply_preset, load_preset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SIZE = 16


def photo(path: Path, label: int, seed: int, shape=(30, 40)) -> None:
    """A non-square photograph whose brightness depends on the label."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(40 + 30 * label, 20, (*shape, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def ham10000(root: Path) -> None:
    rows = []
    for c, dx in enumerate(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]):
        for lesion in range(4):
            for _shot in range(2):
                n = len(rows)
                image_id = f"ISIC_{n:07d}"
                photo(root / f"HAM10000_images_part_{1 + n % 2}" / f"{image_id}.jpg", c, n, (45, 60))
                rows.append([f"HAM_{c}{lesion}", image_id, dx, "histo", 50, "male", "back"])
    write_csv(root / "HAM10000_metadata.csv",
              ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"], rows)


ISIC_COLUMNS = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def isic2019(root: Path) -> None:
    rows = []
    for c in range(8):
        for k in range(8):
            image = f"ISIC_{len(rows):07d}" + ("_downsampled" if k == 3 else "")
            photo(root / "ISIC_2019_Training_Input" / f"{image}.jpg", c, len(rows))
            rows.append([image] + ["1.0" if j == c else "0.0" for j in range(len(ISIC_COLUMNS))])
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ["image", *ISIC_COLUMNS], rows)


def aptos2019(root: Path) -> None:
    rows = []
    for grade in range(5):
        for k in range(8):
            id_code = f"{grade:02x}{k:02x}c1434d8d7"
            photo(root / "train_images" / f"{id_code}.png", grade, 10 * grade + k)
            rows.append([id_code, grade])
    write_csv(root / "train.csv", ["id_code", "diagnosis"], rows)


def eyepacs(root: Path) -> None:
    rows = []
    for patient in range(10, 40):
        for eye in ("left", "right"):
            image = f"{patient}_{eye}"
            photo(root / "train" / f"{image}.jpeg", patient % 5, patient * 2 + (eye == "right"))
            rows.append([image, patient % 5])
    write_csv(root / "trainLabels.csv", ["image", "level"], rows)


def dermamnist224(root: Path) -> None:
    rng, arrays = np.random.default_rng(0), {}
    for split, per_class in {"train": 3, "val": 2, "test": 2}.items():
        labels = np.repeat(np.arange(7), per_class)
        arrays[f"{split}_images"] = rng.integers(0, 256, (len(labels), 224, 224, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)[:, None]
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "dermamnist_224.npz", **arrays)


#: preset -> (layout writer, expected classes, ordinal, images in all)
PRESETS = {
    "ham10000": (ham10000, ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], False, 56),
    "isic2019": (isic2019, ISIC_COLUMNS[:8], False, 64),
    "aptos2019": (aptos2019, ["no_dr", "mild", "moderate", "severe", "proliferative"], True, 40),
    "eyepacs": (eyepacs, ["no_dr", "mild", "moderate", "severe", "proliferative"], True, 60),
    "dermamnist224": (dermamnist224, None, False, 49),
}


def base_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_reads_its_official_layout(tmp_path, name):
    write, classes, ordinal, total = PRESETS[name]
    root = tmp_path / "official"
    write(root)
    settings = parse_params(apply_preset(base_params(), load_preset(CONFIGS / f"{name}.yaml", root), target=True))
    assert settings.data.target == name and settings.data.image_size == 224
    dataset = settings.data.datasets[name]
    assert dataset.ordinal is ordinal
    out = tmp_path / "raw" / name / f"{name}.npz"
    fetch_dataset(dataset.origin, dict(dataset.options), out, classes=dataset.classes)
    raw = open_raw_dataset(out, num_classes=len(dataset.classes) if dataset.classes else None)
    meta = prepare_dataset(raw, SIZE, tmp_path / "processed" / name, class_names=dataset.classes,
                           resize=dataset.resize, ordinal=dataset.ordinal)  # fmt: skip
    assert meta["ordinal"] is ordinal and meta["resize"] == dataset.resize
    if classes is not None:
        assert meta["classes"] == classes
    assert sum(sum(c.values()) for c in meta["counts"].values()) == total
    assert all(n > 0 for n in meta["counts"]["train"].values())
    images, labels = load_split(tmp_path / "processed" / name, "train")
    assert images.shape[1:] == (SIZE, SIZE, 3) and len(labels) == sum(meta["counts"]["train"].values())


def _manifest(out: Path) -> list[dict]:
    with manifest_path(out).open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(("name", "group_of"), [
    ("ham10000", None),                                    # lesion_id column
    ("eyepacs", lambda row: row["path"].split("_")[0]),    # patient number of <patient>_<eye>
])  # fmt: skip
def test_preset_groups_keep_a_patient_in_one_split(tmp_path, name, group_of):
    PRESETS[name][0](tmp_path / "official")
    preset = load_preset(CONFIGS / f"{name}.yaml", tmp_path / "official")
    out = tmp_path / f"{name}.npz"
    fetch_dataset(preset["dataset"]["origin"], preset["dataset"]["options"], out, classes=preset["dataset"]["classes"])
    splits_of: dict[str, set] = {}
    for row in _manifest(out):
        group = group_of(row) if group_of else row["group"]
        if group_of:
            assert row["group"] == group  # group_regex took the patient number
        splits_of.setdefault(group, set()).add(row["split"])
    assert len(splits_of) in (28, 30) and all(len(s) == 1 for s in splits_of.values())


def test_preset_labels_follow_the_label_file(tmp_path):
    isic2019(tmp_path / "isic")
    preset = load_preset(CONFIGS / "isic2019.yaml", tmp_path / "isic")
    out = tmp_path / "isic.npz"
    fetch_dataset(preset["dataset"]["origin"], preset["dataset"]["options"], out)
    with (tmp_path / "isic" / "ISIC_2019_Training_GroundTruth.csv").open(newline="") as f:
        truth = {row["image"]: next(c for c in ISIC_COLUMNS if row[c] == "1.0") for row in csv.DictReader(f)}
    assert {row["path"]: row["label"] for row in _manifest(out)} == truth


def test_presets_cli_apply_writes_valid_params_and_show_prints(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    assert _main(["apply", str(CONFIGS / "aptos2019.yaml"), "--root", "/data/aptos", "--params", str(params)]) == 0
    written = yaml.safe_load(params.read_text())
    entry = written["data"]["datasets"]["aptos2019"]
    assert entry["options"]["path"] == "/data/aptos/train.csv" and entry["ordinal"] is True
    assert written["data"]["target"] == "lesions"  # not the target without --target
    parse_params(written)
    assert _main(["show", str(CONFIGS / "eyepacs.yaml"), "--root", "/x"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["data"]["datasets"]["eyepacs"]["options"]["image_root"] == "/x/train"
    assert json.dumps(shown)  # plain data
