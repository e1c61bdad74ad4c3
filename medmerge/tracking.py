"""MLflow glue for the stages: where the store is, one run per stage, flattened params, tags, artifacts.

The store must outlive ``dvc exp run --temp/--queue``, which runs stages in a temporary copy of the
repository that is deleted afterwards: relative locations are therefore resolved against ``DVC_ROOT`` (the
real repository root, which DVC exports to every stage) and experiments get an absolute artifact location.
On an http(s) tracking server the server's own artifact store is used instead, so that every machine's
runs send their artifacts there. ``MLFLOW_TRACKING_URI`` in the environment overrides ``params.yaml``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medmerge.layout import repo_root

log = logging.getLogger("medmerge.tracking")

DEFAULT_STORE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
#: the experiment tag the MLflow 3 UI reads to open an experiment on its training runs (not on GenAI traces)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
SERVER_SCHEMES = ("http://", "https://")
#: the stage whose run sums up a pipeline run (every method's numbers, the reports); the UI links lead to it
SUMMARY_STAGE = "evaluate"
#: what a UI link asks for: MLflow 3.17's UI opens an experiment on GenAI traces without it
UI_TRAINING_VIEW = "workflowType=machine_learning"
#: the splits a training run reads, as ``mlflow.log_input`` contexts
TRAINING_SPLITS = {"train": "training", "val": "validation"}


def resolve_tracking_uri(configured: str | None = None, root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` > ``mlflow.tracking_uri`` > ``sqlite:///<root>/mlflow.db``.

    A relative SQLite path (``sqlite:///mlflow.db``) or a bare file path is made absolute against ``root``.
    """
    root = root or repo_root()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_STORE
    if "://" not in uri:
        return f"sqlite:///{(root / uri).resolve()}"
    path = sqlite_file(uri)
    if path is not None and not path.is_absolute():
        return f"sqlite:///{(root / path).resolve()}"
    return uri


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI; None for other stores."""
    return Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None


def artifact_location(root: Path | None = None) -> str:
    return (root or repo_root()).joinpath(ARTIFACTS_DIR).resolve().as_uri()


def git_commit(root: Path | None = None) -> str:
    """The commit the run starts from: the experiment's baseline under ``dvc exp run``, else ``HEAD``."""
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if baseline:
        return baseline
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or repo_root(), capture_output=True,
                             text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _store_lock(tracking_uri: str) -> contextlib.AbstractContextManager:
    """An inter-process lock beside a SQLite store: several fresh processes initialising one file race
    (``table experiments already exists``), e.g. under ``dvc queue start -j 2``. Other stores need none."""
    database = sqlite_file(tracking_uri)
    if database is None:
        return contextlib.nullcontext()
    from filelock import FileLock

    database.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(database) + ".lock", timeout=300)


def experiment_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: the server's default store (None) for an http(s)
    tracking server, else ``<repo>/mlartifacts`` as an absolute URI."""
    return None if tracking_uri.startswith(SERVER_SCHEMES) else artifact_location()


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """Initialise the store and create the experiment unless it exists; either way it is marked as a
    model-training experiment (:data:`EXPERIMENT_KIND_TAG`)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    with _store_lock(tracking_uri):
        experiment = mlflow.get_experiment_by_name(name)  # creates the tables of a new SQLite store
        if experiment is None:
            return mlflow.create_experiment(name, artifact_location=experiment_artifact_location(tracking_uri),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag existed
            mlflow.MlflowClient(tracking_uri).set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG,
                                                                 EXPERIMENT_KIND)
        return experiment.experiment_id


def ui_links(tracking_uri: str, experiment: str, host: str = "127.0.0.1",
             port: int = 5000) -> tuple[str, str | None] | None:
    """The MLflow UI's links (a UI at ``host:port`` on ``tracking_uri``) to ``experiment``'s training runs and
    to its latest finished :data:`SUMMARY_STAGE` run (None without one); None while the store holds no such
    experiment. A SQLite store that does not exist is not created."""
    database = sqlite_file(tracking_uri)
    if database is not None and not database.is_file():
        return None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    summary = client.search_runs([found.experiment_id], f"tags.stage = '{SUMMARY_STAGE}' and attributes.status = "
                                 "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    runs = f"http://{host}:{port}/#/experiments/{found.experiment_id}/runs"
    return f"{runs}?{UI_TRAINING_VIEW}", (f"{runs}/{summary[0].info.run_id}?{UI_TRAINING_VIEW}" if summary else None)


def dataset_digest(prepared_dir: Path, split: str) -> str:
    """A digest of one split of a prepared dataset: ``meta.json``'s ``digest`` if it records one, else the
    sha256 of ``meta.json`` and the split's arrays (first 16 hex digits, as MLflow shows digests short)."""
    from medmerge.data.prepare import META_FILE, read_meta
    from medmerge.models import sha256_file

    meta = read_meta(prepared_dir)
    if isinstance(meta.get("digest"), str):
        return meta["digest"]
    files = [META_FILE, f"{split}_images.npy", f"{split}_labels.npy"]
    joined = "".join(sha256_file(Path(prepared_dir) / name) for name in files)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def prepared_dataset(prepared_dir: Path, name: str, split: str) -> Any:
    """An ``mlflow.data`` dataset (metadata only: name, digest, source path, image schema) for one split."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    from medmerge.data.prepare import read_meta

    size = int(read_meta(prepared_dir)["image_size"])
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3), "image")])
    with warnings.catch_warnings():  # MLflow registers its local-path source twice, then warns it is ambiguous
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(prepared_dir))
    return MetaDataset(source, name=f"{name}/{split}", digest=dataset_digest(prepared_dir, split), schema=schema)


def _param_value(value: Any) -> str:
    return "" if value is None else str(value)


class StageRun:
    """Thin wrapper over an active MLflow run with the logging calls the stages need."""

    def __init__(self, mlflow_module: Any, run: Any) -> None:
        self._mlflow = mlflow_module
        self.run = run

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_epoch(self, result: Any) -> None:
        """Per-epoch losses and validation macro F1 as stepped metrics (``result``: a train.EpochResult)."""
        self.log_metrics(
            {"train_loss": result.train_loss, "val_loss": result.val_loss, "val_f1_macro": result.val_f1_macro},
            step=result.epoch,
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifacts(str(directory), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._mlflow.set_tags(dict(tags))

    def log_dataset(self, prepared_dir: Path, name: str, splits: Mapping[str, str]) -> None:
        """``mlflow.log_input`` of a prepared dataset's splits, ``{split: context}`` (e.g. train: training)."""
        for split, context in splits.items():
            self._mlflow.log_input(prepared_dataset(Path(prepared_dir), name, split), context=context)

    @contextlib.contextmanager
    def child(self, run_name: str, tags: Mapping[str, str] | None = None) -> Iterator[StageRun]:
        """A nested run under this one (the MLflow UI shows it below its parent), with the parent's tags."""
        inherited = {k: v for k, v in self.run.data.tags.items() if not k.startswith("mlflow.")}
        with self._mlflow.start_run(experiment_id=self.run.info.experiment_id, run_name=run_name, nested=True,
                                    tags={**inherited, **(tags or {})}) as run:
            yield StageRun(self._mlflow, run)


class NullRun:
    """What ``stage_run`` gives the non-main processes of a multi-process run: every call does nothing,
    so only rank 0 creates an MLflow run and logs to it."""

    run_id = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_epoch(self, result: Any) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_dataset(self, prepared_dir: Path, name: str, splits: Mapping[str, str]) -> None:
        pass

    @contextlib.contextmanager
    def child(self, run_name: str, tags: Mapping[str, str] | None = None) -> Iterator[NullRun]:
        yield self


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: Mapping[str, Any],
    tracking_uri: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[StageRun | NullRun]:
    """One MLflow run for one stage, with flattened params and the stage / experiment / commit tags.

    In a multi-process run only rank 0 logs; the other processes get a ``NullRun``.
    """
    from medmerge import distributed

    if not distributed.is_main():
        yield NullRun()
        return
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(experiment, uri)
    exp_name = os.environ.get("DVC_EXP_NAME") or "workspace"
    all_tags = {"stage": stage, "dvc_exp_name": exp_name, "git_commit": git_commit(), **(tags or {})}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name or f"{stage}@{exp_name}", tags=all_tags) as run:
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        log.info("MLflow run %s (%s) in %s", run.info.run_id, run_name or stage, uri)
        yield StageRun(mlflow, run)
