"""Activation capture on the traced permutation spec: the features of every permutation space's units on
batches of images, as per-space statistics of one or several same-architecture models.

Where a space's features are read (:func:`feature_sites`): the output of every layer that owns a
parameter whose axis 0 is that space alone (not a concatenation). Norm layers come first: a space with
one or more norm layers (BatchNorm, GroupNorm, LayerNorm...) is read at their outputs (after the norm;
timm's ``BatchNormAct2d`` includes its activation, so EfficientNets are read after the activation,
ResNets before their ReLU); a space without one is read at the outputs of its conv/linear layers. A
space joined by a residual add (one space, several layers writing it) is read at every such site, each
site's values added as further samples: every site carries the same units in the same order, so their
statistics add up.

Conv features: every spatial position is a sample (Git Re-Basin's activation matching does the same,
``(B, C, H, W) -> (B*H*W, C)``), so a batch of ``B`` images of ``H x W`` maps gives ``B*H*W`` samples per
site. Linear/LayerNorm features: every leading index (batch, token) is a sample, the last dim holds the
units. Everything is accumulated in float64: sums and raw second moments, the joint ones of all models'
units, so that means, covariances and correlations within one model and across two models come out of
one pass over the data (:class:`SpaceStatistics`). Models run in eval mode (running BatchNorm statistics).

Plain functions over ``(models, spec, batches)``: activation matching (Git Re-Basin),
ZipIt! and PLeaS read the same statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from medmerge.merge.alignment.spec import PermutationSpec

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def feature_sites(model: nn.Module, spec: PermutationSpec) -> dict[str, list[str]]:
    """Space -> the module names whose outputs carry its units on their channel axis (see the module doc).

    Spaces without any such module (a permuted parameter used only inside an op) are left out.
    """
    norms: dict[str, list[str]] = {}
    layers: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, _NORMS + _LAYERS):
            continue
        entries = spec.key_axes.get(f"{name}.weight" if name else "weight")
        if not entries or not isinstance(entries[0], str):
            continue
        (norms if isinstance(module, _NORMS) else layers).setdefault(entries[0], []).append(name)
    return {space: norms.get(space) or layers[space] for space in spec.spaces if space in norms or space in layers}


def channel_samples(module: nn.Module, out: Tensor) -> Tensor:
    """``out`` as ``(samples, channels)``: positions x images of a conv map (dim 1), or every leading index of
    a linear layer's or LayerNorm's output (last dim)."""
    if isinstance(module, nn.Linear | nn.LayerNorm) or out.dim() == 2:
        return out.reshape(-1, out.shape[-1])
    return out.movedim(1, -1).reshape(-1, out.shape[1])


@dataclass
class SpaceStatistics:
    """The features of one space's ``C`` units in ``N`` models over ``count`` samples.

    Attributes:
        count: samples (images x positions x sites).
        total: ``(N, C)`` sums of the features.
        second: ``(N, N, C, C)`` raw second moments ``sum_s x_i[s, a] * x_j[s, b]`` between model ``i``'s
            unit ``a`` and model ``j``'s unit ``b`` (float64).
    """

    count: int
    total: Tensor
    second: Tensor

    @property
    def mean(self) -> Tensor:
        """``(N, C)``: each model's mean feature per unit."""
        return self.total / self.count

    def covariance(self, i: int, j: int) -> Tensor:
        """``(C, C)``: covariance of model ``i``'s units (rows) with model ``j``'s (columns)."""
        mean = self.mean
        return self.second[i, j] / self.count - torch.outer(mean[i], mean[j])

    def std(self, i: int) -> Tensor:
        return torch.diagonal(self.covariance(i, i)).clamp_min(0).sqrt()

    def correlation(self, i: int, j: int, eps: float = 1e-12) -> Tensor:
        """``(C, C)`` Pearson correlation of model ``i``'s units with model ``j``'s; a unit that does not vary
        (a dead unit) correlates 0 with everything."""
        std_i, std_j = self.std(i), self.std(j)
        scale = torch.outer(std_i, std_j)
        return torch.where(scale > eps, self.covariance(i, j) / scale.clamp_min(eps), torch.zeros_like(scale))

    def joint_correlation(self, eps: float = 1e-12) -> Tensor:
        """``(N*C, N*C)``: the correlation of all models' units stacked (model-major), what ZipIt! matches."""
        n, c = self.total.shape
        blocks = [[self.correlation(i, j, eps) for j in range(n)] for i in range(n)]
        return torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0).reshape(n * c, n * c)


class _Accumulator:
    def __init__(self, models: int, channels: int, device: torch.device) -> None:
        self.count = 0
        self.total = torch.zeros(models, channels, dtype=torch.float64, device=device)
        self.second = torch.zeros(models, models, channels, channels, dtype=torch.float64, device=device)

    def add(self, features: list[Tensor]) -> None:
        x = [f.double() for f in features]
        self.count += x[0].shape[0]
        for i, xi in enumerate(x):
            self.total[i] += xi.sum(dim=0)
            for j in range(i, len(x)):
                block = xi.T @ x[j]
                self.second[i, j] += block
                if j != i:
                    self.second[j, i] += block.T

    def result(self) -> SpaceStatistics:
        return SpaceStatistics(self.count, self.total.cpu(), self.second.cpu())


@torch.no_grad()
def feature_statistics(
    models: Sequence[nn.Module],
    spec: PermutationSpec,
    batches: Iterable[Tensor],
    sites: dict[str, list[str]] | None = None,
) -> dict[str, SpaceStatistics]:
    """Per space of ``spec``, the joint feature statistics of ``models`` (same architecture as the spec's)
    on ``batches`` (model-ready input tensors: normalised, on the models' device).

    Args:
        models: ``N`` models; each runs every batch in eval mode (restored afterwards). Not modified.
        spec: their permutation spec (``permutation_spec`` of any one of them).
        batches: the inputs, iterated once.
        sites: space -> module names to read (default :func:`feature_sites` of ``models[0]``).

    Returns space -> :class:`SpaceStatistics` with ``N`` models (order of ``models``).
    """
    sites = feature_sites(models[0], spec) if sites is None else sites
    site_space = {name: space for space, names in sites.items() for name in names}
    accumulators: dict[str, _Accumulator] = {}
    modes = [{m: m.training for m in model.modules()} for model in models]
    captured: list[dict[str, Tensor]] = [{} for _ in models]
    handles = []
    for index, model in enumerate(models):
        modules = dict(model.named_modules())
        for name in site_space:
            def hook(module: nn.Module, _: object, out: Tensor, name: str = name, index: int = index) -> None:
                # a copy: an in-place activation after the site (ResNet's ReLU) would change a view
                captured[index][name] = channel_samples(module, out).clone()
            handles.append(modules[name].register_forward_hook(hook))
        model.eval()
    try:
        for x in batches:
            for model in models:
                model(x)
            for name, space in site_space.items():
                features = [c.pop(name) for c in captured]
                if space not in accumulators:
                    accumulators[space] = _Accumulator(len(models), features[0].shape[1], features[0].device)
                accumulators[space].add(features)
    finally:
        for handle in handles:
            handle.remove()
        for mode in modes:
            for m, training in mode.items():
                m.train(training)
    return {space: accumulators[space].result() for space in sites if space in accumulators}
