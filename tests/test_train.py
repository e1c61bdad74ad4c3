"""The fit loop, BatchNorm recalibration and train_classifier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medmerge.data.loader import ArrayBatches, DeviceTransform
from medmerge.device import resolve_runtime
from medmerge.train import build_optimizer, fit, predict, recalibrate_batchnorm


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
