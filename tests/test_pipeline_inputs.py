"""Every dataset origin and every weight origin through `dvc repro`, on tiny inputs the test writes itself.

Datasets: ``derm`` (target, ``csv`` with patient ids, grouped splits drawn), ``folder`` (``imagefolder`` with
split folders, mixed PNG RGB / grayscale / JPEG), ``arrays`` (``npz``), ``mnist`` (``medmnist`` from a local
``root``). Sources: ``a`` (``file``, a wrapped ``.pth`` with a ``module.`` prefix), ``b`` (``url``, served by a
loopback HTTP server), ``c`` (``timm`` with a local ``file``, used as given: no task, so nothing pretrains it);
three sources, so ``normalization: auto`` is softmax.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from medmerge.testing import REPO, copy_repo, init_and_repro, run, stage_env

ARCH = "test_efficientnet"  # timm's ~0.1M-parameter test model: fast at 32 px on CPU
SIZE = 32
DERM_CLASSES = ["benign", "melanoma", "nevus"]
MNIST_FLAG, MNIST_CLASSES = "dermamnist", 7

pytestmark = pytest.mark.integration


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- input files


def _image(rng: np.random.Generator, label: int, shape: tuple[int, ...]) -> np.ndarray:
    """Noise around a class-dependent brightness, so the classes are learnable at all."""
    return np.clip(rng.normal(60 + 70 * label, 25, size=shape), 0, 255).astype(np.uint8)


def write_csv_dataset(root: Path, rng: np.random.Generator) -> Path:
    """12 patients (4 per class), 3 PNGs each, a manifest without a split column."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for patient in range(12):
        label = patient % len(DERM_CLASSES)
        for shot in range(3):
            name = f"p{patient:02d}_{shot}.png"
            Image.fromarray(_image(rng, label, (SIZE + 4, SIZE, 3)), "RGB").save(images / name)
            rows.append((f"images/{name}", DERM_CLASSES[label], f"patient{patient:02d}"))
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows(rows)
    return manifest


def write_image_folder(root: Path, rng: np.random.Generator) -> Path:
    """root/{train,val,test}/{cyst,normal}/ with RGB PNGs, grayscale PNGs and JPEGs of several sizes."""
    from PIL import Image

    for split, count in {"train": 8, "val": 4, "test": 4}.items():
        for label, name in enumerate(["cyst", "normal"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                kind = i % 3
                if kind == 0:
                    Image.fromarray(_image(rng, label, (SIZE, SIZE, 3)), "RGB").save(folder / f"{i}.png")
                elif kind == 1:
                    Image.fromarray(_image(rng, label, (SIZE + 8, SIZE + 8)), "L").save(folder / f"{i}.png")
                else:
                    Image.fromarray(_image(rng, label, (SIZE * 2, SIZE, 3)), "RGB").save(folder / f"{i}.jpg")
    return root


def write_medmnist_layout(path: Path, rng: np.random.Generator, num_classes: int, per_class: dict) -> Path:
    """MedMNIST layout: {split}_images uint8 (N, 28, 28) grayscale, {split}_labels (N, 1); no class names."""
    arrays = {}
    for split, count in per_class.items():
        labels = np.repeat(np.arange(num_classes), count)
        arrays[f"{split}_images"] = np.stack([_image(rng, int(y) % 3, (28, 28)) for y in labels])
        arrays[f"{split}_labels"] = labels.astype(np.uint8)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def write_weights(root: Path) -> dict[str, Path]:
    """Seeded timm states: a wrapped DataParallel-style .pth, and two .safetensors files."""
    import safetensors.torch
    import timm
    import torch

    def state(seed: int) -> dict:
        torch.manual_seed(seed)
        return {k: v.contiguous() for k, v in timm.create_model(ARCH).state_dict().items()}

    root.mkdir(parents=True, exist_ok=True)
    files = {"a": root / "a.pth", "b": root / "served" / "b.safetensors", "c": root / "c.safetensors"}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state(1).items()}}, files["a"])
    files["b"].parent.mkdir()
    safetensors.torch.save_file(state(2), str(files["b"]))
    safetensors.torch.save_file(state(3), str(files["c"]))
    return files


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory):
    """All input files, and the base URL of a loopback server holding b.safetensors."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    files = write_weights(root / "weights")
    data = {
        "manifest": write_csv_dataset(root / "derm", rng),
        "folder": write_image_folder(root / "folder", rng),
        "arrays": write_medmnist_layout(root / "arrays.npz", rng, 2, {"train": 10, "val": 5, "test": 5}),
        "mnist_root": write_medmnist_layout(
            root / "medmnist" / f"{MNIST_FLAG}.npz", rng, MNIST_CLASSES, {"train": 3, "val": 2, "test": 2}
        ).parent,
    }
    served = files["b"].parent
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{files['b'].name}"
    yield {"files": files, "data": data, "url": url, "sha256": sha256(files["b"])}
    server.shutdown()
    server.server_close()
    thread.join()


def input_params(inputs: dict, url_sha256: str | None = None) -> dict:
    """The repository's params.yaml with the tiny datasets and sources above, 1 epoch everywhere."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    data, files = inputs["data"], inputs["files"]
    params["data"].update(image_size=SIZE, target="derm")
    params["data"]["datasets"] = {
        "derm": {"origin": "csv", "options": {
            "path": str(data["manifest"]), "group_column": "patient_id",
            "val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
        "folder": {"origin": "imagefolder", "options": {"root": str(data["folder"])}, "resize": "pad"},
        "arrays": {"origin": "npz", "options": {"path": str(data["arrays"])}},
        "mnist": {"origin": "medmnist", "options": {"flag": MNIST_FLAG, "size": 28, "root": str(data["mnist_root"])}},
    }  # fmt: skip
    params["sources"] = {
        "a": {"arch": ARCH, "origin": "file", "options": {"path": str(files["a"])}, "task": "folder"},
        "b": {"arch": ARCH, "origin": "url", "task": "arrays",
              "options": {"url": inputs["url"], "sha256": url_sha256 or inputs["sha256"]}},
        "c": {"arch": ARCH, "origin": "timm", "options": {"name": ARCH, "file": str(files["c"])}},  # as given
    }  # fmt: skip
    for section in ("pretrain", "finetune"):
        params[section].update(epochs=1, batch_size=8)
    params["merge"].update(anchor="a", normalization="auto", epochs=1, batch_size=8, finetune_epochs=1)
    params["seeds"], params["baselines"] = [0], ["ft"]
    params["methods"] = {"average": {"method": "average"}, "medmerge": {"method": "medmerge"},
                         "medmerge_aligned": {"method": "medmerge", "align": "weight_matching"}}
    params["evaluate"]["batch_size"] = 64
    return params


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, inputs) -> Path:
    root = copy_repo(tmp_path_factory.mktemp("pipeline_inputs"), input_params(inputs))
    init_and_repro(root, stage_env(), "every origin")
    return root


# ---------------------------------------------------------------- tests


def test_repro_runs_every_dataset_and_weight_origin(repo, inputs) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    merges = ("average", "medmerge", "medmerge_aligned")
    assert set(metrics) == {"ft_a", "ft_b", "ft_c", "ensemble_ft", *merges, *(f"{m}_collapsed" for m in merges)}
    for method, values in metrics.items():
        assert 0.0 <= values["f1_macro"] <= 1.0, method

    for method in ("medmerge", "medmerge_aligned"):  # three sources: softmax across them, per kernel
        coefficients = repo / f"models/merge/{method}/seed_0/coefficients.safetensors"
        with safe_open(str(coefficients), "pt") as f:
            assert f.metadata()["sources"] == "a,b,c"
        weights = load_file(coefficients)
        assert weights
        for group, w in weights.items():
            assert w.shape[0] == 3, group
            assert np.allclose(w.sum(0).numpy(), 1.0, atol=1e-5), group
        merge = json.loads((repo / f"models/merge/{method}/seed_0/merge.json").read_text())
        assert merge["normalization"] == "softmax" and merge["anchor"] == "a" and merge["classes"] == DERM_CLASSES
    aligned = json.loads((repo / "models/merge/medmerge_aligned/seed_0/merge.json").read_text())["alignment"]
    assert set(aligned) == {"b", "c"}  # every non-anchor source permuted onto the anchor
    for report in aligned.values():
        assert report["similarity_after"] >= report["similarity_before"]
    average = load_file(repo / "models/merge/average/seed_0/coefficients.safetensors")
    assert np.allclose(average["model"].numpy(), 1 / 3)

    meta = {name: json.loads((repo / f"data/processed/{name}/meta.json").read_text())
            for name in ("derm", "folder", "arrays", "mnist")}  # fmt: skip
    assert meta["derm"]["classes"] == DERM_CLASSES
    assert meta["folder"]["classes"] == ["cyst", "normal"]
    assert meta["arrays"]["num_classes"] == 2
    assert meta["mnist"]["num_classes"] == MNIST_CLASSES
    assert all(m["image_size"] == SIZE for m in meta.values())
    assert meta["folder"]["counts"]["train"] == {
        "cyst": 8,
        "normal": 8,
    }  # the split folders are kept as given
    assert meta["mnist"]["classes"][4] == "melanoma"  # dermamnist's known class names were added

    assert meta["folder"]["resize"] == "pad"
    assert sorted(p.name for p in (repo / "data/raw/derm").iterdir()) == ["derm.classes.json", "derm.splits.csv"]
    with (repo / "data/raw/derm/derm.splits.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 36
    split_of: dict[str, set] = {}
    for row in rows:
        split_of.setdefault(row["group"], set()).add(row["split"])
    assert len(split_of) == 12 and all(g.startswith("patient") for g in split_of)
    assert all(len(splits) == 1 for splits in split_of.values()), split_of
    assert {row["split"] for row in rows} == {"train", "val", "test"}

    cards = {name: json.loads((repo / f"models/sources/{name}/card.json").read_text()) for name in "abc"}
    assert cards["b"]["origin"] == "url" and cards["b"]["options"]["url"] == inputs["url"]
    assert cards["b"]["source_sha256"] == cards["b"]["options"]["sha256"] == inputs["sha256"]
    assert cards["a"]["origin"] == "file" and cards["a"]["source_sha256"] == sha256(inputs["files"]["a"])
    assert cards["c"]["origin"] == "timm" and cards["c"]["source_sha256"] == sha256(inputs["files"]["c"])
    assert {card["arch"] for card in cards.values()} == {ARCH}


def test_url_origin_with_wrong_sha256_stops_fetch_model_cleanly(tmp_path, inputs) -> None:
    wrong = "0" * 64
    root = copy_repo(tmp_path, input_params(inputs, url_sha256=wrong))
    result = run([sys.executable, "-m", "stages.fetch_model", "b"], root, stage_env(), check=False)
    assert result.returncode == 1, result.stderr
    assert inputs["url"] in result.stderr and f"expected {wrong}" in result.stderr, result.stderr
    assert inputs["sha256"] in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not (root / "models/sources/b").exists()


def test_a_source_without_a_task_is_used_as_given(repo) -> None:
    """``c`` has no task: no weights are trained or copied for it; its baseline and merges start from the
    fetched file itself, and the pretrained ``a`` from its own pretraining."""
    from medmerge.models import load_model_dir

    pointer = repo / "models/pretrained/seed_0/c"
    card = json.loads((pointer / "card.json").read_text())
    assert card["as_given"] is True and card["weights_from"] == "models/sources/c"
    assert not (pointer / "model.safetensors").exists()
    source = json.loads((repo / "models/sources/c/card.json").read_text())
    ft = json.loads((repo / "models/ft/seed_0/c/card.json").read_text())
    assert ft["init_sha256"] == source["sha256"]  # the baseline started from the fetched weights
    pretrained = json.loads((repo / "models/pretrained/seed_0/a/card.json").read_text())
    assert pretrained["stage"] == "pretrain" and pretrained["task"] == "folder" and "weights_from" not in pretrained
    assert json.loads((repo / "models/ft/seed_0/a/card.json").read_text())["init_sha256"] == pretrained["sha256"]
    import os

    cwd = os.getcwd()
    try:
        os.chdir(repo)
        state, _ = load_model_dir("models/pretrained/seed_0/c")
    finally:
        os.chdir(cwd)
    assert state  # the pointer resolves to the source's weights, checked by sha256
    report = (repo / "reports/comparison.md").read_text()
    assert "Sources used as given (c)" in report


def test_random_bytes_as_a_file_source_stop_fetch_model_with_one_line(tmp_path, inputs) -> None:
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    params = input_params(inputs)
    params["sources"]["a"]["options"]["path"] = str(noise)
    (tmp_path / "repo").mkdir()
    root = copy_repo(tmp_path / "repo", params)
    result = run([sys.executable, "-m", "stages.fetch_model", "a"], root, stage_env(), check=False)
    assert result.returncode == 1, result.stderr
    assert f"cannot read {noise}: expected a safetensors file or a torch state dict saved with torch.save" \
        in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "IndexError" not in result.stderr, result.stderr
    assert not (root / "models/sources/a").exists()
