"""The ``medmerge`` command: predict with a trained model, or say what a model is.

    medmerge predict --model models/merged_ft/medmerge_aligned/seed_0 scans/ --out predictions.csv
    medmerge predict --model models:/medmerge/1 images.csv        # a registered MLflow model
    medmerge info models/merged_ft/medmerge_aligned/seed_0
    medmerge ui-url                                                # the MLflow UI's links to the runs
    medmerge repro --jobs 2                                        # dvc repro, independent stages side by side

A model is a model dir the pipeline wrote, or an MLflow model URI (``models:/<name>/<version>``,
``runs:/<run>/model``) whose artifacts hold one. Images: folders (searched recursively), CSV files with a
``path`` column (relative to the CSV), or image files (PNG, JPEG, BMP, TIFF, DICOM).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from medmerge.errors import InputError
from medmerge.io import atomic_file

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "http://", "https://")
MLMODEL = "MLmodel"
CARD = "card.json"


def _model_root(uri: str) -> str:
    """The URI that the files of the MLflow model ``uri`` (``MLmodel``, ``artifacts/...``) are sub-paths of: the
    URI itself, but a logged model's id (``models:/<model_id>``, which takes no sub-path) resolved to its
    artifact location, as MLflow's ``Model.load`` does."""
    path = urllib.parse.urlparse(uri).path.strip("/")
    if uri.startswith("models:/") and not path:
        raise InputError(f"{uri}: names no model (models:/<name>/<version>, models:/<name>@<alias>, "
                         "models:/<model_id>)")
    if uri.startswith("models:/") and "/" not in path and "@" not in path:
        from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

        return ModelsArtifactRepository.get_underlying_uri(uri).rstrip("/")
    return uri.rstrip("/")


class ModelDownload(NamedTuple):
    """A model dir downloaded from an MLflow model."""

    directory: Path  #: the local model dir
    uri: str  #: the MLflow URI of the model dir alone
    inside: str  #: where ``mlflow artifacts download -u <uri> -d DIR`` puts it, relative to DIR


def fetch_model_dir(uri: str, into: Path) -> ModelDownload:
    """The model dir of the MLflow model ``uri`` (logged by :func:`medmerge.model_registry.log_model_dir`),
    downloaded under ``into``. Only the model's ``MLmodel`` and the dir it names as the pyfunc
    artifact :data:`~medmerge.model_registry.MODEL_ARTIFACT` (weights, card, config) are fetched, not the
    logged code, environment files and input examples beside them."""
    import mlflow.artifacts
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    from medmerge.model_registry import MODEL_ARTIFACT

    try:
        root = _model_root(uri)
        if ModelsArtifactRepository.is_models_uri(root):  # a registered version: looked up once, not per file
            repository = ModelsArtifactRepository(root)

            def fetch(path: str, destination: Path) -> Path:
                destination.mkdir(parents=True, exist_ok=True)
                return Path(repository.download_artifacts(path, dst_path=str(destination)))
        else:
            def fetch(path: str, destination: Path) -> Path:
                return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{path}",
                                                               dst_path=str(destination)))

        flavors = (yaml.safe_load(fetch(MLMODEL, into / "mlmodel").read_text()) or {}).get("flavors") or {}
        artifacts = (flavors.get("python_function") or {}).get("artifacts") or {}
        path = (artifacts.get(MODEL_ARTIFACT) or {}).get("path")
        if not path:
            raise InputError(f"{uri}: not a MedMerge model (its {MLMODEL} names no '{MODEL_ARTIFACT}' artifact)")
        destination = into / "model"
        directory = fetch(path, destination)
    except MlflowException as error:  # unknown model or version, no MLmodel, unreachable server: one line
        raise InputError(f"{uri}: {str(error.message).strip().splitlines()[0]}") from None
    if not (directory / CARD).is_file():
        raise InputError(f"{uri}: not a MedMerge model (no {CARD} in its '{MODEL_ARTIFACT}' artifact {path})")
    return ModelDownload(directory, f"{root}/{path}", Path(os.path.relpath(directory, destination)).as_posix())


def model_dir(reference: str, scratch: Path) -> Path:
    """A local model dir for ``reference``: the path itself, or the download of an MLflow model URI's model dir."""
    return fetch_model_dir(reference, scratch).directory if reference.startswith(MLFLOW_SCHEMES) else Path(reference)


def predict_command(args: argparse.Namespace) -> None:
    from medmerge.predict import input_files, load_classifier, predict_files

    with tempfile.TemporaryDirectory(prefix="medmerge-model-") as scratch:
        classifier = load_classifier(model_dir(args.model, Path(scratch)), args.device)
    files = input_files(args.images, args.path_column)
    table = predict_files(classifier, files, args.batch_size)
    with atomic_file(args.out) as temp:
        table.to_csv(temp)
    print(f"{len(table)} predictions -> {args.out}", file=sys.stderr)


def describe(card: dict) -> list[str]:
    """Lines saying what the model in a card is: architecture, classes, preprocessing, how it was made."""
    lines = [f"architecture  {card['arch']} ({card.get('num_parameters', '?')} parameters)",
             f"classes       {card['num_classes']}: {', '.join(card.get('classes') or []) or 'unnamed'}"]
    preprocessing = card.get("input")
    if preprocessing:
        size = preprocessing["input_size"]
        lines.append(f"input         {size[1]} x {size[2]} RGB, resize {preprocessing['resize']}, "
                     f"mean {preprocessing['mean']}, std {preprocessing['std']}")
    made = {k: card[k] for k in ("stage", "method", "merge_method", "source", "task", "sources", "seed", "epochs",
                                 "align", "bn_recalibrated", "origin") if k in card}
    lines.append("made by       " + ", ".join(f"{k}={v}" for k, v in made.items()))
    lines.append(f"sha256        {card.get('sha256')}")
    return lines


def timm_hint(directory: Path, download: ModelDownload | None = None) -> str:
    """How to open the model with timm: its folder, or for a model dir that was ``download``-ed (into a folder
    that is gone when the command returns) the download of that dir alone that gives one."""
    if download is not None:
        return (f"mlflow artifacts download -u {download.uri} -d DIR, then "
                f"timm.create_model('local-dir:DIR/{download.inside}', pretrained=True)")
    return f"timm.create_model('local-dir:{directory}', pretrained=True)"


def info_command(args: argparse.Namespace) -> None:
    from medmerge.models import load_model_dir

    with tempfile.TemporaryDirectory(prefix="medmerge-model-") as scratch:
        download = fetch_model_dir(args.model, Path(scratch)) if args.model.startswith(MLFLOW_SCHEMES) else None
        directory = download.directory if download else Path(args.model)
        _, card = load_model_dir(directory)
        has_config = (directory / "config.json").is_file()
    print("\n".join(describe(card)))
    if has_config:
        print(f"timm          {timm_hint(directory, download)}")


def ui_url_command(args: argparse.Namespace) -> None:
    from medmerge.config import PARAMS_FILE, MlflowSettings, load_params
    from medmerge.tracking import resolve_tracking_uri, ui_links

    settings = load_params().mlflow if Path(PARAMS_FILE).is_file() else MlflowSettings()
    store = args.store or resolve_tracking_uri(settings.tracking_uri)
    links = ui_links(store, settings.experiment, args.host, args.port)
    if links is None:
        raise InputError(f"{store}: no MLflow experiment '{settings.experiment}' yet; run `dvc repro` first")
    runs, summary = links
    print(f"training runs:        {runs}")
    print(f"latest evaluate run:  {summary or 'none finished yet'}")


def repro_command(args: argparse.Namespace) -> None:
    from medmerge.parallel_repro import ReproError, reproduce

    try:
        outcome = reproduce(args.jobs, args.targets, isolated=args.isolated)
    except ReproError as error:
        raise InputError(str(error)) from None
    print(f"{len(outcome.ran)} stages ran, {len(outcome.skipped)} unchanged; dvc.lock is up to date")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="medmerge", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="class probabilities of images, as a CSV")
    predict.add_argument("--model", required=True, help="a model dir or an MLflow model URI (models:/name/version)")
    predict.add_argument("images", nargs="+", help="image folders, CSV files with a path column, or image files")
    predict.add_argument("--out", type=Path, default=Path("predictions.csv"), help="the CSV to write")
    predict.add_argument("--path-column", default="path", help="the column of image paths in CSV inputs")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    predict.set_defaults(run=predict_command)
    info = commands.add_parser("info", help="what a model is: architecture, classes, preprocessing, origin")
    info.add_argument("model", help="a model dir or an MLflow model URI")
    info.set_defaults(run=info_command)
    ui_url = commands.add_parser("ui-url", help="the MLflow UI's links to the training runs and the evaluate run")
    ui_url.add_argument("--store", help="the tracking URI (default: the pipeline's, sqlite:///<repo>/mlflow.db)")
    ui_url.add_argument("--host", default="127.0.0.1", help="where the MLflow UI listens")
    ui_url.add_argument("--port", type=int, default=5000)
    ui_url.set_defaults(run=ui_url_command)
    repro = commands.add_parser("repro", help="dvc repro with independent stages run side by side (same outputs)")
    repro.add_argument("targets", nargs="*", help="stages to bring up to date with their upstream (default: all)")
    repro.add_argument("-j", "--jobs", type=int, default=None,
                       help="stage commands at a time (default: one per core; give each stage "
                            "device.cpu_threads threads' worth of cores)")
    repro.add_argument("--isolated", action="store_true",
                       help="start every stage in its own interpreter, as dvc repro does (by default a `python -m` "
                            "stage is forked from one interpreter that imported torch, timm and MLflow once)")
    repro.set_defaults(run=repro_command)
    return main


def user_errors() -> tuple[type[BaseException], ...]:
    """Bad input (as in the stages), and MLflow's errors (an unknown model name or version) once MLflow is
    loaded."""
    mlflow = sys.modules.get("mlflow.exceptions")
    return (InputError, FileNotFoundError, *((mlflow.MlflowException,) if mlflow else ()))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``medmerge`` script; bad input exits 1 with one line, not a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except user_errors() as error:
        print(f"medmerge {args.command}: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
