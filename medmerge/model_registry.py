"""MLflow Models and the Model Registry: a model dir logged as a pyfunc model without pickles, and registered.

The logged model is code (:mod:`medmerge.pyfunc_model`, MLflow's models from code) plus the exported
model dir as its artifact, the ``medmerge`` package as its code path and pinned pip requirements, so
``mlflow.pyfunc.load_model("models:/<name>/<version>")`` works in any environment with those packages.
Used by the evaluate stage (inside its MLflow run); MLflow is imported only when a function runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["MODEL_ARTIFACT", "best_model", "log_model_dir", "model_signature", "register_best_model"]

#: the key of the model dir in the pyfunc model's artifacts
MODEL_ARTIFACT = "model_dir"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parent
#: the distributions the pyfunc model imports; pinned to the versions installed where it is logged
RUNTIME_PACKAGES = ("torch", "torchvision", "timm", "safetensors", "numpy", "pandas", "pillow", "scikit-learn",
                    "pydantic", "pyyaml", "tqdm", "pydicom")
#: tags of the active run copied onto the registered version
RUN_TAGS = ("dvc_exp_name", "git_commit")


def model_signature(classes: Sequence[str]) -> Any:
    """uint8 images (N, H, W, 3) in; the predicted class and one probability per class out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    from medmerge.predict import PREDICTED_COLUMN, PROBABILITY_PREFIX

    outputs = [ColSpec("string", PREDICTED_COLUMN), *(ColSpec("double", f"{PROBABILITY_PREFIX}{c}") for c in classes)]
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]), outputs=Schema(outputs))


def pip_requirements() -> list[str]:
    """``name==version`` of every installed package of :data:`RUNTIME_PACKAGES`."""
    pins = []
    for name in RUNTIME_PACKAGES:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return pins


def log_model_dir(model_dir: str | os.PathLike[str], input_example: np.ndarray, *, name: str = "model",
                  registered_name: str | None = None, tags: Mapping[str, str] | None = None) -> Any:
    """Log ``model_dir`` in the active run as a pyfunc model (``mlflow.models.model.ModelInfo``), with a
    signature and ``input_example`` (uint8 images); registered as a new version of ``registered_name`` if given."""
    import mlflow.pyfunc

    card = json.loads((Path(model_dir) / "card.json").read_text())
    classes = card.get("classes") or [f"class_{i}" for i in range(card["num_classes"])]
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(MODEL_CODE), artifacts={MODEL_ARTIFACT: str(model_dir)},
        code_paths=[str(PACKAGE_DIR)], signature=model_signature(classes), input_example=np.asarray(input_example),
        pip_requirements=pip_requirements(), registered_model_name=registered_name, tags=dict(tags or {}),
    )


def best_model(per_seed: pd.DataFrame, methods: Sequence[str], metric: str = "f1_macro") -> tuple[str, int]:
    """Of ``methods`` (rows of ``per_seed``: method, seed, metrics), the one with the best mean ``metric``
    over seeds, and its seed with the best ``metric`` (the lowest seed on a tie)."""
    rows = per_seed[per_seed["method"].isin(list(methods))]
    if rows.empty:
        raise ValueError(f"no per-seed results for any of {list(methods)}")
    method = str(rows.groupby("method")[metric].mean().idxmax())
    ranked = rows[rows["method"] == method].sort_values([metric, "seed"], ascending=[False, True])
    return method, int(ranked.iloc[0]["seed"])


def register_best_model(model_dir: str | os.PathLike[str], *, method: str, seed: int, metrics: Mapping[str, float],
                        registered_name: str, input_example: np.ndarray) -> Any:
    """Log ``model_dir`` (the chosen method's model of ``seed``) in the active run and register it as a new
    version of ``registered_name``, tagged with ``method``, ``seed``, the run's DVC experiment and commit, and
    ``metrics`` (its test metrics, e.g. the means over seeds). Returns the ``ModelVersion``."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_best_model needs an active MLflow run (the evaluate run)")
    tags = {"method": method, "seed": str(seed), **{k: run.data.tags[k] for k in RUN_TAGS if k in run.data.tags}}
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}  # e.g. no verdict strings
    info = log_model_dir(model_dir, input_example, registered_name=registered_name, tags=tags)
    client = mlflow.MlflowClient()
    number = str(info.registered_model_version)
    for key, value in {**tags, **{f"test.{k}": f"{v:.6g}" for k, v in metrics.items()}}.items():
        client.set_model_version_tag(registered_name, number, key, value)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    return client.update_model_version(registered_name, number,
                                       description=f"{method}, seed {seed} ({Path(model_dir)}): test {summary}")
