"""The MLflow store: its location under the repository root, and concurrent first writers (dvc queue start -j N)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from medmerge.tracking import resolve_tracking_uri

SCRIPT = "import sys; from medmerge.tracking import ensure_experiment; print(ensure_experiment('medmerge', sys.argv[1]))"


def test_concurrent_processes_initialise_one_fresh_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    processes = [
        subprocess.Popen([sys.executable, "-c", SCRIPT, uri], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err[-2000:]
    ids = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(ids) == 1, ids


def test_child_runs_nest_under_the_stage_run_in_its_experiment(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri of an earlier test exports it

    from medmerge.tracking import stage_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with stage_run("evaluate", "medmerge", {"merge.lr": 0.1}, uri, run_name="evaluate") as parent:
        with parent.child("medmerge", tags={"stage": "evaluate_method", "method": "medmerge"}) as child:
            child.log_metrics({"f1_macro": 0.5}, step=2)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("medmerge")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"evaluate", "medmerge"}  # the child is in the stage's experiment, not in Default
    nested = runs["medmerge"].data.tags
    assert nested["mlflow.parentRunId"] == parent.run_id and nested["stage"] == "evaluate_method"
    assert nested["dvc_exp_name"] == runs["evaluate"].data.tags["dvc_exp_name"]  # the parent's tags carry over
    assert [m.step for m in client.get_metric_history(runs["medmerge"].info.run_id, "f1_macro")] == [2]


def test_tracking_uri_is_absolute_under_the_repository_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///runs/store.db") == f"sqlite:///{tmp_path.resolve()}/runs/store.db"
    assert resolve_tracking_uri("sqlite:////abs/store.db") == "sqlite:////abs/store.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert resolve_tracking_uri(None) == "sqlite:////elsewhere.db"


def test_ui_links_lead_to_the_experiments_runs_and_its_latest_finished_evaluate_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    from medmerge.cli import main
    from medmerge.tracking import SUMMARY_STAGE, ensure_experiment, stage_run, ui_links

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # artifacts under tmp_path, not in the repository
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_experiment("other", uri)  # so that the experiment's id is not the first one
    runs = []
    for stage in (SUMMARY_STAGE, SUMMARY_STAGE, "learn_weights"):
        time.sleep(0.01)  # distinct start times: the latest is well defined
        with stage_run(stage, "medmerge", {}, uri, run_name=stage) as run:
            with run.child("average", tags={"stage": "evaluate_method"}):
                pass
        runs.append(run.run_id)
    time.sleep(0.01)
    with pytest.raises(RuntimeError), stage_run(SUMMARY_STAGE, "medmerge", {}, uri, run_name=SUMMARY_STAGE):
        raise RuntimeError("a failed evaluate run is no summary")
    experiment_id = MlflowClient(uri).get_experiment_by_name("medmerge").experiment_id
    page = f"http://localhost:5123/#/experiments/{experiment_id}/runs"
    expected = (f"{page}?workflowType=machine_learning", f"{page}/{runs[1]}?workflowType=machine_learning")
    assert ui_links(uri, "medmerge", "localhost", 5123) == expected
    main(["ui-url", "--store", uri, "--host", "localhost", "--port", "5123"])
    assert capsys.readouterr().out.split() == ["training", "runs:", expected[0], "latest", "evaluate", "run:",
                                               expected[1]]


def test_ui_links_of_a_store_without_the_experiment_say_run_the_pipeline_first_and_create_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from medmerge.cli import main
    from medmerge.tracking import ensure_experiment, ui_links

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)  # no params.yaml: the default experiment and store, <cwd>/mlflow.db
    store = tmp_path / "mlflow.db"
    with pytest.raises(SystemExit) as stopped:
        main(["ui-url"])
    message = f"medmerge ui-url: sqlite:///{store}: no MLflow experiment 'medmerge' yet; run `dvc repro` first\n"
    assert stopped.value.code == 1 and capsys.readouterr().err == message and list(tmp_path.iterdir()) == []
    ensure_experiment("other", f"sqlite:///{store}")  # a store, without the pipeline's experiment
    assert ui_links(f"sqlite:///{store}", "medmerge") is None
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["ui-url", "--store", f"sqlite:///{store}"])
    assert capsys.readouterr().err == message
