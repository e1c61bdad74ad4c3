"""End to end over HTTP: the tiny pipeline against a real `mlflow server`, the best merged model registered
there, loaded back by name and predicting as the pipeline does; `medmerge predict` on PNG files agrees."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_pipeline import tiny_params

from medmerge.testing import copy_repo, init_and_repro, run, stage_env, tail

pytestmark = pytest.mark.integration
MODEL_NAME = "lesions-merged"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """``mlflow server`` on 127.0.0.1: SQLite backend, artifacts served from a local folder."""
    base = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
               "--serve-artifacts", "--artifacts-destination", str(base / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(base / "server.log", "w")  # noqa: SIM115 (closed below)
    # The server's background job scheduler (huey, polling the same SQLite file every minute) serves no
    # tracking request: off, so that nothing but the stages' requests touches the database.
    env = {**stage_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("mlflow server did not start:\n" + (base / "server.log").read_text()) from None
            time.sleep(1)
    yield uri, base / "artifacts", base / "server.log"
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def repo(server, tmp_path_factory: pytest.TempPathFactory):
    uri, _, server_log = server
    params = tiny_params()
    params.update(seeds=[0], baselines=["ft"], methods={"medmerge": {"method": "medmerge"}})
    params["mlflow"]["registered_model"] = MODEL_NAME
    root = copy_repo(tmp_path_factory.mktemp("pipeline-http"), params)
    # A request the server does not answer fails the stage within minutes, naming it, instead of retrying
    # with back-off (MLflow's defaults: 7 retries, 120 s each) until the test's timeout.
    env = {**stage_env(), "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    try:
        init_and_repro(root, env, "tiny pipeline against an MLflow server")
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- mlflow server log, last:\n{tail(server_log.read_text())}") from None
    return root, env


def pipeline_probabilities(model_dir: Path, images: np.ndarray) -> np.ndarray:
    """What the evaluate stage computes for ``model_dir`` on ``images`` (train.predict on the prepared arrays)."""
    from medmerge.data.loader import ArrayBatches
    from medmerge.device import resolve_runtime
    from medmerge.models import create_model, load_model_dir
    from medmerge.train import make_transform, predict

    state, card = load_model_dir(model_dir)
    model = create_model(card["arch"], num_classes=card["num_classes"])
    model.load_state_dict(state, strict=True)
    runtime = resolve_runtime("cpu")
    batches = ArrayBatches(images, np.zeros(len(images), dtype=np.int64), batch_size=64)
    return predict(runtime.prepare(model), batches, make_transform(card["arch"], runtime))[0]


def test_runs_experiment_and_artifacts_live_on_the_server(server, repo) -> None:
    from mlflow.tracking import MlflowClient

    uri, artifacts, _ = server
    root, _ = repo
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("medmerge")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's store, not a local path
    assert not (root / "mlartifacts").exists() and any(artifacts.rglob("model.safetensors"))
    runs = {r.data.tags["stage"]: r for r in client.search_runs([experiment.experiment_id], max_results=100)}
    assert {"pretrain", "ft", "learn_weights", "finetune_merged", "evaluate"} <= set(runs)
    inputs = {(d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context"))
              for d in runs["ft"].inputs.dataset_inputs}
    assert inputs == {("lesions/train", "training"), ("lesions/val", "validation")}
    tested = runs["evaluate"].inputs.dataset_inputs[0].dataset
    assert tested.name == "lesions/test" and len(tested.digest) == 16


def test_registered_model_loads_over_http_and_predicts_as_the_pipeline(server, repo) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri, _, _ = server
    root, _ = repo
    version = MlflowClient(uri).get_model_version(MODEL_NAME, "1")
    assert version.tags["method"] == "medmerge" and version.tags["seed"] == "0"
    assert version.tags["dvc_exp_name"] == "workspace" and len(version.tags["git_commit"]) == 40
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1")
    images = np.load(root / "data/processed/lesions/test_images.npy")
    table = model.predict(images)
    expected = pipeline_probabilities(root / "models/merged_ft/medmerge/seed_0", images)
    np.testing.assert_allclose(table.filter(like="prob_").to_numpy(), expected, rtol=0, atol=1e-6)


def test_medmerge_predict_on_png_files_equals_the_pipeline(server, repo, tmp_path: Path) -> None:
    from PIL import Image

    root, env = repo
    images = np.load(root / "data/processed/lesions/test_images.npy")
    folder = tmp_path / "test_pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    expected = pipeline_probabilities(root / "models/merged_ft/medmerge/seed_0", images)
    classes = json.loads((root / "models/merged_ft/medmerge/seed_0/card.json").read_text())["classes"]
    for model in ("models/merged_ft/medmerge/seed_0", f"models:/{MODEL_NAME}/1"):
        out = tmp_path / "predictions.csv"
        run([sys.executable, "-m", "medmerge.cli", "predict", "--model", model, str(folder), "--out", str(out)],
            root, env)
        table = pd.read_csv(out)
        assert [Path(p).name for p in table["path"]] == [f"{i:04d}.png" for i in range(len(images))]
        np.testing.assert_allclose(table.filter(like="prob_").to_numpy(), expected, rtol=0, atol=1e-6)
        assert list(table["predicted"]) == [classes[i] for i in expected.argmax(axis=1)]
