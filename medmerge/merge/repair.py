"""REPAIR (Jordan, Sedghi, Saukh, Entezari & Neyshabur, "REPAIR: REnormalizing Permuted Activations for
Interpolation Repair", ICLR 2023, arXiv:2211.08403): after merging, rescale each layer's output channels so
that their mean and standard deviation on calibration data are the interpolation of the sources' own.

An interpolated network's activations shrink (variance collapse); BatchNorm networks undo that by
recomputing their running statistics (``recalibrate_batchnorm``). Networks with LayerNorm or without
normalisation have nothing to recompute: REPAIR corrects the conv/linear layers themselves. The correction
``y' = (y - mu_merged) / sigma_merged * sigma_target + mu_target`` is folded into each layer's weight and
bias, so the result is again an ordinary model.

All layers are corrected in one pass, as Jordan et al. do with reset BatchNorm layers: while the
calibration batches run, each layer normalises its output with the batch's statistics and applies the
target ones, so every layer is measured with the layers before it already corrected; then each layer's
overall statistics are folded in. With the whole calibration set in one batch the folded model reproduces
the target statistics exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ChannelStats", "activation_statistics", "interpolated_statistics", "repair", "repairable_layers"]

Inputs = Callable[[], Iterable[Tensor]]  # a fresh iterator over model-ready calibration batches per call


@dataclass
class ChannelStats:
    """Per output channel mean and standard deviation of one layer."""

    mean: Tensor
    std: Tensor


def repairable_layers(model: nn.Module, keys: Iterable[str]) -> list[str]:
    """The conv and linear layers among ``keys``' owners (``<layer>.weight``) that have a bias to shift."""
    wanted = {key.rsplit(".", 1)[0] for key in keys if key.endswith(".weight")}
    return [name for name, m in model.named_modules()
            if name in wanted and isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None]


def _channels(module: nn.Module, out: Tensor) -> Tensor:
    """``out`` as (channels, values): dim 1 of a conv map, the last dim of a linear layer's output."""
    if isinstance(module, nn.Linear):
        return out.reshape(-1, out.shape[-1]).T
    return out.transpose(0, 1).reshape(out.shape[1], -1)


class _Moments:
    def __init__(self) -> None:
        self.total = self.squares = None
        self.count = 0

    def add(self, values: Tensor) -> None:
        values = values.double()
        total, squares = values.sum(dim=1), (values * values).sum(dim=1)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += values.shape[1]

    def stats(self) -> ChannelStats:
        mean = self.total / self.count
        var = (self.squares / self.count - mean * mean).clamp_min(0)
        return ChannelStats(mean.float(), var.sqrt().float())


@torch.no_grad()
def activation_statistics(model: nn.Module, layers: Sequence[str], inputs: Inputs) -> dict[str, ChannelStats]:
    """Each layer's per-channel output statistics over the calibration batches (eval mode)."""
    moments = {name: _Moments() for name in layers}
    _run_with_hooks(model, layers, lambda name, m, out: moments[name].add(_channels(m, out)), inputs)
    return {name: m.stats() for name, m in moments.items()}


def _run_with_hooks(model: nn.Module, layers: Sequence[str], hook, inputs: Inputs) -> None:
    """Run every calibration batch through ``model`` (eval mode) with ``hook(name, module, output)`` on each
    of ``layers`` (a hook that returns a tensor replaces the layer's output)."""
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(lambda m, _, out, name=name: hook(name, m, out))
             for name in layers]
    model.eval()
    try:
        for x in inputs():
            model(x)
    finally:
        for handle in hooks:
            handle.remove()


def _scale(target: Tensor, std: Tensor) -> Tensor:
    """``target / std``; a channel that does not vary (a dead unit) keeps its scale."""
    return torch.where(std > 1e-12, target / std.clamp_min(1e-12), torch.ones_like(std))


@torch.no_grad()
def repair(model: nn.Module, targets: dict[str, ChannelStats], inputs: Inputs, passes: int = 2) -> int:
    """Fold into each layer of ``targets`` the affine map giving its outputs the target statistics.

    Each pass measures every layer with the layers before it corrected batch by batch, then folds; a
    second pass removes most of what batch-to-batch variation left (one pass is exact for one batch).
    Returns the number of layers corrected. ``model`` is changed in place (weights and biases only).
    """
    for _ in range(passes):
        _repair_pass(model, targets, inputs)
    return len(targets)


def _repair_pass(model: nn.Module, targets: dict[str, ChannelStats], inputs: Inputs) -> None:
    modules = dict(model.named_modules())
    moments = {name: _Moments() for name in targets}

    def correct(name: str, m: nn.Module, out: Tensor) -> Tensor:
        values = _channels(m, out)
        moments[name].add(values)
        mean, std = values.mean(dim=1), values.std(dim=1, unbiased=False)
        scale = _scale(targets[name].std.to(out), std)
        shift = targets[name].mean.to(out) - mean * scale
        shape = [1] * out.dim()
        shape[-1 if isinstance(m, nn.Linear) else 1] = -1
        return out * scale.reshape(shape) + shift.reshape(shape)

    _run_with_hooks(model, list(targets), correct, inputs)
    for name, target in targets.items():
        m, merged = modules[name], moments[name].stats()
        scale = _scale(target.std.to(m.weight), merged.std.to(m.weight))
        m.weight.mul_(scale.reshape(-1, *[1] * (m.weight.dim() - 1)))
        m.bias.copy_((m.bias - merged.mean.to(m.bias)) * scale + target.mean.to(m.bias))


def interpolated_statistics(per_source: Sequence[dict[str, ChannelStats]], weights: Callable[[str, int], Tensor]
                            ) -> dict[str, ChannelStats]:
    """The target of each layer: the sources' means and standard deviations weighted per channel by
    ``weights(layer, channels)`` (shape ``(N, channels)``, each column summing to one)."""
    targets = {}
    for name in per_source[0]:
        channels = per_source[0][name].mean.shape[0]
        w = weights(name, channels).float()
        mean = sum(w[i] * stats[name].mean for i, stats in enumerate(per_source))
        std = sum(w[i] * stats[name].std for i, stats in enumerate(per_source))
        targets[name] = ChannelStats(mean, std)
    return targets
