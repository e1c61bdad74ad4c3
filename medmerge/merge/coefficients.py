"""How MedMerge's coefficients are shaped (granularity) and normalised across sources.

A *granularity* maps one parameter tensor to the group of coefficients that scales it and that group's
shape, broadcastable against the tensor, or a :class:`CoefficientMap` where a group's coefficients are no
broadcast block of the tensor (``head``). A *normaliser* turns unconstrained logits into per-source
weights that are positive and sum to one across sources. Both are registries keyed by the names used in
``params.yaml`` (``merge.granularity``, ``merge.normalization``); granularities that need the model's
structure (``head``) are in ``MODEL_GRANULARITIES`` and are built from the model by
:func:`resolve_granularity`. The config checks those names when params load, so this module imports torch
only inside its functions.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from medmerge.registry import Registry, UnknownNameError

if TYPE_CHECKING:
    from torch import Tensor, nn

from medmerge.errors import InputError


class GranularityError(ValueError, InputError):
    """A granularity the model cannot have (``head`` on a network without attention blocks)."""


@dataclass(frozen=True, eq=False)
class CoefficientMap:
    """A coefficient group that is no broadcast block of its tensor: ``index`` (integer, broadcastable
    against the tensor) gives each position's coefficient, counted in row-major order of ``shape`` (the
    group's coefficient shape)."""

    shape: tuple[int, ...]
    index: Tensor


# (parameter name, parameter shape) -> (coefficient group name, coefficient shape or map)
Granularity = Callable[[str, tuple[int, ...]], tuple[str, tuple[int, ...] | CoefficientMap]]

GRANULARITIES: Registry[Granularity] = Registry("granularity")
#: granularities built from the model's structure: name -> (model -> Granularity)
MODEL_GRANULARITIES: Registry[Callable[[nn.Module], Granularity]] = Registry("model granularity")
NORMALIZERS: Registry[Normalizer] = Registry("normalization")


@GRANULARITIES.register("kernel")
def _kernel(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """One coefficient per output channel: a conv filter, a linear row, a norm/bias channel."""
    if not shape:
        return name, ()
    return name, (shape[0],) + (1,) * (len(shape) - 1)


@GRANULARITIES.register("slice")
def _slice(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """One coefficient per 2-D spatial kernel (out x in) of a conv or per weight of a linear layer."""
    if len(shape) < 2:
        return _kernel(name, shape)
    return name, (shape[0], shape[1]) + (1,) * (len(shape) - 2)


@GRANULARITIES.register("layer")
def _layer(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """One coefficient per parameter tensor."""
    return name, (1,) * len(shape)


@GRANULARITIES.register("model")
def _model(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """One coefficient per source for the whole network (task-wise, as in AdaMerging).

    The group is shared by tensors of every rank, so its coefficient is a scalar: a ``(1,) * ndim`` shape
    taken from the first tensor would broadcast lower-rank tensors (biases, norms) up to a wrong shape."""
    return "model", ()

# timm attention modules whose fused ``qkv`` rows are [q heads | k heads | v heads] (``reshape(B, N, 3, H,
# head_dim)``) or whose ``q_proj``/``k_proj``/``v_proj`` rows are heads in order, and whose ``proj`` reads the
# heads' outputs concatenated in the same order
_ATTENTION_TYPES = (
    ("timm.layers", "Attention"),  # ViT, DeiT, ...
    ("timm.models.vision_transformer_relpos", "RelPosAttention"),
    ("timm.models.eva", "EvaAttention"),  # fused qkv + q_bias/v_bias, or separate q/k/v (EVA-02)
    ("timm.models.beit", "Attention"),  # fused qkv + q_bias/v_bias
)


def _attention_types() -> tuple[type[nn.Module], ...]:
    types = []
    for module, name in _ATTENTION_TYPES:
        try:
            types.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another timm version: that family is not covered
            continue
    return tuple(types)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _linear(module: nn.Module, name: str, out_features: int) -> nn.Linear | None:
    from torch import nn

    linear = getattr(module, name, None)
    return linear if isinstance(linear, nn.Linear) and linear.out_features == out_features else None


def _attention_heads(prefix: str, attention: nn.Module) -> dict[str, Tensor] | None:
    """The head index of every position of one attention block's q/k/v and proj tensors, by parameter name
    (broadcastable index tensors); None where the block is not laid out as expected."""
    import torch
    from torch import nn

    heads, proj = getattr(attention, "num_heads", None), getattr(attention, "proj", None)
    if not isinstance(heads, int) or not isinstance(proj, nn.Linear) or proj.in_features % heads:
        return None
    width = proj.in_features  # heads * head_dim
    head = torch.arange(width) // (width // heads)  # the head of each q (or k, or v) feature
    rows: dict[str, Tensor] = {}  # parameter -> head of each output row
    qkv = _linear(attention, "qkv", 3 * width)
    if qkv is not None:
        rows[_join(prefix, "qkv.weight")] = head.repeat(3)
        if qkv.bias is not None:
            rows[_join(prefix, "qkv.bias")] = head.repeat(3)
        for bias in ("q_bias", "v_bias"):  # EVA / BEiT keep the q and v biases apart (k has none)
            if isinstance(getattr(attention, bias, None), nn.Parameter):
                rows[_join(prefix, bias)] = head
    else:
        separate = {name: _linear(attention, name, width) for name in ("q_proj", "k_proj", "v_proj")}
        if any(linear is None for linear in separate.values()):
            return None  # neither fused nor separate q/k/v of this width (e.g. grouped k/v heads)
        for name, linear in separate.items():
            rows[_join(prefix, f"{name}.weight")] = head
            if linear.bias is not None:
                rows[_join(prefix, f"{name}.bias")] = head
    index = {key: value.view(-1, 1) if key.endswith(".weight") else value for key, value in rows.items()}
    index[_join(prefix, "proj.weight")] = head.view(1, width)  # the columns that read each head
    return index


def _architecture(model: nn.Module) -> str:
    config = getattr(model, "pretrained_cfg", None) or {}
    return config.get("architecture") or type(model).__name__


@MODEL_GRANULARITIES.register("head")
def head_granularity(model: nn.Module) -> Granularity:
    """``head``: one coefficient per attention head of every timm attention block, shared by that head's q, k
    and v rows (weights and biases; fused ``qkv`` or separate ``q_proj``/``k_proj``/``v_proj``) and by the
    columns of the output projection ``proj`` that read the head. Every other tensor (``proj``'s bias, norms,
    MLPs, embeddings, q/k norms) keeps ``kernel``: one coefficient per output row. Block ``<name>``'s heads
    are the group ``<name>.heads`` of shape ``(num_heads,)``.

    Raises :class:`GranularityError` where ``model`` has no such attention block."""
    import torch

    maps: dict[str, tuple[str, Tensor, int]] = {}  # parameter -> (group, index, heads)
    types = _attention_types()
    for prefix, module in model.named_modules():
        index = _attention_heads(prefix, module) if types and isinstance(module, types) else None
        for key, value in (index or {}).items():
            maps[key] = (_join(prefix, "heads"), value, module.num_heads)
    if not maps:
        raise GranularityError(
            f"merge.granularity 'head' needs attention blocks (timm Attention with num_heads, a fused qkv or "
            f"q_proj/k_proj/v_proj Linear and a proj Linear); arch '{_architecture(model)}' has none: "
            f"use one of {GRANULARITIES.names()}"
        )

    def grouping(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...] | CoefficientMap]:
        if name not in maps:
            return _kernel(name, shape)
        group, index, heads = maps[name]
        torch.broadcast_shapes(tuple(index.shape), shape)  # a tensor laid out otherwise stops here
        return group, CoefficientMap((heads,), index)

    return grouping


def check_granularity(name: str) -> str:
    """``name`` if it names a granularity (of ``GRANULARITIES`` or ``MODEL_GRANULARITIES``), else
    :class:`~medmerge.registry.UnknownNameError` listing them."""
    if name not in GRANULARITIES and name not in MODEL_GRANULARITIES:
        raise UnknownNameError(f"unknown granularity '{name}'; expected one of "
                               f"{sorted([*GRANULARITIES, *MODEL_GRANULARITIES])}")
    return name


def resolve_granularity(name: str, model: nn.Module) -> Granularity:
    """The granularity ``name`` for ``model`` (a key of ``GRANULARITIES`` or ``MODEL_GRANULARITIES``)."""
    if check_granularity(name) in GRANULARITIES:
        return GRANULARITIES[name]
    return MODEL_GRANULARITIES[name](model)


class Normalizer:
    """Maps logits of shape ``(num_logits, *shape)`` to weights of shape ``(num_sources, *shape)``."""

    name = "softmax"

    def check(self, num_sources: int) -> None:  # noqa: B027 (a hook: softmax weighs any number)
        """Raise ``ValueError`` if this normalisation cannot weigh ``num_sources`` sources; the message
        continues the method's name ("medmerge with normalization ... needs ...")."""

    def num_logits(self, num_sources: int) -> int:
        return num_sources

    def init_logits(self, init_weights: Tensor, shape: tuple[int, ...]) -> Tensor:
        logits = init_weights.log()
        return logits.reshape(-1, *([1] * len(shape))).expand(-1, *shape).clone()

    def weights(self, logits: Tensor) -> Tensor:
        import torch

        return torch.softmax(logits, dim=0)


class SigmoidNormalizer(Normalizer):
    """Two sources with one logit: weights ``(sigmoid(z), 1 - sigmoid(z))``; the first is the anchor."""

    name = "sigmoid"

    def check(self, num_sources: int) -> None:
        if num_sources != 2:
            raise ValueError(f"with normalization 'sigmoid' needs exactly two sources, got {num_sources}")

    def num_logits(self, num_sources: int) -> int:
        self.check(num_sources)
        return 1

    def init_logits(self, init_weights: Tensor, shape: tuple[int, ...]) -> Tensor:
        import torch

        first = float(init_weights[0])
        logit = math.log(first / (1.0 - first))
        return torch.full((1, *shape), logit, dtype=init_weights.dtype)

    def weights(self, logits: Tensor) -> Tensor:
        import torch

        first = torch.sigmoid(logits)
        return torch.cat([first, 1.0 - first], dim=0)


NORMALIZERS.add(Normalizer.name, Normalizer())
NORMALIZERS.add(SigmoidNormalizer.name, SigmoidNormalizer())


def check_normalization(name: str) -> str:
    """``name`` if it is ``auto`` or a key of ``NORMALIZERS``, else
    :class:`~medmerge.registry.UnknownNameError` listing them."""
    if name != "auto" and name not in NORMALIZERS:
        raise UnknownNameError(f"unknown normalization '{name}'; expected 'auto' or one of "
                               f"{NORMALIZERS.names()}")
    return name


def resolve_normalizer(name: str, num_sources: int) -> Normalizer:
    """``auto`` is sigmoid for two sources (one logit per kernel) and softmax otherwise."""
    if check_normalization(name) == "auto":
        name = "sigmoid" if num_sources == 2 else "softmax"
    return NORMALIZERS[name]


def initial_weights(num_sources: int, anchor_index: int, anchor_weight: float) -> Tensor:
    """The anchor source starts at ``anchor_weight``; the others share the rest equally."""
    import torch

    if num_sources < 2:
        raise ValueError(f"merging needs at least two sources, got {num_sources}")
    if not 0.0 < anchor_weight < 1.0:
        raise ValueError(f"the anchor's initial coefficient must lie in (0, 1), got {anchor_weight}")
    weights = torch.full((num_sources,), (1.0 - anchor_weight) / (num_sources - 1), dtype=torch.float32)
    weights[anchor_index] = anchor_weight
    return weights
