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
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from medmerge.errors import InputError
from medmerge.io import atomic_file

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "http://", "https://")


def _downloaded_model_dir(uri: str, into: Path) -> Path:
    """The model dir inside an MLflow model's artifacts, downloaded into ``into``."""
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
    found = sorted(card.parent for card in local.glob("artifacts/*/card.json"))
    if not found:
        raise FileNotFoundError(f"{uri}: not a MedMerge model (no artifacts/<dir>/card.json in its files)")
    return found[0]


def model_dir(reference: str, scratch: Path) -> Path:
    """A local model dir for ``reference``: the path itself, or the download of an MLflow model URI."""
    return _downloaded_model_dir(reference, scratch) if reference.startswith(MLFLOW_SCHEMES) else Path(reference)


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


def timm_hint(reference: str, directory: Path, scratch: Path) -> str:
    """How to open the model with timm: its folder, or for an MLflow URI (downloaded into ``scratch``, which
    is gone when the command returns) the download that gives one."""
    if reference.startswith(MLFLOW_SCHEMES):
        inside = directory.relative_to(scratch).as_posix()
        return (f"mlflow artifacts download -u {reference} -d DIR, then "
                f"timm.create_model('local-dir:DIR/{inside}', pretrained=True)")
    return f"timm.create_model('local-dir:{directory}', pretrained=True)"


def info_command(args: argparse.Namespace) -> None:
    from medmerge.models import load_model_dir

    with tempfile.TemporaryDirectory(prefix="medmerge-model-") as scratch:
        directory = model_dir(args.model, Path(scratch))
        _, card = load_model_dir(directory)
        has_config = (directory / "config.json").is_file()
        hint = timm_hint(args.model, directory, Path(scratch))
    print("\n".join(describe(card)))
    if has_config:
        print(f"timm          {hint}")


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
        outcome = reproduce(args.jobs, args.targets)
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
