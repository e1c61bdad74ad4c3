"""REPAIR: after collapsing, each merged layer's output statistics are the sources' interpolated ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmerge.data.loader import ArrayBatches
from medmerge.data.target import TargetData
from medmerge.device import Runtime
from medmerge.merge.collapse import collapse
from medmerge.merge.repair import activation_statistics, interpolated_statistics, repairable_layers
from medmerge.methods.fixed import build_fixed_merge
from medmerge.models import create_model
from medmerge.train import make_transform

ARCH = "test_convnext"  # timm's LayerNorm ConvNeXt test model: 0.3M parameters
CPU = Runtime(torch.device("cpu"))


def calibration(batch_size: int) -> TargetData:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(32) % 3
    batches = ArrayBatches(images, labels, batch_size=batch_size)
    return TargetData(train=batches, val=batches, test=batches, classes=["a", "b", "c"])


def sources() -> list[dict[str, torch.Tensor]]:
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(create_model(ARCH, num_classes=3).state_dict())
    return states


def merged_and_targets(weights: list[float], batch_size: int, repair: bool):
    states, names = sources(), ["a", "b"]
    merge = build_fixed_merge(ARCH, states, names, 3, weights)
    data = calibration(batch_size)
    model = collapse(merge, ARCH, 3, None, CPU, repair_data=data if repair else None)
    layers = repairable_layers(model, merge.merged_keys)
    transform = make_transform(ARCH, CPU)

    def inputs():
        return (transform(x) for x, _ in data.train)

    per_source = []
    for state in states:
        source = create_model(ARCH, num_classes=3)
        source.load_state_dict(state)
        per_source.append(activation_statistics(source, layers, inputs))
    w = torch.tensor(weights)
    targets = interpolated_statistics(per_source, lambda name, channels: w[:, None].expand(2, channels))
    return activation_statistics(model, layers, inputs), targets


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.7, 0.3]])
def test_repair_gives_every_merged_layer_the_interpolated_statistics(weights: list[float]) -> None:
    repaired, targets = merged_and_targets(weights, batch_size=32, repair=True)  # one batch: exact
    assert len(targets) > 10  # every conv / linear of the backbone with a bias (the head is not merged)
    for name, target in targets.items():
        torch.testing.assert_close(repaired[name].mean, target.mean, rtol=1e-3, atol=1e-4, msg=name)
        torch.testing.assert_close(repaired[name].std, target.std, rtol=1e-3, atol=1e-4, msg=name)


def test_without_repair_the_merged_activations_collapse() -> None:
    plain, targets = merged_and_targets([0.5, 0.5], batch_size=32, repair=False)
    ratios = [float(plain[n].std.mean() / targets[n].std.mean()) for n in targets]
    assert np.median(ratios) < 0.9  # the variance collapse REPAIR undoes


def test_repair_over_several_batches_is_close() -> None:
    repaired, targets = merged_and_targets([0.5, 0.5], batch_size=8, repair=True)  # 4 batches of 8 images
    errors = torch.cat([(repaired[n].std - t.std).abs() / t.std for n, t in targets.items()])
    assert float(errors.median()) < 0.02 and float(errors.quantile(0.95)) < 0.1


def test_batchnorm_networks_have_nothing_to_repair() -> None:
    model = create_model("resnet18", num_classes=3)
    merged = [k for k in model.state_dict() if not k.startswith("fc.")]
    assert repairable_layers(model, merged) == []  # convs before BatchNorm have no bias: recalibration's job
