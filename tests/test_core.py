"""Metrics, batches, device paths, the fit loop, BN recalibration and the MLflow store location."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medmerge.data.loader import ArrayBatches, DeviceTransform
from medmerge.device import resolve_runtime
from medmerge.metrics import (
    CONFUSION_METRICS,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    reported_metrics,
    scalar_metrics,
)
from medmerge.tracking import resolve_tracking_uri
from medmerge.train import build_optimizer, fit, predict, recalibrate_batchnorm


def test_metrics_on_known_labels() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 1, 1, 1, 2, 0])
    probabilities = np.eye(3)[predictions] * 0.7 + 0.1
    metrics = classification_metrics(labels, probabilities, ["a", "b", "c"])
    # by hand: class a P=1/2 R=1/2 F1=1/2; b P=2/3 R=1 F1=4/5; c P=1 R=1/2 F1=2/3
    assert metrics["f1_per_class"] == pytest.approx({"a": 0.5, "b": 0.8, "c": 2 / 3})
    assert metrics["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert 0.5 < metrics["auroc_macro"] <= 1.0


def test_macro_f1_counts_absent_classes_and_auroc_needs_two_classes() -> None:
    assert macro_f1(np.array([0, 0]), np.array([0, 0]), num_classes=2) == pytest.approx(0.5)
    one_class = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.4, 0.6]]), ["x", "y"])
    assert math.isnan(one_class["auroc_macro"])


def quadratic_kappa(labels: np.ndarray, predictions: np.ndarray, num_classes: int = 3) -> float:
    return float(CONFUSION_METRICS["kappa_quadratic"](confusion_matrix(labels, predictions, num_classes)))


def test_quadratic_kappa_on_a_hand_computed_example() -> None:
    labels, predictions = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1])
    # by hand: observed O = [[1,0,0],[0,0,1],[0,1,1]]; expected E = outer([1,1,2], [1,1,2]) / 4;
    # weights (i-j)^2: sum(w*O) = 2, sum(w*E) = (9 + 3 + 10) / 4 = 5.5; kappa = 1 - 2 / 5.5 = 7/11
    assert quadratic_kappa(labels, predictions) == pytest.approx(7 / 11)
    assert quadratic_kappa(labels, labels) == pytest.approx(1.0)
    one_off, two_off = np.array([0, 1, 2, 1]), np.array([0, 1, 2, 0])  # same accuracy, a miss by one vs two grades
    assert quadratic_kappa(labels, one_off) > quadratic_kappa(labels, two_off)
    assert quadratic_kappa(np.array([0, 0, 2, 2]), np.array([2, 2, 0, 0])) == pytest.approx(-1.0)  # all reversed


def test_ordinal_tasks_also_report_quadratic_kappa() -> None:
    assert reported_metrics() == ("f1_macro", "accuracy", "balanced_accuracy", "auroc_macro")
    assert reported_metrics(ordinal=True) == (*reported_metrics(), "kappa_quadratic")
    labels = np.array([0, 1, 2, 2])
    probabilities = np.eye(3)[[0, 2, 2, 1]] * 0.7 + 0.1
    metrics = scalar_metrics(labels, probabilities, reported_metrics(ordinal=True))
    assert list(metrics) == list(reported_metrics(ordinal=True))
    assert metrics["kappa_quadratic"] == pytest.approx(7 / 11)
    plain = classification_metrics(labels, probabilities, ["g0", "g1", "g2"])
    assert all(metrics[name] == pytest.approx(plain[name]) for name in reported_metrics())


def test_batches_cover_every_sample_once_and_reshuffle() -> None:
    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    labels = np.arange(10)
    batches = ArrayBatches(images, labels, batch_size=4, shuffle=True, seed=1)
    first = torch.cat([y for _, y in batches]).tolist()
    second = torch.cat([y for _, y in batches]).tolist()
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    assert len(ArrayBatches(images, labels, 4, drop_last=True)) == 2
    assert [len(y) for _, y in ArrayBatches(images, labels, 4, drop_last=True)] == [4, 4]
    x, y = next(iter(ArrayBatches(images, labels, 3)))
    assert x.dtype == torch.uint8 and torch.equal(x[1], torch.from_numpy(images[1])) and y.tolist() == [0, 1, 2]


def test_device_transform_normalises_and_flips() -> None:
    runtime = resolve_runtime("cpu", "none", "on")
    transform = DeviceTransform([0.5] * 3, [0.5] * 3, runtime)
    images = torch.zeros(8, 4, 4, 3, dtype=torch.uint8)
    images[:, :, 0, :] = 255  # left column white
    x = transform(images)
    assert x.shape == (8, 3, 4, 4) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.all(x[:, :, :, 0] == 1.0) and torch.all(x[:, :, :, 1] == -1.0)
    flipped = transform(images, augment=True)
    assert sorted(torch.unique(flipped).tolist()) == [-1.0, 1.0]
    assert not torch.equal(flipped, x) or not torch.equal(transform(images, augment=True), x)


def test_runtime_resolution_on_cpu() -> None:
    runtime = resolve_runtime("auto", "auto", "auto")
    if not torch.cuda.is_available():
        assert runtime.device.type == "cpu" and runtime.amp_dtype is None and not runtime.channels_last
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_runtime("cuda")
    assert resolve_runtime("cpu", "bf16").amp_dtype == torch.bfloat16
    assert not resolve_runtime("cpu", "fp16").grad_scaler().is_enabled()


def toy_data(n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes told apart by brightness."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 100, size=(n, 8, 8, 3)).astype(np.uint8) + (labels * 120)[:, None, None, None].astype(np.uint8)
    return images, labels


def toy_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


@pytest.mark.parametrize("precision,channels_last", [("none", "off"), ("bf16", "on")])
def test_fit_learns_and_reports_each_epoch(precision: str, channels_last: str) -> None:
    torch.manual_seed(0)
    runtime = resolve_runtime("cpu", precision, channels_last)
    model = runtime.prepare(toy_model())
    images, labels = toy_data()
    transform = DeviceTransform([0.5] * 3, [0.5] * 3, runtime)
    seen = []
    history = fit(model, build_optimizer("adamw", [{"params": list(model.parameters()), "lr": 0.05}], 0.0),
                  ArrayBatches(images, labels, 16, shuffle=True), ArrayBatches(images, labels, 64), transform,
                  epochs=6, num_classes=2, on_epoch=seen.append)
    assert [e.epoch for e in seen] == list(range(1, 7))
    assert history.best_val_f1 > 0.9
    assert history.epochs[-1].train_loss < history.epochs[0].train_loss
    probabilities, _ = predict(model, ArrayBatches(images, labels, 64), transform)
    assert probabilities.shape == (48, 2) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-3)


def test_keep_best_restores_the_best_epoch() -> None:
    torch.manual_seed(0)
    runtime = resolve_runtime("cpu", "none", "off")
    model = toy_model()
    images, labels = toy_data()
    transform = DeviceTransform([0.5] * 3, [0.5] * 3, runtime)
    states = {}
    history = fit(model, build_optimizer("sgd", [{"params": list(model.parameters()), "lr": 0.5}], 0.0),
                  ArrayBatches(images, labels, 8, shuffle=True), ArrayBatches(images, labels, 64), transform,
                  epochs=4, num_classes=2,
                  on_epoch=lambda e: states.setdefault(e.epoch, {k: v.clone() for k, v in model.state_dict().items()}))
    best = max(history.epochs, key=lambda e: e.val_f1_macro).epoch
    assert history.best_epoch == best
    for key, value in model.state_dict().items():
        assert torch.equal(value, states[best][key]), key


def test_batchnorm_recalibration_matches_the_data_statistics() -> None:
    runtime = resolve_runtime("cpu", "none", "off")
    model = nn.Sequential(nn.Identity(), nn.BatchNorm2d(3))
    images, labels = toy_data(32)
    transform = DeviceTransform([0.0] * 3, [1.0] * 3, runtime)
    assert recalibrate_batchnorm(model, ArrayBatches(images, labels, 8), transform) == 1
    pixels = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255.0  # the transform maps 0..255 to 0..1
    torch.testing.assert_close(model[1].running_mean, pixels.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model[1].momentum == 0.1 and not model.training


def test_tracking_uri_is_absolute_under_the_repository_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///runs/store.db") == f"sqlite:///{tmp_path.resolve()}/runs/store.db"
    assert resolve_tracking_uri("sqlite:////abs/store.db") == "sqlite:////abs/store.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert resolve_tracking_uri(None) == "sqlite:////elsewhere.db"


def test_inverse_frequency_weights() -> None:
    from medmerge.data.target import inverse_frequency_weights

    weights = inverse_frequency_weights(np.array([0, 0, 0, 1]), 3)
    torch.testing.assert_close(weights, torch.tensor([4 / 9, 4 / 3, 0.0]))
    torch.testing.assert_close(inverse_frequency_weights(np.array([0, 1, 2]), 3), torch.ones(3))


def test_zero_epochs_keeps_the_merged_model_unchanged() -> None:
    """merge.finetune_epochs: 0 skips the fine-tune: the collapsed model passes through as it is."""
    import timm

    from medmerge.config import TrainSettings
    from medmerge.data.target import TargetData
    from medmerge.train import train_classifier

    images, labels = toy_data(8)
    images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)  # 32 px
    data = TargetData(*(ArrayBatches(images, labels, 4) for _ in range(3)), classes=["dark", "bright"])
    torch.manual_seed(3)
    state = timm.create_model("test_resnet", num_classes=2).state_dict()
    settings = TrainSettings(epochs=5, lr=0.1, batch_size=32)
    model, history = train_classifier("test_resnet", state, data, settings, resolve_runtime("cpu"), epochs=0,
                                      keep_head=True)
    assert history.epochs == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_background_workers_yield_the_same_batches_in_order() -> None:
    images = np.arange(37 * 2 * 2 * 3, dtype=np.uint8).reshape(37, 2, 2, 3)
    labels = np.arange(37)
    plain = ArrayBatches(images, labels, batch_size=5, shuffle=True, seed=4)
    threaded = ArrayBatches(images, labels, batch_size=5, shuffle=True, seed=4, workers=2)
    for _ in range(2):  # two epochs: the reshuffle is the same too
        expected = [(x.clone(), y.clone()) for x, y in plain]
        actual = list(threaded)
        assert len(actual) == len(expected) == 8
        for (x, y), (ex, ey) in zip(actual, expected, strict=True):
            assert torch.equal(x, ex) and torch.equal(y, ey)


def test_compiled_training_step_runs_on_cpu() -> None:
    """device.compile: the fit loop trains through torch.compile (inductor on CPU) and still learns."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    runtime = resolve_runtime("cpu", "none", "off", compile=True)
    model = toy_model()
    images, labels = toy_data(32)
    history = fit(model, build_optimizer("adamw", [{"params": list(model.parameters()), "lr": 0.05}], 0.0),
                  ArrayBatches(images, labels, 16, shuffle=True), ArrayBatches(images, labels, 32),
                  DeviceTransform([0.5] * 3, [0.5] * 3, runtime), epochs=3, num_classes=2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert history.best_val_f1 > 0.9


def test_data_stages_run_without_torch(tmp_path: Path) -> None:
    """``fetch_data`` and ``prepare`` run (params validated, weight origins checked, synthetic data written
    and prepared) without importing torch, timm or MLflow: each of those costs seconds per process."""
    import subprocess
    import sys

    import yaml

    from medmerge.testing import REPO, copy_repo, stage_env

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["datasets"]["lesions"]["options"].update(n_train=8, n_val=4, n_test=4, image_size=16)
    root = copy_repo(tmp_path, params)
    # a stage run as a script ends with os._exit after its atexit handlers: the check is one of them
    code = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print(sorted(m for m in ('torch', 'timm', 'mlflow') if m in sys.modules)))\n"
        "sys.argv = [sys.argv[1], 'lesions']\n"
        "runpy.run_module(f'stages.{sys.argv[0]}', run_name='__main__')\n"
    )
    for stage in ("fetch_data", "prepare"):
        out = subprocess.run([sys.executable, "-c", code, stage], cwd=root, env=stage_env(), capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == "[]", (stage, out.stderr)
    assert (root / "data" / "processed" / "lesions").is_dir()


def test_a_failed_fetch_data_stops_with_one_line_and_leaves_no_directory(tmp_path: Path) -> None:
    """A truncated ``.npz`` (``origin: npz``) stops ``fetch_data`` with one line naming the file; neither
    ``data/raw/<dataset>/`` nor ``data/raw`` is left behind."""
    import subprocess
    import sys

    import yaml

    from medmerge.data.synthetic import generate_synthetic
    from medmerge.testing import REPO, copy_repo, stage_env

    arrays = tmp_path / "arrays.npz"
    np.savez(arrays, **generate_synthetic("lesions", 8, 4, 4, 16, 0))
    arrays.write_bytes(arrays.read_bytes()[:-200])  # cut short: the zip directory at its end is gone
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["datasets"]["lesions"].update(origin="npz", options={"path": str(arrays)})
    (tmp_path / "repo").mkdir()
    root = copy_repo(tmp_path / "repo", params)
    out = subprocess.run([sys.executable, "-m", "stages.fetch_data", "lesions"], cwd=root, env=stage_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert f"ERROR medmerge.stage: {arrays}: not a readable .npz file" in line, out.stderr
    assert not (root / "data" / "raw").exists()


def test_every_input_error_stops_a_stage_with_its_message(caplog: pytest.LogCaptureFixture) -> None:
    """Each library's bad-input error derives from ``InputError``: ``run`` exits 1 with its message."""
    from medmerge.config import ConfigError
    from medmerge.data.npz import DataError
    from medmerge.merge.alignment import AlignmentError
    from medmerge.merge.coefficients import GranularityError
    from medmerge.merge.functional import SourceMismatchError
    from medmerge.models.checkpoint import CheckpointError
    from medmerge.models.factory import StateDictMismatchError
    from medmerge.models.origins import OriginError, WeightsUnavailableError
    from medmerge.registry import UnknownNameError
    from medmerge.stage import run

    for error in (ConfigError, DataError, AlignmentError, GranularityError, SourceMismatchError, CheckpointError,
                  StateDictMismatchError, OriginError, WeightsUnavailableError, UnknownNameError,
                  FileNotFoundError):
        def failing(error: type[Exception] = error) -> None:
            raise error(f"bad {error.__name__}")

        with pytest.raises(SystemExit) as stopped:
            run(failing)
        assert stopped.value.code == 1 and caplog.records[-1].getMessage() == f"bad {error.__name__}"


@pytest.mark.parametrize("epochs", [9, 10, 11])
def test_fit_runs_with_a_one_step_warm_up(epochs: int) -> None:
    """One batch per epoch for 10 epochs puts OneCycleLR's warm-up at exactly one step (a tiny training
    split, e.g. train_fraction 0.25 of the demo's target); training must still run every epoch."""
    torch.manual_seed(0)
    runtime = resolve_runtime("cpu", "none", "off")
    model = toy_model()
    images, labels = toy_data()
    transform = DeviceTransform([0.5] * 3, [0.5] * 3, runtime)
    history = fit(model, build_optimizer("adamw", [{"params": list(model.parameters()), "lr": 0.05}], 0.0),
                  ArrayBatches(images, labels, 48, shuffle=True), ArrayBatches(images, labels, 64), transform,
                  epochs=epochs, num_classes=2)
    assert len(history.epochs) == epochs and all(math.isfinite(e.train_loss) for e in history.epochs)


def test_rebatching_the_training_split_starts_it_afresh() -> None:
    """``TargetData.with_train_batch_size`` after a used loader gives the batches a newly opened split would:
    the merge stage opens the target once for its three steps."""
    from medmerge.data.target import TargetData

    images, labels = toy_data()
    opened = lambda batch: ArrayBatches(images, labels, batch, shuffle=True, seed=3, drop_last=True)  # noqa: E731
    data = TargetData(opened(16), ArrayBatches(images, labels, 64), ArrayBatches(images, labels, 64), ["a", "b"])
    list(data.train)  # one epoch drawn: a reused loader would continue with epoch 2's order
    again = data.with_train_batch_size(24)
    assert again.val is data.val and again.train.batch_size == 24 and again.train.drop_last
    assert [b[1].tolist() for b in again.train] == [b[1].tolist() for b in opened(24)]
    assert not data.with_train_batch_size(len(labels)).train.drop_last  # one batch holds the whole split


def test_a_stage_script_exits_after_its_threads_and_exit_handlers(tmp_path: Path) -> None:
    """After ``run(main)`` of a script (which spares the interpreter's teardown its garbage-collector walk),
    what a normal exit guarantees still happens: other threads finish, idle thread-pool workers are stopped
    (not waited for forever: MLflow's HTTP artifact repository keeps a pool, and a stage that had downloaded
    through it hung), ``atexit`` handlers run and buffered output reaches stdout; the exit code is 0."""
    import subprocess
    import sys

    from medmerge.testing import REPO

    script = tmp_path / "stage_like.py"
    script.write_text(
        "import atexit, sys, threading, time\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from pathlib import Path\n"
        "from medmerge.stage import run\n"
        "POOL = ThreadPoolExecutor(2)  # alive until exit, its workers idle\n"
        "def late_write():\n"
        "    time.sleep(0.3)\n"
        "    Path(sys.argv[1]).write_text('written')\n"
        "def main():\n"
        "    POOL.submit(time.sleep, 0.01).result()\n"
        "    threading.Thread(target=late_write).start()\n"
        "    atexit.register(lambda: print('exit handler ran'))\n"
        "    sys.stdout.write('buffered, no newline')\n"
        "if __name__ == '__main__':\n"
        "    run(main)\n"
    )
    marker = tmp_path / "marker.txt"
    out = subprocess.run([sys.executable, str(script), str(marker)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert marker.read_text() == "written"
    assert out.stdout == "buffered, no newlineexit handler ran\n"
