"""MLflow Models without pickles: a model dir logged as code, registered, loaded back by name, and the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medmerge.model_registry import best_model, register_best_model
from medmerge.models import create_model, input_card, save_model_dir
from medmerge.predict import input_files, load_classifier, predict_files
from medmerge.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_experiment, stage_run

TINY = "test_efficientnet"
CLASSES = ["benign", "malignant", "unclear"]
SIZE = 32


@pytest.fixture(autouse=True)
def own_store(monkeypatch) -> None:
    """``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI, which the stages honour: one store per test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=len(CLASSES))
    out = tmp_path_factory.mktemp("model") / "merged_ft"
    save_model_dir(out, model.state_dict(), {"arch": TINY, "num_classes": len(CLASSES), "classes": CLASSES,
                                             "method": "medmerge", "seed": 1, "input": input_card(TINY, SIZE)})
    return out


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_best_model_takes_the_best_mean_then_its_best_seed() -> None:
    per_seed = pd.DataFrame({"method": ["a", "a", "b", "b", "ft"], "seed": [0, 1, 0, 1, 0],
                             "f1_macro": [0.5, 0.7, 0.65, 0.6, 0.99]})
    assert best_model(per_seed, ["a", "b"]) == ("b", 0)  # b's mean 0.625 beats a's 0.6; ft is no candidate
    with pytest.raises(ValueError, match="no per-seed results"):
        best_model(per_seed, ["missing"])


def test_experiments_are_marked_as_model_training(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("old")  # made without the tag, as earlier versions did
    ensure_experiment("old", uri)
    ensure_experiment("new", uri)
    for name in ("old", "new"):
        assert client.get_experiment_by_name(name).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert ensure_experiment("old", uri) == old


def test_training_runs_log_their_datasets_with_name_digest_and_context(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from medmerge.tracking import TRAINING_SPLITS, dataset_digest

    prepared = tmp_path / "data/processed/lesions"
    prepared.mkdir(parents=True)
    (prepared / "meta.json").write_text(json.dumps({"image_size": SIZE, "classes": CLASSES}))
    for split, n in (("train", 6), ("val", 3)):
        np.save(prepared / f"{split}_images.npy", images(n, SIZE))
        np.save(prepared / f"{split}_labels.npy", np.arange(n) % 3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with stage_run("ft", "medmerge", {}, uri) as tracker:
        tracker.log_dataset(prepared, "lesions", TRAINING_SPLITS)
    logged = MlflowClient(uri).get_run(tracker.run_id).inputs.dataset_inputs
    found = {d.dataset.name: (d.dataset.digest, [t.value for t in d.tags if t.key == "mlflow.data.context"])
             for d in logged}
    assert found == {"lesions/train": (dataset_digest(prepared, "train"), ["training"]),
                     "lesions/val": (dataset_digest(prepared, "val"), ["validation"])}
    assert dataset_digest(prepared, "train") != dataset_digest(prepared, "val")
    np.save(prepared / "train_labels.npy", np.zeros(6, dtype=np.int64))  # other labels: another digest
    assert dataset_digest(prepared, "train") != found["lesions/train"][0]


def test_registered_model_loads_by_name_and_predicts_as_the_model_dir(tmp_path: Path, model_dir: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    batch = images(4, 48)  # another size than the model's: the pyfunc model resizes as preparation does
    with stage_run("evaluate", "medmerge", {}, uri, run_name="evaluate"):
        version = register_best_model(model_dir, method="medmerge", seed=1, metrics={"f1_macro": 0.5, "verdict": "better"},
                                      registered_name="lesions-merged", input_example=batch[:1])
    assert str(version.version) == "1" and version.tags["method"] == "medmerge" and version.tags["seed"] == "1"
    assert version.tags["test.f1_macro"] == "0.5" and "dvc_exp_name" in version.tags
    assert "test.verdict" not in version.tags
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/lesions-merged/1")
    table = loaded.predict(batch)
    classifier = load_classifier(model_dir)
    expected = classifier.probabilities(classifier.prepare(batch))
    assert list(table.columns) == ["predicted", *(f"prob_{c}" for c in CLASSES)]
    np.testing.assert_allclose(table[[f"prob_{c}" for c in CLASSES]].to_numpy(), expected, rtol=0, atol=1e-6)
    assert list(table["predicted"]) == [CLASSES[i] for i in expected.argmax(axis=1)]
    signature = loaded.metadata.get_input_schema().inputs[0]
    assert signature.type == np.dtype(np.uint8) and signature.shape == (-1, -1, -1, 3)
    artifacts = MlflowClient(uri).list_artifacts(loaded.metadata.run_id)
    assert not any(a.path.endswith((".pkl", ".pickle")) for a in artifacts)


def test_predictions_of_image_files_equal_those_of_the_arrays(tmp_path: Path, model_dir: Path) -> None:
    from PIL import Image

    batch = images(5, SIZE, seed=3)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(batch):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    (tmp_path / "list.csv").write_text("path\n" + "\n".join(f"images/{i:02d}.png" for i in range(5)) + "\n")
    classifier = load_classifier(model_dir)
    from_folder = predict_files(classifier, input_files([folder]), batch_size=2, progress=False)
    from_csv = predict_files(classifier, input_files([tmp_path / "list.csv"]), progress=False)
    expected = classifier.probabilities(batch)
    # batches of 2 and of 5 may round differently (oneDNN picks kernels by batch shape and CPU)
    np.testing.assert_allclose(from_folder.filter(like="prob_").to_numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(from_csv.filter(like="prob_").to_numpy(), expected, rtol=0, atol=1e-6)


def test_cli_predict_writes_the_csv_and_info_describes_the_model(tmp_path: Path, model_dir: Path, capsys) -> None:
    from PIL import Image

    from medmerge.cli import main

    Image.fromarray(images(1, 40)[0]).save(tmp_path / "scan.png")
    out = tmp_path / "predictions.csv"
    main(["predict", "--model", str(model_dir), str(tmp_path / "scan.png"), "--out", str(out)])
    table = pd.read_csv(out)
    assert list(table.columns) == ["path", "predicted", *(f"prob_{c}" for c in CLASSES)]
    assert table.loc[0, "predicted"] in CLASSES and table.filter(like="prob_").sum(axis=1).iloc[0] == pytest.approx(1)
    main(["info", str(model_dir)])
    info = capsys.readouterr().out
    assert TINY in info and "benign, malignant, unclear" in info and "32 x 32" in info
    assert f"timm.create_model('local-dir:{model_dir}', pretrained=True)" in info
    with pytest.raises(SystemExit) as stopped:
        main(["predict", "--model", str(tmp_path / "nowhere"), str(tmp_path / "scan.png")])
    assert stopped.value.code == 1 and "nowhere/card.json" in capsys.readouterr().err
    assert json.loads((model_dir / "config.json").read_text())["label_names"] == CLASSES


def test_cli_fetches_only_the_model_dir_of_a_registered_model(tmp_path: Path, model_dir: Path, monkeypatch,
                                                               capsys) -> None:
    """``models:/`` and ``runs:/`` URIs: MLmodel and the model dir are downloaded, not the logged code and
    environment; the predictions equal the model dir's; the timm hint's download gives the folder it names."""
    import mlflow.artifacts
    from PIL import Image

    from medmerge import cli
    from medmerge.cli import fetch_model_dir

    monkeypatch.chdir(tmp_path)  # the store's artifacts (<cwd>/mlartifacts) in the test's folder
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with stage_run("evaluate", "medmerge", {}, uri, run_name="evaluate"):
        version = register_best_model(model_dir, method="medmerge", seed=1, metrics={},
                                      registered_name="lesions-merged", input_example=images(1, SIZE))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    scans = []
    for i, image in enumerate(images(3, 40, seed=5)):
        Image.fromarray(image).save(tmp_path / f"scan_{i}.png")
        scans.append(str(tmp_path / f"scan_{i}.png"))
    fetched: dict[str, list[str]] = {}

    def recorded(uri: str, into: Path):
        download = fetch_model_dir(uri, into)
        fetched[uri] = sorted(p.name for p in into.rglob("*") if p.is_file())
        return download

    monkeypatch.setattr(cli, "fetch_model_dir", recorded)
    cli.main(["predict", "--model", str(model_dir), *scans, "--out", str(tmp_path / "local.csv")])
    assert fetched == {}
    models = ("models:/lesions-merged/1", f"runs:/{version.run_id}/model")
    for model in models:
        cli.main(["predict", "--model", model, *scans, "--out", str(tmp_path / "registered.csv")])
        assert fetched.pop(model) == ["MLmodel", "card.json", "config.json", "model.safetensors"]  # no code, no env
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "registered.csv"), pd.read_csv(tmp_path / "local.csv"))

    capsys.readouterr()
    for model in models:
        cli.main(["info", model])
        hint = capsys.readouterr().out.split("timm          ")[1].strip()
        source, inside = re.fullmatch(r"mlflow artifacts download -u (\S+) -d DIR, then "
                                      r"timm.create_model\('local-dir:DIR/(\S+)', pretrained=True\)", hint).groups()
        assert source == f"{model}/artifacts/merged_ft"
        target = tmp_path / "hint" / model.split(":")[0]
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target))  # as `mlflow artifacts download`
        assert sorted(p.name for p in (target / inside).iterdir()) == ["card.json", "config.json", "model.safetensors"]
    capsys.readouterr()

    for model, says in (("models:/lesions-merged/9", "not found"), (f"runs:/{version.run_id}/nothing", "MLmodel"),
                        ("models:/", "names no model")):
        with pytest.raises(SystemExit) as stopped:
            cli.main(["predict", "--model", model, scans[0]])
        *bars, error = capsys.readouterr().err.strip().splitlines()  # a failed download shows MLflow's bar first
        assert stopped.value.code == 1 and error.startswith(f"medmerge predict: {model}: ") and says in error
        assert all(line.startswith("Downloading artifacts") for line in bars)


def test_info_on_a_registered_model_gives_a_timm_hint_that_outlives_the_command(tmp_path: Path) -> None:
    """For an MLflow URI the model dir is downloaded into a folder removed on return: the hint names the
    download of that dir alone."""
    from medmerge.cli import ModelDownload, timm_hint

    fetched = ModelDownload(tmp_path / "scratch" / "model" / "artifacts" / "medmerge_seed_0",
                            "models:/medmerge/3/artifacts/medmerge_seed_0", "artifacts/medmerge_seed_0")
    hint = timm_hint(fetched.directory, fetched)
    assert hint == ("mlflow artifacts download -u models:/medmerge/3/artifacts/medmerge_seed_0 -d DIR, then "
                    "timm.create_model('local-dir:DIR/artifacts/medmerge_seed_0', pretrained=True)")
    assert str(tmp_path) not in hint
