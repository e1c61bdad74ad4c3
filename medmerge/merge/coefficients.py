"""How MedMerge's coefficients are shaped (granularity) and normalised across sources.

A *granularity* maps one parameter tensor to the group of coefficients that scales it and that group's
shape, broadcastable against the tensor. A *normaliser* turns unconstrained logits into per-source
weights that are positive and sum to one across sources. Both are registries keyed by the names used in
``params.yaml`` (``merge.granularity``, ``merge.normalization``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# (parameter name, parameter shape) -> (coefficient group name, coefficient shape)
Granularity = Callable[[str, tuple[int, ...]], tuple[str, tuple[int, ...]]]


def _kernel(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """One coefficient per output channel: a conv filter, a linear row, a norm/bias channel."""
    if not shape:
        return name, ()
    return name, (shape[0],) + (1,) * (len(shape) - 1)


def _slice(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """One coefficient per 2-D spatial kernel (out x in) of a conv or per weight of a linear layer."""
    if len(shape) < 2:
        return _kernel(name, shape)
    return name, (shape[0], shape[1]) + (1,) * (len(shape) - 2)


def _layer(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """One coefficient per parameter tensor."""
    return name, (1,) * len(shape)


def _model(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """One coefficient per source for the whole network (task-wise, as in AdaMerging).

    The group is shared by tensors of every rank, so its coefficient is a scalar: a ``(1,) * ndim`` shape
    taken from the first tensor would broadcast lower-rank tensors (biases, norms) up to a wrong shape."""
    return "model", ()


GRANULARITIES: dict[str, Granularity] = {
    "kernel": _kernel,
    "slice": _slice,
    "layer": _layer,
    "model": _model,
}


class Normalizer:
    """Maps logits of shape ``(num_logits, *shape)`` to weights of shape ``(num_sources, *shape)``."""

    name = "softmax"

    def num_logits(self, num_sources: int) -> int:
        return num_sources

    def init_logits(self, init_weights: Tensor, shape: tuple[int, ...]) -> Tensor:
        logits = init_weights.log()
        return logits.reshape(-1, *([1] * len(shape))).expand(-1, *shape).clone()

    def weights(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=0)


class SigmoidNormalizer(Normalizer):
    """Two sources with one logit: weights ``(sigmoid(z), 1 - sigmoid(z))``; the first is the anchor."""

    name = "sigmoid"

    def num_logits(self, num_sources: int) -> int:
        if num_sources != 2:
            raise ValueError(f"sigmoid normalisation needs exactly two sources, got {num_sources}")
        return 1

    def init_logits(self, init_weights: Tensor, shape: tuple[int, ...]) -> Tensor:
        first = float(init_weights[0])
        logit = math.log(first / (1.0 - first))
        return torch.full((1, *shape), logit, dtype=init_weights.dtype)

    def weights(self, logits: Tensor) -> Tensor:
        first = torch.sigmoid(logits)
        return torch.cat([first, 1.0 - first], dim=0)


NORMALIZERS: dict[str, Normalizer] = {"softmax": Normalizer(), "sigmoid": SigmoidNormalizer()}


def resolve_normalizer(name: str, num_sources: int) -> Normalizer:
    """``auto`` is sigmoid for two sources (one logit per kernel) and softmax otherwise."""
    if name == "auto":
        name = "sigmoid" if num_sources == 2 else "softmax"
    if name not in NORMALIZERS:
        raise ValueError(f"unknown merge.normalization '{name}'; expected one of {sorted(NORMALIZERS)} or 'auto'")
    return NORMALIZERS[name]


def initial_weights(num_sources: int, anchor_index: int, anchor_weight: float) -> Tensor:
    """The anchor source starts at ``anchor_weight``; the others share the rest equally."""
    if num_sources < 2:
        raise ValueError(f"merging needs at least two sources, got {num_sources}")
    if not 0.0 < anchor_weight < 1.0:
        raise ValueError(f"the anchor's initial coefficient must lie in (0, 1), got {anchor_weight}")
    weights = torch.full((num_sources,), (1.0 - anchor_weight) / (num_sources - 1), dtype=torch.float32)
    weights[anchor_index] = anchor_weight
    return weights
