"""Tests for medmerge.data: synthetic data, npz IO, preparation and fetching."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from medmerge.data import (
    DATA_ORIGINS,
    SPLITS,
    SYNTHETIC_TASKS,
    DataError,
    fetch_dataset,
    generate_synthetic,
    load_npz,
    load_split,
    prepare_dataset,
    read_meta,
    save_npz_atomic,
    to_rgb,
)
from medmerge.data import decode as decode_module

# ---------------------------------------------------------------- helpers


def medmnist_arrays(n=(12, 4, 6), size=28, channels=None, num_classes=3, seed=0) -> dict[str, np.ndarray]:
    """A small MedMNIST-layout dict: uint8 images, uint8 labels of shape (N, 1), every class present."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in zip(SPLITS, n, strict=True):
        shape = (count, size, size) if channels is None else (count, size, size, channels)
        out[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(count) % num_classes).astype(np.uint8)[:, None]
    return out


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def leftovers(directory: Path) -> list[str]:
    """Hidden temporary files/dirs left in a directory."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def lesions32() -> dict[str, np.ndarray]:
    return generate_synthetic("lesions", 200, 10, 10, image_size=32, seed=3)


def test_synthetic_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError, match=r"'nope'.*lesions.*shapes.*textures"):
        generate_synthetic("nope", 4, 4, 4)


@pytest.mark.parametrize("task", sorted(SYNTHETIC_TASKS))
def test_synthetic_layout_and_balance(task):
    data = generate_synthetic(task, 10, 5, 7, image_size=32, seed=1)
    num_classes = len(SYNTHETIC_TASKS[task].class_names)
    assert list(data["class_names"]) == SYNTHETIC_TASKS[task].class_names
    assert data["class_names"].dtype.kind == "U"
    for split, n in zip(SPLITS, (10, 5, 7), strict=True):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (n, 1) and labels.dtype == np.int64
        counts = np.bincount(labels[:, 0], minlength=num_classes)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n
    assert data["train_images"].std() > 10  # not blank


def test_synthetic_is_deterministic_and_seed_dependent():
    a = generate_synthetic("textures", 6, 6, 6, image_size=32, seed=7)
    b = generate_synthetic("textures", 6, 6, 6, image_size=32, seed=7)
    c = generate_synthetic("textures", 6, 6, 6, image_size=32, seed=8)
    assert a.keys() == b.keys()
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert a["train_images"].tobytes() != c["train_images"].tobytes()
    assert a["train_images"].tobytes() != a["val_images"].tobytes() != a["test_images"].tobytes()


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_val"):
        generate_synthetic("shapes", 4, 0, 4)
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic("shapes", 4, 4, 4, image_size=8)


def test_synthetic_round_trip_without_pickle(tmp_path, lesions32):
    path = tmp_path / "lesions.npz"
    save_npz_atomic(path, lesions32)
    assert leftovers(tmp_path) == []
    with np.load(path, allow_pickle=False) as npz:
        assert npz["class_names"].dtype.kind == "U"
    raw = load_npz(path)
    assert raw.class_names == SYNTHETIC_TASKS["lesions"].class_names
    assert np.array_equal(raw.images["test"], lesions32["test_images"])
    assert np.array_equal(raw.labels["train"], lesions32["train_labels"][:, 0])


def test_lesion_texture_feature_is_visible(lesions32):
    """Dots raise the intensity variance in the lesion centre, for either border type."""
    gray = lesions32["train_images"].astype(np.float32).mean(-1)
    centre_var = gray[:, 11:21, 11:21].reshape(len(gray), -1).var(axis=1)
    labels = lesions32["train_labels"][:, 0]
    names = list(lesions32["class_names"])
    for border in ("regular", "irregular"):
        plain = centre_var[labels == names.index(f"{border}_plain")].mean()
        dotted = centre_var[labels == names.index(f"{border}_dotted")].mean()
        assert dotted > 1.3 * plain, (border, plain, dotted)


def test_shape_feature_is_visible():
    """Elongated lesions have a larger axis ratio of the thresholded lesion mask."""
    data = generate_synthetic("shapes", 90, 3, 3, image_size=32, seed=3)
    gray = data["train_images"].astype(np.float32).mean(-1)
    ratios = []
    for img in gray:
        background = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]))
        ys, xs = np.nonzero(img < (background + np.median(img[13:19, 13:19])) / 2)
        low, high = np.linalg.eigvalsh(np.cov(np.stack([xs, ys])))
        ratios.append(np.sqrt(high / low))
    ratios, labels = np.array(ratios), data["train_labels"][:, 0]
    names = list(data["class_names"])
    assert (
        ratios[labels == names.index("elongated")].mean()
        > ratios[labels == names.index("round_regular")].mean() + 0.15
    )


# ---------------------------------------------------------------- load_npz


def test_load_npz_good_rgb_file(tmp_path):
    raw = load_npz(write_npz(tmp_path / "d.npz", medmnist_arrays(channels=3)))
    assert raw.class_names is None and raw.num_classes == 3 and raw.source == tmp_path / "d.npz"
    assert raw.images["train"].shape == (12, 28, 28, 3) and raw.images["train"].dtype == np.uint8
    assert raw.labels["val"].shape == (4,) and raw.labels["val"].dtype == np.int64


def test_load_npz_grayscale(tmp_path):
    raw = load_npz(write_npz(tmp_path / "g.npz", medmnist_arrays()))
    assert raw.images["test"].shape == (6, 28, 28)


def test_load_npz_missing_key_names_file_and_key(tmp_path):
    arrays = medmnist_arrays()
    del arrays["val_labels"]
    path = write_npz(tmp_path / "m.npz", arrays)
    with pytest.raises(DataError, match=r"m\.npz.*missing key.*val_labels.*expected keys"):
        load_npz(path)


def test_load_npz_label_out_of_class_range(tmp_path):
    arrays = medmnist_arrays()
    arrays["class_names"] = np.array(["a", "b", "c"])
    arrays["test_labels"][2] = 5
    path = write_npz(tmp_path / "r.npz", arrays)
    with pytest.raises(DataError, match=r"r\.npz \[test_labels\]: label 5 is outside 0\.\.2"):
        load_npz(path)
    del arrays["class_names"]
    write_npz(path, arrays)
    assert load_npz(path).num_classes == 6  # without names the range is open ...
    with pytest.raises(DataError, match="label 5"):
        load_npz(path, num_classes=3)  # ... unless num_classes is given


def test_load_npz_negative_label(tmp_path):
    arrays = medmnist_arrays()
    arrays["train_labels"] = arrays["train_labels"].astype(np.int64) - 1
    with pytest.raises(DataError, match=r"\[train_labels\]: negative label -1"):
        load_npz(write_npz(tmp_path / "n.npz", arrays))


def test_load_npz_length_mismatch(tmp_path):
    arrays = medmnist_arrays()
    arrays["val_labels"] = arrays["val_labels"][:3]
    with pytest.raises(DataError, match=r"\[val_labels\]: 3 labels for 4 images"):
        load_npz(write_npz(tmp_path / "l.npz", arrays))


def test_load_npz_multi_label(tmp_path):
    arrays = medmnist_arrays()
    arrays["train_labels"] = np.zeros((12, 14), dtype=np.uint8)
    with pytest.raises(DataError, match="multi-label data is not supported"):
        load_npz(write_npz(tmp_path / "ml.npz", arrays))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(val_images=a["val_images"][:0], val_labels=a["val_labels"][:0]), "no samples"),
        (lambda a: a.update(train_labels=a["train_labels"].astype(np.float32)), "integer class indices"),
        (lambda a: a.update(train_images=a["train_images"].astype(np.int32)), "expected uint8, uint16"),
        (lambda a: a.update(train_images=a["train_images"] * 2.0), r"\[0, 1\]"),
        (lambda a: a.update(train_images=a["train_images"][..., None].repeat(2, -1)), "C in 1/3/4"),
        (lambda a: a.update(class_names=np.array([1, 2, 3])), "unicode"),
    ],
)
def test_load_npz_rejects_bad_content(tmp_path, change, message):
    arrays = medmnist_arrays()
    change(arrays)
    with pytest.raises(DataError, match=message):
        load_npz(write_npz(tmp_path / "bad.npz", arrays))


def test_load_npz_converts_uint16_and_float(tmp_path):
    arrays = medmnist_arrays()
    expected = arrays["train_images"].copy()
    arrays["train_images"] = expected.astype(np.uint16) * 257
    arrays["val_images"] = arrays["val_images"] / 255.0
    raw = load_npz(write_npz(tmp_path / "c.npz", arrays))
    assert raw.images["train"].dtype == raw.images["val"].dtype == np.uint8
    assert np.array_equal(raw.images["train"], expected)
    assert np.array_equal(raw.images["val"], medmnist_arrays()["val_images"])


def test_load_npz_refuses_pickle_and_missing_file(tmp_path):
    arrays = medmnist_arrays()
    arrays["class_names"] = np.array(["a", "b", "c"], dtype=object)
    path = write_npz(tmp_path / "obj.npz", arrays)
    with pytest.raises(DataError, match=r"obj\.npz \[class_names\]: cannot be read.*pickle"):
        load_npz(path)
    with pytest.raises(DataError, match="object arrays"):
        save_npz_atomic(tmp_path / "x.npz", arrays)
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "absent.npz")


def test_load_npz_num_classes_must_match_names(tmp_path):
    arrays = medmnist_arrays()
    arrays["class_names"] = np.array(["a", "b", "c"])
    with pytest.raises(DataError, match="num_classes=4"):
        load_npz(write_npz(tmp_path / "nc.npz", arrays), num_classes=4)


# ---------------------------------------------------------------- prepare


def test_to_rgb_channel_conversions():
    gray = np.full((2, 4, 4), 9, dtype=np.uint8)
    assert to_rgb(gray).shape == (2, 4, 4, 3) and (to_rgb(gray) == 9).all()
    assert to_rgb(gray[..., None]).shape == (2, 4, 4, 3)
    rgba = np.zeros((1, 2, 2, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 51
    assert (to_rgb(rgba) == 40).all()  # 200 * 51 / 255 composited on black


def test_prepare_resizes_gray_and_writes_meta(tmp_path):
    raw = load_npz(write_npz(tmp_path / "gray.npz", medmnist_arrays()))
    out = tmp_path / "prepared"
    meta = prepare_dataset(raw, 32, out, class_names=["x", "y", "z"])
    assert meta == read_meta(out)
    assert meta["classes"] == ["x", "y", "z"] and meta["num_classes"] == 3 and meta["image_size"] == 32
    assert meta["counts"] == {
        "train": {"x": 4, "y": 4, "z": 4},
        "val": {"x": 2, "y": 1, "z": 1},
        "test": {"x": 2, "y": 2, "z": 2},
    }
    assert meta["source"] == "gray.npz" and meta["imbalance_ratio"] == 1.0
    images, labels = load_split(out, "val")
    assert isinstance(images, np.memmap) and images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert images.flags["C_CONTIGUOUS"] and labels.dtype == np.int64
    assert np.array_equal(labels, raw.labels["val"])
    assert (images[..., 0] == images[..., 2]).all()  # gray repeated
    in_memory, _ = load_split(out, "val", mmap=False)
    assert not isinstance(in_memory, np.memmap) and np.array_equal(in_memory, images)
    assert json.loads((out / "meta.json").read_text())["counts"]["train"]["x"] == 4
    assert leftovers(tmp_path) == []


def test_prepare_keeps_size_and_default_names(tmp_path, caplog):
    arrays = medmnist_arrays(size=32, channels=3)
    arrays["test_labels"][:] = 0  # test split misses classes 1 and 2
    raw = load_npz(write_npz(tmp_path / "rgb.npz", arrays))
    with caplog.at_level(logging.WARNING, logger="medmerge.data"):
        meta = prepare_dataset(raw, 32, tmp_path / "p")
    assert meta["classes"] == ["class_0", "class_1", "class_2"]
    assert "'test'" in caplog.text and "class_1" in caplog.text
    images, _ = load_split(tmp_path / "p", "train")
    assert np.array_equal(images, arrays["train_images"])


def test_prepare_is_atomic(tmp_path, monkeypatch):
    raw = load_npz(write_npz(tmp_path / "a.npz", medmnist_arrays()))
    out = tmp_path / "prepared"
    real_resize, calls = decode_module.resize_image, []

    def failing_resize(image, size, policy):
        calls.append(size)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_resize(image, size, policy)

    monkeypatch.setattr(decode_module, "resize_image", failing_resize)
    with pytest.raises(RuntimeError, match="boom"):
        prepare_dataset(raw, 32, out)
    assert not out.exists() and leftovers(tmp_path) == []

    monkeypatch.setattr(decode_module, "resize_image", real_resize)
    old_meta = prepare_dataset(raw, 32, out)
    monkeypatch.setattr(decode_module, "resize_image", failing_resize)
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        prepare_dataset(raw, 16, out)
    assert read_meta(out) == old_meta and load_split(out, "test")[0].shape[1] == 32
    assert leftovers(tmp_path) == []


def test_prepare_replaces_existing_output(tmp_path):
    raw = load_npz(write_npz(tmp_path / "a.npz", medmnist_arrays()))
    out = tmp_path / "prepared"
    prepare_dataset(raw, 32, out)
    (out / "stale.txt").write_text("old")
    prepare_dataset(raw, 20, out)
    assert read_meta(out)["image_size"] == 20 and not (out / "stale.txt").exists()
    assert leftovers(tmp_path) == []


def test_load_split_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_split(tmp_path, "dev")
    with pytest.raises(DataError, match="run the prepare stage"):
        load_split(tmp_path, "train")
    with pytest.raises(DataError, match="meta.json"):
        read_meta(tmp_path)


# ---------------------------------------------------------------- fetch


def test_fetch_synthetic(tmp_path):
    out = tmp_path / "raw" / "demo" / "demo.npz"
    options = {"task": "shapes", "n_train": 6, "n_val": 3, "n_test": 3, "image_size": 32, "seed": 2}
    assert fetch_dataset("synthetic", options, out) == out
    raw = load_npz(out)
    assert raw.class_names == SYNTHETIC_TASKS["shapes"].class_names
    assert raw.images["train"].shape == (6, 32, 32, 3)


def test_fetch_unknown_origin_and_options(tmp_path):
    with pytest.raises(ValueError, match=r"'ftp'.*medmnist.*npz.*synthetic"):
        fetch_dataset("ftp", {}, tmp_path / "x.npz")
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) \['colour'\].*missing option\(s\) \['n_train'"
    ):
        fetch_dataset("synthetic", {"task": "shapes", "colour": 1}, tmp_path / "x.npz")
    assert set(DATA_ORIGINS) == {"synthetic", "npz", "medmnist", "imagefolder", "csv"}


def test_fetch_npz_validates_and_copies(tmp_path):
    src = write_npz(tmp_path / "mine.npz", medmnist_arrays())
    out = tmp_path / "raw" / "mine" / "mine.npz"
    fetch_dataset("npz", {"path": str(src)}, out)
    assert out.read_bytes() == src.read_bytes()

    arrays = medmnist_arrays()
    arrays["val_labels"] = arrays["val_labels"][:2]
    bad = write_npz(tmp_path / "bad.npz", arrays)
    out_bad = tmp_path / "raw" / "bad" / "bad.npz"
    with pytest.raises(DataError, match=r"bad\.npz \[val_labels\]"):
        fetch_dataset("npz", {"path": bad}, out_bad)
    assert not out_bad.exists() and leftovers(out_bad.parent) == []


def dermamnist_fixture(directory: Path, size: int = 64) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    name = "dermamnist.npz" if size == 28 else f"dermamnist_{size}.npz"
    return write_npz(directory / name, medmnist_arrays(n=(14, 7, 7), size=8, channels=3, num_classes=7))


def test_fetch_medmnist_from_root(tmp_path):
    src = dermamnist_fixture(tmp_path / "cache")
    out = tmp_path / "raw" / "derma" / "derma.npz"
    options = {"flag": "dermamnist", "size": 64, "root": str(tmp_path / "cache"), "md5": md5(src)}
    fetch_dataset("medmnist", options, out)
    raw = load_npz(out)
    assert len(raw.class_names) == 7 and raw.class_names[4] == "melanoma"
    assert np.array_equal(raw.images["train"], load_npz(src).images["train"])

    out.unlink()
    with pytest.raises(DataError, match=r"md5 mismatch.*dermamnist_64\.npz.*expected 0+, got"):
        fetch_dataset("medmnist", {**options, "md5": "0" * 32}, out)
    assert not out.exists()


def test_fetch_medmnist_flag_checks(tmp_path):
    with pytest.raises(DataError, match=r"unknown MedMNIST flag 'nodulemnist3d'.*dermamnist"):
        fetch_dataset("medmnist", {"flag": "nodulemnist3d"}, tmp_path / "x.npz")
    with pytest.raises(DataError, match="multi-label data is not supported"):
        fetch_dataset("medmnist", {"flag": "chestmnist"}, tmp_path / "x.npz")
    with pytest.raises(DataError, match="size must be one of"):
        fetch_dataset("medmnist", {"flag": "dermamnist", "size": 32}, tmp_path / "x.npz")


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A loopback HTTP server serving ``tmp_path / 'www'``; yields (directory, base URL)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=root)
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_medmnist_download(tmp_path, http_root):
    www, base = http_root
    src = dermamnist_fixture(www, size=28)
    out_dir = tmp_path / "raw" / "derma"
    out = out_dir / "derma.npz"
    url = f"{base}/dermamnist.npz?download=1"

    with pytest.raises(
        DataError, match=rf"md5 mismatch for {base}/dermamnist.npz.*expected f+, got {md5(src)}"
    ):
        fetch_dataset("medmnist", {"flag": "dermamnist", "url": url, "md5": "f" * 32}, out)
    assert not out.exists() and leftovers(out_dir) == []

    (www / "page.html").write_text("<html>not a zip</html>")
    with pytest.raises(DataError, match=rf"{base}/page.html: not a readable .npz file"):
        fetch_dataset("medmnist", {"flag": "dermamnist", "url": f"{base}/page.html"}, out)
    assert not out.exists() and leftovers(out_dir) == []

    with pytest.raises(DataError, match="download of .*missing.npz failed"):
        fetch_dataset("medmnist", {"flag": "dermamnist", "url": f"{base}/missing.npz"}, out)
    assert not out.exists() and leftovers(out_dir) == []

    fetch_dataset(
        "medmnist", {"flag": "dermamnist", "url": url, "md5": md5(src), "root": tmp_path / "empty"}, out
    )
    raw = load_npz(out)
    assert raw.class_names[0] == "actinic keratoses and intraepithelial carcinoma"
    assert np.array_equal(raw.labels["test"], load_npz(src).labels["test"])
    assert leftovers(out_dir) == []
