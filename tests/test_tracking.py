"""The MLflow store: its location under the repository root, and concurrent first writers (dvc queue start -j N)."""

from __future__ import annotations

import subprocess
import sys
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
