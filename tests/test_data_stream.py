"""The streaming prepare path, resize policies, training-split subsampling, the missing-class check,
and the shared downloader (against a loopback HTTP server)."""

from __future__ import annotations

import csv
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmerge.data import (
    DataError,
    RawDataset,
    fetch_dataset,
    load_and_resize,
    load_split,
    open_raw_dataset,
    prepare_dataset,
)
from medmerge.data import prepare as prepare_module
from medmerge.data.resize import RESIZE_POLICIES, resize_image
from medmerge.data.subsample import subsample_train
from medmerge.download import ChecksumError, DownloadError, download_file


def folder_dataset(root: Path, n_per_class: int = 12, shape=(24, 40)) -> Path:
    """root/<class>/<i>.jpg|png: non-square images with distinct content."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b", "c"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            pixels[..., c] = 255
            Image.fromarray(pixels).save(root / name / (f"{i}.jpg" if i % 2 else f"{i}.png"))
    return root


# ---------------------------------------------------------------- streaming


def test_workers_do_not_change_the_prepared_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK", 5)  # several chunks per split, in flight at once
    out = tmp_path / "raw" / "d.npz"
    fetch_dataset("imagefolder", {"root": str(folder_dataset(tmp_path / "img"))}, out)
    one = prepare_dataset(open_raw_dataset(out), 20, tmp_path / "p1", workers=1, resize="pad")
    two = prepare_dataset(open_raw_dataset(out), 20, tmp_path / "p2", workers=2, resize="pad")
    assert one == two
    for name in ("train_images.npy", "val_images.npy", "test_images.npy", "train_labels.npy"):
        assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes()


def test_prepared_image_equals_load_and_resize_of_its_file(tmp_path):
    out = tmp_path / "raw" / "d.npz"
    fetch_dataset("imagefolder", {"root": str(folder_dataset(tmp_path / "img"))}, out)
    raw = open_raw_dataset(out)
    for policy in RESIZE_POLICIES:
        prepare_dataset(raw, 16, tmp_path / policy, resize=policy)
        images, _ = load_split(tmp_path / policy, "test")
        for image, file in zip(images, raw.images["test"], strict=True):
            assert np.array_equal(image, load_and_resize(file, 16, policy))  # prediction sees what training saw


def test_open_raw_dataset_names_what_is_missing(tmp_path):
    with pytest.raises(DataError, match=r"x\.npz: not found \(nor x\.splits\.csv\); run the fetch_data stage"):
        open_raw_dataset(tmp_path / "x.npz")


# ---------------------------------------------------------------- resize policies


def test_resize_policies_keep_or_change_the_aspect_ratio():
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[:, 10:30] = 200  # a bright centre square, dark left and right quarters
    squashed, padded, cropped = (resize_image(image, 20, p) for p in ("squash", "pad", "center_crop"))
    assert squashed.shape == padded.shape == cropped.shape == (20, 20, 3)
    assert (squashed[:, :5] == 0).all() and (squashed[:, 5:15] == 200).all()  # stretched: half is bright
    assert (padded[:5] == 0).all() and (padded[15:] == 0).all()  # letterbox: black bars above and below
    assert (padded[5:15, 5:15] == 200).all() and (padded[5:15, :5] == 0).all()
    assert (cropped == 200).all()  # the central square only
    with pytest.raises(DataError, match=r"unknown resize policy 'fit'; expected one of"):
        resize_image(image, 20, "fit")


def test_load_and_resize_takes_arrays_and_files(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (30, 50), dtype=np.uint8)  # grayscale
    Image.fromarray(pixels).save(tmp_path / "g.png")
    from_file = load_and_resize(tmp_path / "g.png", 10, "center_crop")
    assert from_file.shape == (10, 10, 3) and np.array_equal(from_file, load_and_resize(pixels, 10, "center_crop"))


# ---------------------------------------------------------------- subsampling


def test_subsample_is_stratified_deterministic_and_nested():
    labels = np.array([0] * 50 + [1] * 20 + [2] * 5)
    groups = np.arange(len(labels))
    half = subsample_train(labels, groups, 3, fraction=0.5, seed=3)
    assert np.bincount(labels[half]).tolist() == [25, 10, 3]  # ceil per class
    assert np.array_equal(half, subsample_train(labels, groups, 3, fraction=0.5, seed=3))
    assert not np.array_equal(half, subsample_train(labels, groups, 3, fraction=0.5, seed=4))
    tenth = subsample_train(labels, groups, 3, fraction=0.1, seed=3)
    assert np.bincount(labels[tenth]).tolist() == [5, 2, 1] and set(tenth) <= set(half)  # a learning curve adds
    per_class = subsample_train(labels, groups, 3, per_class=8, seed=0)
    assert np.bincount(labels[per_class]).tolist() == [8, 8, 5]


def test_subsample_takes_whole_patients():
    labels = np.repeat([0, 1], 30)
    groups = np.repeat(np.arange(20), 3)  # 3 images per patient, one class per patient
    kept = subsample_train(labels, groups, 2, fraction=0.3, seed=0)
    assert np.bincount(labels[kept]).tolist() == [9, 9]
    assert all(set(np.flatnonzero(groups == g)) <= set(kept) for g in np.unique(groups[kept]))


def _raw(tmp_path: Path, train_labels: list[int]) -> RawDataset:
    rng = np.random.default_rng(0)
    labels = {"train": np.array(train_labels), "val": np.array([0, 1, 2]), "test": np.array([0, 1, 2])}
    images = {s: rng.integers(0, 256, (len(y), 8, 8, 3), dtype=np.uint8) for s, y in labels.items()}
    return RawDataset(images, labels, ["x", "y", "z"], tmp_path / "r.npz")


def test_prepare_subsamples_train_only_and_records_it(tmp_path):
    raw = _raw(tmp_path, [0] * 10 + [1] * 10 + [2] * 10)
    meta = prepare_dataset(raw, 8, tmp_path / "p", train_fraction=0.2, subsample_seed=1)
    assert meta["counts"]["train"] == {"x": 2, "y": 2, "z": 2} and meta["counts"]["test"] == {"x": 1, "y": 1, "z": 1}
    assert meta["train_subsample"] == {"train_fraction": 0.2, "n_train_per_class": None, "seed": 1,
                                       "subset": "kept", "images_before": 30, "images_after": 6}  # fmt: skip
    images, labels = load_split(tmp_path / "p", "train")
    kept = subsample_train(raw.labels["train"], np.arange(30), 3, fraction=0.2, seed=1)
    assert np.array_equal(images, raw.images["train"][kept]) and np.array_equal(labels, raw.labels["train"][kept])


def test_the_rest_of_a_subsample_is_its_disjoint_complement(tmp_path):
    """A target keeping a subsample and a source task of the rest of the same file share no training image
    and together hold every one."""
    raw = _raw(tmp_path, [0] * 10 + [1] * 12 + [2] * 8)
    kept = prepare_dataset(raw, 8, tmp_path / "kept", n_train_per_class=3, subsample_seed=4)
    rest = prepare_dataset(raw, 8, tmp_path / "rest", n_train_per_class=3, subsample_seed=4, train_subset="rest")
    assert kept["counts"]["train"] == {"x": 3, "y": 3, "z": 3}
    assert rest["counts"]["train"] == {"x": 7, "y": 9, "z": 5} and rest["train_subsample"]["subset"] == "rest"
    rows = {split: {image.tobytes() for image in load_split(tmp_path / split, "train")[0]} for split in ("kept", "rest")}
    assert not rows["kept"] & rows["rest"] and rows["kept"] | rows["rest"] == {i.tobytes() for i in raw.images["train"]}
    assert kept["counts"]["test"] == rest["counts"]["test"]  # val and test are the file's own, unchanged


# ---------------------------------------------------------------- a class missing from train


def test_bad_train_split_without_a_class_stops_unless_allowed(tmp_path):
    raw = _raw(tmp_path, [0, 0, 1, 1])  # no image of class 'z' in train
    with pytest.raises(DataError, match=r"r\.npz: the train split has no image of class\(es\) \['z'\], so the model "
                                        r"could never predict them; .* allow_missing_classes: true"):
        prepare_dataset(raw, 8, tmp_path / "p")
    assert not (tmp_path / "p").exists()
    meta = prepare_dataset(raw, 8, tmp_path / "p", allow_missing_classes=True)
    assert meta["counts"]["train"]["z"] == 0


# ---------------------------------------------------------------- csv options


def test_bad_csv_one_hot_row_with_two_classes(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((4, 4, 3), i * 50, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    with (tmp_path / "gt.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["image", "A", "B"], ["0", "1.0", "0.0"], ["1", "1.0", "1.0"], ["2", "0", "1"]])
    options = {"path": str(tmp_path / "gt.csv"), "path_column": "image", "path_template": "{}.png",
               "label_columns": ["A", "B"]}  # fmt: skip
    with pytest.raises(DataError, match=r"gt\.csv, line 3: 2 of the one-hot label_columns \['A', 'B'\] are set"):
        fetch_dataset("csv", options, tmp_path / "x.npz")


# ---------------------------------------------------------------- the downloader


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``payload`` at /file.bin after ``failures`` answers of 503; 404 elsewhere."""

    payload = b"medmerge" * 1000
    failures = 0
    requests = 0

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).requests += 1
        if self.path != "/file.bin":
            self.send_error(404)
        elif type(self).failures > 0:
            type(self).failures -= 1
            self.send_error(503)
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.payload)))
            self.end_headers()
            self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    FlakyHandler.requests = 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_retries_transient_errors_and_verifies(tmp_path, flaky):
    sha = hashlib.sha256(FlakyHandler.payload).hexdigest()
    FlakyHandler.failures = 2
    digests = download_file(f"{flaky}/file.bin", tmp_path / "f.bin", sha256=sha, retries=2, backoff=0.01,
                            progress=True)  # fmt: skip
    assert (tmp_path / "f.bin").read_bytes() == FlakyHandler.payload and FlakyHandler.requests == 3
    assert digests == {"sha256": sha, "md5": hashlib.md5(FlakyHandler.payload).hexdigest()}


def test_download_failures_leave_nothing(tmp_path, flaky):
    FlakyHandler.failures = 5
    with pytest.raises(DownloadError, match=r"download of .*/file\.bin failed: HTTP Error 503"):
        download_file(f"{flaky}/file.bin", tmp_path / "f.bin", retries=1, backoff=0.01)
    assert FlakyHandler.requests == 2
    with pytest.raises(DownloadError, match="HTTP Error 404"):
        download_file(f"{flaky}/nope.bin", tmp_path / "f.bin", retries=3, backoff=0.01)
    assert FlakyHandler.requests == 3  # a 404 is not retried
    FlakyHandler.failures = 0
    with pytest.raises(ChecksumError, match=rf"md5 mismatch for {flaky}/file\.bin: expected {'0' * 32}, got"):
        download_file(f"{flaky}/file.bin", tmp_path / "f.bin", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_dataset_preparation_keys_are_validated():
    import yaml

    from medmerge.config import ConfigError, parse_params

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    lesions = raw["data"]["datasets"]["lesions"]
    settings = parse_params(raw)
    assert settings.data.workers >= 1 and settings.data.datasets["lesions"].resize == "squash"
    lesions.update(train_fraction=0.5, n_train_per_class=3)
    with pytest.raises(ConfigError, match=r"data\.datasets\.lesions: .*give train_fraction or n_train_per_class, not both"):
        parse_params(raw)
    lesions.pop("n_train_per_class")
    lesions.pop("train_fraction")
    lesions["train_subset"] = "rest"
    with pytest.raises(ConfigError, match=r"data\.datasets\.lesions: .*train_subset: rest needs the subsample it "
                                          r"leaves out \(train_fraction or n_train_per_class\)"):
        parse_params(raw)
    lesions["train_fraction"] = 0.5
    assert parse_params(raw).data.datasets["lesions"].train_subset == "rest"
    lesions["resize"] = "fit"
    with pytest.raises(ConfigError, match=r"data\.datasets\.lesions\.resize: Input should be 'squash', 'pad' or 'center_crop'"):
        parse_params(raw)


def test_dicom_voi_lut_sequence_is_applied_before_the_window(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from test_data_sources import write_dicom

    from medmerge.data import read_image

    lut = Dataset()
    lut.LUTDescriptor = [4, 10, 8]  # 4 entries, the first for stored value 10, 8 bits per entry
    lut.add_new(0x00283006, "US", [0, 60, 120, 250])  # LUTData
    stored = np.array([[5, 10, 11], [12, 13, 99]], dtype=np.uint16)
    path = write_dicom(tmp_path / "lut.dcm", stored, "MONOCHROME2", VOILUTSequence=Sequence([lut]),
                       WindowCenter=0, WindowWidth=1000)  # fmt: skip
    # below the first entry -> entry 0, above the last -> the last entry; 8-bit LUT output is already 0..255
    assert read_image(path)[..., 0].tolist() == [[0, 0, 60], [120, 250, 250]]
