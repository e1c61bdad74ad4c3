"""Permutation alignment of same-architecture networks by weight matching (Git Re-Basin).

A *space* is a set of hidden units that must be permuted together for the network to compute the same
function: the output channels of a conv/linear layer, plus every tensor axis that reads or carries them
(the next layer's input axis, a norm's per-channel parameters and running statistics, a depthwise conv's
channels, every branch joined to it by a residual add or a gating multiply, a ViT's class and position
tokens). Three parts, kept apart as in PLeaS and git-re-basin:

1. **The spec** (:class:`PermutationSpec`, plain data) is derived from the model itself: it is traced with
   ``torch.fx``, run once on a dummy input to learn every value's shape, and the *feature axis* of every
   value (dim 1 of a conv map, the last dim of a token sequence) is followed through the graph with
   union-find. What each op or module does to that axis is one small *rule* in a registry
   (:data:`MODULE_RULES`, :data:`FUNCTION_RULES`, :data:`METHOD_RULES`); supporting a new op is adding a rule.
   The image input and the logits are FIXED. Concatenation along the feature axis gives an axis made of
   several spaces (:class:`Concat`); a grouped conv keeps channels inside their groups (its weight's input
   axis is :class:`Local` to the group); attention heads are spaces in groups of ``head_dim`` whose group
   permutation (the heads) is shared by q/k and v (:attr:`PermutationSpec.ties`).
2. **Weight matching** (:func:`weight_matching`; Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023,
   arXiv:2209.04836, Algorithm 1) permutes ``other`` towards ``anchor``: starting from identities it visits
   the spaces in a random order and solves, for each, the linear assignment maximising
   ``sum_(key, axis) <anchor[key], other[key] permuted>`` with every other axis held at its current
   permutation, until a sweep improves nothing.
3. **Applying** permutations (:func:`apply_permutations`) to a state dict; it never changes the function.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, fx, nn

from medmerge.errors import InputError

log = logging.getLogger("medmerge.alignment")

__all__ = [
    "AlignmentError",
    "load_permutations",
    "save_permutations",
    "Concat",
    "Local",
    "PermutationSpec",
    "alignment_similarity",
    "apply_permutations",
    "permutation_spec",
    "random_permutations",
    "weight_matching",
]

_HINT = "weight-matching alignment follows conv/linear/norm/attention layers and channel-wise ops (use merge.align: none)"


class AlignmentError(ValueError, InputError):
    """The model contains a layer or an operation whose channel symmetry alignment cannot follow."""


@dataclass(frozen=True)
class Concat:
    """An axis made of consecutive blocks, each permuted by its own space (None: not permuted)."""

    segments: tuple[tuple[str | None, int], ...]


@dataclass(frozen=True)
class Local:
    """The input axis of a grouped conv's weight: the rows of output group ``g`` hold the channels of group
    ``g`` of ``space`` (whose permutation keeps channels inside their groups), permuted as that group is."""

    space: str
    groups: int


AxisSpace = str | Concat | Local | None


@dataclass(frozen=True)
class PermutationSpec:
    """The permutation symmetry of one architecture.

    Attributes:
        spaces: permutable space name (the module that creates it) -> number of units.
        axes: space name -> every ``(state_dict key, axis)`` it permutes, BN running statistics included.
        key_axes: state_dict key -> per axis, the space permuting it (a name, a :class:`Concat` of several,
            a :class:`Local` group view) or None (fixed / not permuted).
        weight_keys: the floating parameters among ``key_axes`` (what the matching cost and the
            similarity use; buffers are permuted but never matched on).
        groups: space -> number of contiguous groups its permutation must keep channels inside (grouped
            convs, GroupNorm, attention heads); absent: 1 (any permutation).
        ties: space -> name of the permutation *of whole groups* it shares with other spaces (attention:
            q/k and v of one block share the head permutation); absent: groups stay in place.
    """

    spaces: dict[str, int]
    axes: dict[str, list[tuple[str, int]]]
    key_axes: dict[str, tuple[AxisSpace, ...]]
    weight_keys: tuple[str, ...]
    groups: dict[str, int] = field(default_factory=dict)
    ties: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- union-find


class _Spaces:
    """Union-find over spaces; id 0 is FIXED (any size, never permuted). A root carries the union's size,
    its number of groups (lcm of the constraints joined) and its head tie."""

    def __init__(self) -> None:
        self.parent: list[int] = [0]
        self.size: list[int | None] = [None]
        self.name: list[str] = ["<fixed>"]
        self.groups: list[int] = [1]
        self.tie: list[str | None] = [None]

    def new(self, name: str, size: int, groups: int = 1, tie: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.name.append(name)
        self.groups.append(groups)
        self.tie.append(tie)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def constrain(self, i: int, groups: int, where: str) -> None:
        """Keep the permutation of ``i``'s space inside ``groups`` contiguous groups."""
        root = self.find(i)
        if root == 0 or groups == 1:
            return
        size = self.size[root]
        combined = math.lcm(self.groups[root], groups)
        if size % combined:
            raise AlignmentError(f"{where}: {groups} groups do not divide space '{self.name[root]}' ({size}). {_HINT}")
        self.groups[root] = combined

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        sa, sb = self.size[ra], self.size[rb]
        if sa is not None and sb is not None and sa != sb:
            raise AlignmentError(
                f"{where} joins channel spaces '{self.name[ra]}' ({sa}) and '{self.name[rb]}' ({sb}) of "
                f"different sizes. {_HINT}"
            )
        if self.tie[ra] or self.tie[rb]:
            raise AlignmentError(f"{where} joins attention head space '{self.name[ra]}' with '{self.name[rb]}'. {_HINT}")
        keep, drop = min(ra, rb), max(ra, rb)  # FIXED (0) wins, then the space created first
        self.parent[drop] = keep
        if keep != 0:
            self.groups[keep] = math.lcm(self.groups[ra], self.groups[rb])
        return keep


# ------------------------------------------------------------------------------------------ the builder

Layout = tuple[tuple[int, int], ...]  # the feature axis as consecutive (space id, size) blocks


class Feature(NamedTuple):
    """A traced value's feature axis: which dim it is and the spaces along it (None: no feature axis,
    e.g. a scalar-like tensor that broadcasts over every unit)."""

    layout: Layout | None
    axis: int


class _Builder:
    """What the rules read and write while the graph is walked."""

    def __init__(self, model: nn.Module, shapes: dict[fx.Node, tuple[int, ...] | None]) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.state = model.state_dict(keep_vars=True)
        self.shapes = shapes
        self.spaces = _Spaces()
        self.value: dict[fx.Node, Feature] = {}
        self.records: list[tuple[str, int, Layout | tuple[str, int, int]]] = []
        self.called: set[str] = set()

    # helpers used by the rules
    def fail(self, node: fx.Node, why: str) -> AlignmentError:
        return AlignmentError(f"{_describe(node)}: {why}. {_HINT}")

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        shape = self.shapes.get(node)
        if shape is None:
            raise self.fail(node, "expected a tensor")
        return shape

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
        return [a for a in found if self.shapes.get(a) is not None]

    def new(self, name: str, size: int, groups: int = 1, tie: str | None = None) -> Layout:
        return ((self.spaces.new(name, size, groups, tie), size),)

    def record(self, key: str, axis: int, layout: Layout | None) -> None:
        if layout is not None:
            self.records.append((key, axis, layout))

    def record_local(self, key: str, layout: Layout, groups: int, node: fx.Node) -> None:
        """Axis 1 of a grouped conv's weight: local to the group of its single input space."""
        if len(layout) != 1:
            raise self.fail(node, "a grouped conv reading concatenated channels is not supported")
        sid = layout[0][0]
        self.spaces.constrain(sid, groups, _describe(node))
        self.records.append((key, 1, (sid, groups, -1)))

    def join(self, a: Layout, b: Layout, where: str) -> Layout:
        if [s for _, s in a] == [s for _, s in b]:
            return tuple((self.spaces.union(x, y, where), s) for (x, s), (y, _) in zip(a, b, strict=True))
        if len(a) == 1 and a[0][0] == 0 or len(b) == 1 and b[0][0] == 0:  # FIXED absorbs every block
            fixed = a if len(a) == 1 and a[0][0] == 0 else b
            for sid, _ in a + b:
                self.spaces.union(sid, 0, where)
            return fixed
        raise AlignmentError(f"{where} joins concatenations with different blocks {a} and {b}. {_HINT}")

    def layout_size(self, layout: Layout) -> int:
        return sum(size for _, size in layout)

    def owner(self, name: str, node: fx.Node) -> dict[str, Tensor]:
        """The tensors a leaf module owns directly; each module may be called only once (no shared weights)."""
        m = self.modules[name]
        owned = dict(m.named_parameters(recurse=False)) | dict(m.named_buffers(recurse=False))
        if owned:
            if name in self.called:
                raise self.fail(node, f"module '{name}' is called more than once (shared weights)")
            self.called.add(name)
        return owned


def _describe(node: fx.Node) -> str:
    target = node.target
    label = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return f"node '{node.name}' ({node.op} {label})"


def _prefix(name: str, attr: str) -> str:
    return f"{name}.{attr}" if name else attr


# ------------------------------------------------------------------------------------------- registries

ModuleRule = Callable[[_Builder, fx.Node, str, nn.Module, Feature], Feature]
OpRule = Callable[[_Builder, fx.Node, list[fx.Node]], Feature]

MODULE_RULES: dict[type[nn.Module], ModuleRule] = {}
"""Leaf module type -> rule (looked up along the type's MRO, so a subclass may have its own)."""
FUNCTION_RULES: dict[Any, OpRule] = {}
METHOD_RULES: dict[str, OpRule] = {}


def module_rule(*types: type[nn.Module]) -> Callable[[ModuleRule], ModuleRule]:
    def register(rule: ModuleRule) -> ModuleRule:
        for t in types:
            MODULE_RULES[t] = rule
        return rule

    return register


def op_rule(*targets: Any) -> Callable[[OpRule], OpRule]:
    """Register an op rule for functions (callables) and tensor methods (names)."""

    def register(rule: OpRule) -> OpRule:
        for t in targets:
            (METHOD_RULES if isinstance(t, str) else FUNCTION_RULES)[t] = rule
        return rule

    return register


def _module_rule_for(m: nn.Module) -> ModuleRule | None:
    for t in type(m).__mro__:
        if t in MODULE_RULES:
            return MODULE_RULES[t]
    module = type(m).__module__
    if module.startswith(("timm.layers.activations", "timm.layers.pool2d_same", "timm.layers.drop")):
        return _pass_through_module
    return None


# ------------------------------------------------------------------------------------------ module rules

_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ZeroPad2d, nn.ConstantPad2d,
)  # fmt: skip


def _same_units(b: _Builder, node: fx.Node, source: fx.Node, feature: Feature) -> Feature:
    """The output keeps the input's feature axis (at the same position from the end) and its units."""
    if feature.layout is None:
        return feature
    shape_in, shape_out = b.shape(source), b.shape(node)
    axis = feature.axis - len(shape_in) + len(shape_out)
    if axis < 0 or shape_out[axis] != shape_in[feature.axis]:
        raise b.fail(node, f"changes the feature axis from {shape_in} to {shape_out} (mixes or reorders channels)")
    return Feature(feature.layout, axis)


@module_rule(*_ACTIVATIONS, *_POOLS)
def _pass_through_module(b: _Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    if b.owner(name, node):
        raise b.fail(node, f"{type(m).__name__} '{name}' owns tensors")
    return _same_units(b, node, node.args[0], feature)


@module_rule(nn.Flatten)
def _flatten_module(b: _Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    return _reshaped(b, node, node.args[0], feature)


def _expect_axis(b: _Builder, node: fx.Node, feature: Feature, axis: int, what: str) -> Layout:
    ndim = len(b.shape(node.args[0]))
    if feature.layout is None or feature.axis != axis % ndim:
        raise b.fail(node, f"{what} expects its units on dim {axis}, got a value whose feature axis is {feature.axis}")
    return feature.layout


def _check_tensors(b: _Builder, node: fx.Node, name: str, m: nn.Module, allowed: set[str]) -> dict[str, Tensor]:
    owned = b.owner(name, node)
    extra = set(owned) - allowed
    if extra:
        raise b.fail(node, f"{type(m).__name__} has unexpected tensors {sorted(extra)}")
    return owned


@module_rule(nn.modules.conv._ConvNd)
def _conv(b: _Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    if m.transposed:
        raise b.fail(node, "transposed convs are not supported")
    _check_tensors(b, node, name, m, {"weight", "bias"})
    if len(b.shape(node.args[0])) != m.weight.dim():
        raise b.fail(node, f"conv applied to shape {b.shape(node.args[0])}")
    layout = _expect_axis(b, node, feature, 1, "a conv")
    weight = _prefix(name, "weight")
    if m.groups == 1:
        out = b.new(name, m.out_channels)
        b.record(weight, 1, layout)
    elif m.groups == m.in_channels == m.out_channels:  # depthwise: each channel on its own
        out = layout
    else:
        out = b.new(name, m.out_channels, groups=m.groups)
        b.record_local(weight, layout, m.groups, node)
    b.record(weight, 0, out)
    if m.bias is not None:
        b.record(_prefix(name, "bias"), 0, out)
    return Feature(out, 1)


@module_rule(nn.Linear)
def _linear(b: _Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    _check_tensors(b, node, name, m, {"weight", "bias"})
    layout = _expect_axis(b, node, feature, -1, "a Linear layer")
    out = b.new(name, m.out_features)
    b.record(_prefix(name, "weight"), 0, out)
    b.record(_prefix(name, "weight"), 1, layout)
    if m.bias is not None:
        b.record(_prefix(name, "bias"), 0, out)
    return Feature(out, len(b.shape(node)) - 1)


def _per_unit_tensors(b: _Builder, node: fx.Node, name: str, m: nn.Module, layout: Layout) -> None:
    """Every tensor a norm owns is per unit (num_batches_tracked aside)."""
    size = b.layout_size(layout)
    for attr, t in b.owner(name, node).items():
        if t.dim() == 0 and not t.is_floating_point():
            continue  # num_batches_tracked
        if t.dim() != 1 or t.shape[0] != size:
            raise b.fail(node, f"{type(m).__name__}.{attr} of shape {tuple(t.shape)} is not per-channel")
        b.record(_prefix(name, attr), 0, layout)
    children_ok = all(
        _module_rule_for(c) is _pass_through_module and next(c.parameters(), None) is None for c in m.children()
    )
    if not children_ok:  # e.g. BatchNormAct2d's act/drop must be parameter-free elementwise ops
        raise b.fail(node, f"{type(m).__name__} '{name}' has non-elementwise children")


@module_rule(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
def _channel_norm(b: _Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    _per_unit_tensors(b, node, name, m, _expect_axis(b, node, feature, 1, type(m).__name__))
    return feature


@module_rule(nn.GroupNorm)
def _group_norm(b: _Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    layout = _expect_axis(b, node, feature, 1, "GroupNorm")
    if m.num_groups not in (1, m.num_channels):  # statistics per group: channels must stay in their group
        if len(layout) != 1:
            raise b.fail(node, "GroupNorm over concatenated channels is not supported")
        b.spaces.constrain(layout[0][0], m.num_groups, _describe(node))
    _per_unit_tensors(b, node, name, m, layout)
    return feature


@module_rule(nn.LayerNorm)
def _layer_norm(b: _Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    """LayerNorm over the last dim (tokens, channels-last maps): mean and variance ignore the unit order."""
    if len(m.normalized_shape) != 1:
        raise b.fail(node, f"LayerNorm over {tuple(m.normalized_shape)} (more than the feature axis)")
    _per_unit_tensors(b, node, name, m, _expect_axis(b, node, feature, -1, "LayerNorm"))
    return feature


def _register_timm_rules() -> None:
    """Rules for timm modules that are traced as a whole (layers whose forward torch.fx cannot follow)."""
    try:
        from timm.layers import LayerNorm2d, resample_abs_pos_embed
        from timm.models.vgg import ConvMlp as VggConvMlp
        from timm.models.vision_transformer import Attention
    except ImportError:  # pragma: no cover - timm is a dependency
        return

    op_rule(resample_abs_pos_embed)(_unary)  # a ViT's position table interpolated per channel (dynamic_img_size)

    @module_rule(LayerNorm2d)
    def _layer_norm_2d(b: _Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
        _per_unit_tensors(b, node, name, m, _expect_axis(b, node, feature, 1, "LayerNorm2d"))
        return feature

    @module_rule(VggConvMlp)
    def _vgg_conv_mlp(b: _Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
        """VGG's pre-logits: (adaptive pool to >= 7x7) fc1 conv -> act -> drop -> fc2 1x1 conv -> act."""
        for child in ("act1", "drop", "act2"):
            if _module_rule_for(getattr(m, child)) is not _pass_through_module:
                raise b.fail(node, f"{name}.{child} is not an elementwise op")
        hidden = _conv(b, node, _prefix(name, "fc1"), m.fc1, feature)
        return _conv(b, node, _prefix(name, "fc2"), m.fc2, hidden)

    @module_rule(Attention)
    def _attention(b: _Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
        """Multi-head self-attention: the heads may be permuted (q, k and v together), and inside a head the
        dims of q and k together, and the dims of v with the output projection's inputs."""
        for child in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(m, child), nn.Identity):
                raise b.fail(node, f"attention with {child} ({type(getattr(m, child)).__name__}) is not supported")
        if getattr(m, "gate", None) is not None:
            raise b.fail(node, "gated attention is not supported")
        layout = _expect_axis(b, node, feature, -1, "attention")
        heads, dim = m.num_heads, m.num_heads * m.head_dim
        qk = b.new(_prefix(name, "qk"), dim, groups=heads, tie=_prefix(name, "heads"))
        v = b.new(_prefix(name, "v"), dim, groups=heads, tie=_prefix(name, "heads"))
        qkv = _prefix(name, "qkv")
        b.owner(qkv, node)
        b.record(_prefix(qkv, "weight"), 0, qk + qk + v)
        b.record(_prefix(qkv, "weight"), 1, layout)
        if m.qkv.bias is not None:
            b.record(_prefix(qkv, "bias"), 0, qk + qk + v)
        return _linear(b, node, _prefix(name, "proj"), m.proj, Feature(v, feature.axis))


# ---------------------------------------------------------------------------------------------- op rules

_UNARY: tuple[Any, ...] = (
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clip, torch.exp, torch.abs,
    torch.neg, torch.sqrt, torch.rsqrt, torch.square, torch.clone, operator.neg,
    F.relu, F.relu_, F.relu6, F.silu, F.gelu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu,
    F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.pad,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_",
    "clamp_max", "clamp_max_", "clip", "clip_", "exp", "abs", "neg", "sqrt", "rsqrt", "square", "pow",
    "clone", "contiguous", "float", "to", "type_as", "expand",
)  # fmt: skip
_BINARY: tuple[Any, ...] = (
    operator.add, operator.sub, operator.mul, operator.truediv,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
)  # fmt: skip
_RESHAPES: tuple[Any, ...] = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                              "flatten", "reshape", "view", "squeeze", "unsqueeze")


def _first(b: _Builder, node: fx.Node, inputs: list[fx.Node]) -> fx.Node:
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if source is None or source not in b.value:
        raise b.fail(node, "expected a tensor as the first argument")
    return source


@op_rule(*_UNARY)
def _unary(b: _Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
    source = _first(b, node, inputs)
    if node.target != "type_as" and len(inputs) > 1:
        raise b.fail(node, "takes several tensors")
    return _same_units(b, node, source, b.value[source])


@op_rule(*_BINARY)
def _binary(b: _Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
    """Elementwise ops join their operands' units (aligned from the last dim, as broadcasting is); an
    operand of one unit, or one with no feature axis and size 1 there, broadcasts over the other's."""
    if len(inputs) == 1:
        return _same_units(b, node, inputs[0], b.value[inputs[0]])
    if len(inputs) != 2:
        raise b.fail(node, f"elementwise op on {len(inputs)} tensors")
    out_rank = len(b.shape(node))
    (fa, sa), (fb, sb) = ((b.value[x], b.shape(x)) for x in inputs)
    features = [(f, s, f.axis - len(s)) for f, s in ((fa, sa), (fb, sb))]
    carried = [(f, s, pos) for f, s, pos in features if f.layout is not None and s[f.axis] > 1]
    if not carried:
        keep = next(((f, pos) for f, s, pos in features if f.layout is not None), None)
        return Feature(None, 0) if keep is None else Feature(keep[0].layout, keep[1] + out_rank)
    layout, pos = carried[0][0].layout, carried[0][2]
    if len(carried) == 2:
        if carried[1][2] != pos:
            raise b.fail(node, f"combines shapes {sa} and {sb} whose feature axes do not line up")
        layout = b.join(layout, carried[1][0].layout, _describe(node))
    for f, s, _ in features:  # a plain tensor with several values along the units would tell them apart
        if f.layout is None and -pos <= len(s) and s[pos] > 1:
            raise b.fail(node, f"scales the units by a tensor of shape {s} that is not a channel of the model")
    return Feature(layout, pos + out_rank)


def _reshaped(b: _Builder, node: fx.Node, source: fx.Node, feature: Feature) -> Feature:
    """A reshape keeps the units when the feature dim survives whole: same size, same product of the dims
    before it (``flatten(1)`` of a 1x1 map, ``flatten(2)`` of a conv map, ``gamma.reshape(1, -1, 1, 1)``)."""
    if feature.layout is None:
        return feature
    shape_in, shape_out = b.shape(source), b.shape(node)
    size, before = shape_in[feature.axis], math.prod(shape_in[: feature.axis])
    for axis, n in enumerate(shape_out):
        if n == size and math.prod(shape_out[:axis]) == before:
            return Feature(feature.layout, axis)
    raise b.fail(node, f"reshapes {shape_in} to {shape_out}, mixing the feature axis with others")


@op_rule(*_RESHAPES)
def _reshape(b: _Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
    source = _first(b, node, inputs)
    return _reshaped(b, node, source, b.value[source])


@op_rule(torch.transpose, torch.permute, "transpose", "permute", "swapaxes")
def _move_axes(b: _Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
    source = _first(b, node, inputs)
    feature, ndim = b.value[source], len(b.shape(source))
    if feature.layout is None:
        return feature
    dims = [d for d in node.args[1:]] if node.target != torch.permute else list(node.args[1])
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    if node.target in ("permute", torch.permute):
        order = [d % ndim for d in dims]
    else:
        i, j = (d % ndim for d in dims)
        order = list(range(ndim))
        order[i], order[j] = order[j], order[i]
    return Feature(feature.layout, order.index(feature.axis))


@op_rule(torch.cat, torch.concat, torch.concatenate)
def _cat(b: _Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
    """Along the feature axis: the blocks of every input, in order. Along another: one joined space."""
    tensors = list(node.args[0])
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    ndim = len(b.shape(node))
    features = [b.value[t] for t in tensors]
    if any(f.layout is None or f.axis != features[0].axis for f in features):
        raise b.fail(node, "concatenates tensors whose feature axes differ")
    if dim % ndim == features[0].axis:
        return Feature(tuple(block for f in features for block in f.layout), features[0].axis)
    layout = features[0].layout
    for f in features[1:]:
        layout = b.join(layout, f.layout, _describe(node))
    return Feature(layout, features[0].axis)


@op_rule(torch.mean, "mean", torch.sum, "sum", torch.amax, "amax")
def _reduce(b: _Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
    source = _first(b, node, inputs)
    feature, ndim = b.value[source], len(b.shape(source))
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = [dims] if isinstance(dims, int) else dims
    if dims is None or len(inputs) != 1 or any(d % ndim in (0, feature.axis) for d in dims):
        raise b.fail(node, f"mean over dims {dims} reduces the batch or feature axis")
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    removed = 0 if keepdim else sum(1 for d in dims if d % ndim < feature.axis)
    return Feature(feature.layout, feature.axis - removed)


@op_rule(operator.getitem)
def _index(b: _Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
    """Indexing a tensor with ints and slices that leave the feature axis whole (``x[:, 0]``: class token)."""
    source = _first(b, node, inputs)
    feature, shape = b.value[source], b.shape(source)
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if any(i is Ellipsis or i is None for i in index) or len(index) > len(shape):
        raise b.fail(node, f"indexing with {index} is not followed")
    axis = feature.axis
    for dim, i in enumerate(index):
        whole = isinstance(i, slice) and i == slice(None)
        if dim == feature.axis and not whole:
            raise b.fail(node, f"indexes the feature axis with {i}")
        if isinstance(i, int) and dim < feature.axis:
            axis -= 1
        elif not isinstance(i, (int, slice)):
            raise b.fail(node, f"indexing with {type(i).__name__} is not followed")
    return Feature(feature.layout, axis)


_register_timm_rules()


# ------------------------------------------------------------------------------------------------ tracing


def _notrace() -> tuple[list[type[nn.Module]], list[Any]]:
    try:  # timm registers modules/functions that torch.fx cannot trace through (e.g. Conv2dSame padding)
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - timm is a dependency, but the tracer works without it
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


class _Tracer(fx.Tracer):
    """Leaves: modules with a rule, timm's no-trace modules and torch.nn's own modules. Everything else,
    parameter owners included (ConvNeXt blocks, LayerScale), is traced through."""

    def __init__(self, notrace_modules: Iterable[type[nn.Module]], autowrap_functions: Iterable[Any]) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._notrace = tuple(notrace_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _module_rule_for(m) is not None:
            return True
        if self._notrace and isinstance(m, self._notrace):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph once, keeping every node's output shape (None for non-tensor outputs)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n] = tuple(result.shape) if isinstance(result, Tensor) else None
        return result


def _input_size(model: nn.Module) -> tuple[int, ...]:
    embed = getattr(model, "patch_embed", None)  # a ViT built for another image size than its config's
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    if embed is not None and getattr(embed, "img_size", None):
        return (channels, *embed.img_size)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if cfg.get("input_size"):
        return tuple(cfg["input_size"])
    return (channels, 224, 224)


def permutation_spec(model: nn.Module, input_size: tuple[int, ...] | None = None) -> PermutationSpec:
    """Derive the permutation symmetry of ``model`` from its torch.fx graph.

    Args:
        model: a network made of layers and ops with a rule (timm ResNets, EfficientNets, DenseNets, VGGs,
            ResNeXts, RegNets, ConvNeXts, ViTs...). It is not modified (traced and run once in eval mode).
        input_size: ``(C, H, W)`` of the dummy input used to learn shapes; default: a ViT's
            ``patch_embed.img_size``, else the model's ``pretrained_cfg['input_size']``, else 224 x 224.

    Raises:
        AlignmentError: naming the first module or op whose channel handling cannot be followed.
    """
    notrace_modules, notrace_functions = _notrace()
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        try:
            graph = _Tracer(notrace_modules, notrace_functions).trace(model)
        except Exception as error:  # noqa: BLE001 - any tracing failure means: cannot derive a spec
            raise AlignmentError(f"torch.fx could not trace {type(model).__name__}: {error}. {_HINT}") from error
        gm = fx.GraphModule(model, graph)
        param = next(model.parameters(), torch.empty(0))
        dummy = torch.zeros((1, *(input_size or _input_size(model))), dtype=param.dtype, device=param.device)
        recorder = _ShapeRecorder(gm)
        try:
            with torch.no_grad():
                recorder.run(dummy)
        except Exception as error:  # noqa: BLE001
            raise AlignmentError(
                f"running the traced {type(model).__name__} on a dummy input {tuple(dummy.shape)} failed: "
                f"{error}. {_HINT}"
            ) from error
    finally:
        for m, training in modes.items():
            m.train(training)
    builder = _Builder(model, recorder.shapes)
    _walk(builder, gm.graph)
    return _assemble(builder)


def _walk(b: _Builder, graph: fx.Graph) -> None:
    tensors_in = 0
    for node in graph.nodes:
        shape = b.shapes.get(node)
        if node.op == "placeholder":
            if shape is None:
                continue  # an optional argument left at its default (e.g. a ViT's attn_mask)
            tensors_in += 1
            if tensors_in > 1:
                raise b.fail(node, "models with more than one input tensor are not supported")
            b.value[node] = Feature(((0, shape[1]),), 1)
        elif node.op == "get_attr":
            if shape is None:
                continue
            key = str(node.target)
            if key not in b.state or not b.state[key].is_floating_point() or not shape:
                raise b.fail(node, "a tensor that is not a floating parameter or buffer of the model")
            # a parameter used in an op (class/position token, layer scale): its last dim holds the units
            layout = b.new(key, shape[-1])
            b.record(key, len(shape) - 1, layout)
            b.value[node] = Feature(layout, len(shape) - 1)
        elif node.op == "output":
            for arg in b.tensor_args(node):
                if b.value[arg].layout is not None:
                    for sid, _ in b.value[arg].layout:
                        b.spaces.union(sid, 0, _describe(node))
        elif node.op == "call_module":
            name = str(node.target)
            m = b.modules[name]
            inputs = b.tensor_args(node)
            rule = _module_rule_for(m)
            if rule is None:
                raise b.fail(node, f"unsupported module {type(m).__name__} '{name}'")
            if len(inputs) != 1 or node.args[0] is not inputs[0]:
                raise b.fail(node, f"module {type(m).__name__} must be called on exactly one tensor")
            b.value[node] = rule(b, node, name, m, b.value[inputs[0]])
        else:
            inputs = b.tensor_args(node)
            table = METHOD_RULES if node.op == "call_method" else FUNCTION_RULES
            rule = table.get(node.target) if isinstance(node.target, str) or callable(node.target) else None
            if shape is None and (not inputs or node.target in (getattr, "size", "dim")):
                continue  # shape/metadata arithmetic, no channels involved
            if rule is None:
                if not inputs:
                    b.value[node] = Feature(None, 0)  # a new tensor (torch.zeros...): no units
                    continue
                raise b.fail(node, "this op can reorder or mix channels and is not supported")
            b.value[node] = rule(b, node, inputs)


def _assemble(b: _Builder) -> PermutationSpec:
    spaces = b.spaces
    params = {name for name, _ in b.model.named_parameters()}
    sizes: dict[str, int] = {}
    axes: dict[str, list[tuple[str, int]]] = {}
    key_axes: dict[str, list[AxisSpace]] = {}
    groups: dict[str, int] = {}
    ties: dict[str, str] = {}

    def resolve(sid: int) -> str | None:
        root = spaces.find(sid)
        if root == 0 or spaces.size[root] == 1:  # fixed, or a single unit: nothing to permute
            return None
        name = spaces.name[root]
        sizes[name] = int(spaces.size[root])
        if spaces.groups[root] > 1:
            groups[name] = spaces.groups[root]
        if spaces.tie[root]:
            ties[name] = spaces.tie[root]
        return name

    for key, axis, layout in b.records:
        tensor = b.state[key]
        slot = key_axes.setdefault(key, [None] * tensor.dim())
        if isinstance(layout[0], int):  # a Local view: (space id, groups, -1)
            name = resolve(layout[0])
            entry: AxisSpace = None if name is None else Local(name, layout[1])
            expected = None if name is None else sizes[name] // layout[1]
        else:
            segments = tuple((resolve(sid), size) for sid, size in layout)
            expected = sum(size for _, size in segments)
            entry = segments[0][0] if len(segments) == 1 else Concat(segments)
            if isinstance(entry, Concat) and all(s is None for s, _ in segments):
                entry = None
        if entry is None:
            continue
        if tensor.shape[axis] != expected:
            raise AlignmentError(f"'{key}' axis {axis} has size {tensor.shape[axis]} but its channel space has "
                                 f"{expected} units. {_HINT}")
        slot[axis] = entry
        for name in _names(entry):
            axes.setdefault(name, []).append((key, axis))
    key_axes_t = {k: tuple(v) for k, v in key_axes.items() if any(s is not None for s in v)}
    weights = tuple(k for k in key_axes_t if k in params and b.state[k].is_floating_point())
    return PermutationSpec(spaces=sizes, axes=axes, key_axes=key_axes_t, weight_keys=weights, groups=groups,
                           ties=ties)


def _names(entry: AxisSpace) -> list[str]:
    if entry is None:
        return []
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, Local):
        return [entry.space]
    return list(dict.fromkeys(s for s, _ in entry.segments if s is not None))


# ------------------------------------------------------------------------------------ applying permutations


def _axis_index(entry: str | Concat, perms: dict[str, Tensor]) -> Tensor | None:
    """The index that permutes an axis (None: identity)."""
    if isinstance(entry, str):
        return perms.get(entry)
    parts, offset, changed = [], 0, False
    for space, size in entry.segments:
        perm = perms.get(space) if space is not None else None
        changed |= perm is not None
        parts.append((perm if perm is not None else torch.arange(size)) + offset)
        offset += size
    return torch.cat(parts) if changed else None


def _local_gather(tensor: Tensor, local: Local, perm: Tensor) -> Tensor:
    """Permute axis 1 of a grouped conv weight: output group g reads group g of ``local.space``."""
    g = local.groups
    k = tensor.shape[1]
    inner = perm.to(tensor.device).view(g, k) - (torch.arange(g, device=tensor.device) * k)[:, None]
    rows = tensor.reshape(g, tensor.shape[0] // g, k, -1)
    index = inner[:, None, :, None].expand(g, rows.shape[1], k, rows.shape[3])
    return rows.gather(2, index).reshape(tensor.shape)


def _permute(tensor: Tensor, entries: tuple[AxisSpace, ...], perms: dict[str, Tensor], skip: int = -1) -> Tensor:
    for axis, entry in enumerate(entries):
        if axis == skip or entry is None:
            continue
        if isinstance(entry, Local):
            if entry.space in perms:
                tensor = _local_gather(tensor, entry, perms[entry.space])
            continue
        index = _axis_index(entry, perms)
        if index is not None:
            tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor


def _check_permutation(spec: PermutationSpec, space: str, perm: Tensor) -> None:
    n = spec.spaces[space]
    if perm.shape != (n,) or not torch.equal(torch.sort(perm.cpu()).values, torch.arange(n)):
        raise ValueError(f"permutation for space '{space}' is not a permutation of {n} units")
    g = spec.groups.get(space, 1)
    if g > 1:
        blocks = perm.cpu().view(g, n // g) // (n // g)
        if not bool((blocks == blocks[:, :1]).all()) or (space not in spec.ties and
                                                         not torch.equal(blocks[:, 0], torch.arange(g))):
            raise ValueError(f"permutation for space '{space}' moves units out of their {g} groups")


def apply_permutations(spec: PermutationSpec, perms: dict[str, Tensor], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A new state dict with every spec'd axis permuted (``out = t.index_select(axis, perm)``).

    Keys outside the spec (num_batches_tracked, the logits axis of the head, ...) are returned unchanged;
    spaces missing from ``perms`` keep the identity.
    """
    unknown = set(perms) - set(spec.spaces)
    if unknown:
        raise ValueError(f"permutations for spaces not in the spec: {sorted(unknown)[:5]}")
    for space, perm in perms.items():
        _check_permutation(spec, space, perm)
    out = {}
    for key, tensor in state.items():
        entries = spec.key_axes.get(key)
        if entries is not None:
            if tensor.dim() != len(entries):
                raise ValueError(f"'{key}' has {tensor.dim()} axes, the spec expects {len(entries)}")
            tensor = _permute(tensor, entries, perms)
        out[key] = tensor
    return out


def random_permutations(spec: PermutationSpec, seed: int = 0) -> dict[str, Tensor]:
    """A random member of the spec's symmetry group (heads shuffled with their ties, units within groups)."""
    generator = torch.Generator().manual_seed(seed)
    group_perms: dict[str, Tensor] = {}
    perms = {}
    for space, n in spec.spaces.items():
        g = spec.groups.get(space, 1)
        k = n // g
        tie = spec.ties.get(space)
        order = torch.arange(g)
        if tie is not None:
            order = group_perms.setdefault(tie, torch.randperm(g, generator=generator))
        inner = torch.stack([torch.randperm(k, generator=generator) for _ in range(g)])
        perms[space] = (order[:, None] * k + inner).reshape(n)
    return perms


# ------------------------------------------------------------------------------------------ weight matching


def _matched_keys(spec: PermutationSpec, anchor: dict[str, Tensor], other: dict[str, Tensor]) -> list[str]:
    """Weight keys present in both states with equal shapes (differently sized heads are skipped)."""
    return [k for k in spec.weight_keys if k in anchor and k in other and anchor[k].shape == other[k].shape]


@dataclass
class _Term:
    """One weight axis in a space: the anchor's tensor with that axis first, flattened, and where the
    space's units sit along it (``offset`` for a Concat block; ``local`` for a grouped conv's input)."""

    key: str
    axis: int
    offset: int
    anchor: Tensor
    deps: tuple[str, ...]  # the spaces on the key's other axes: the term's cost changes with them
    local: int = 0  # groups of a Local axis


def _terms(spec: PermutationSpec, space: str, anchor: dict[str, Tensor], wanted: set[str]) -> list[_Term]:
    n = spec.spaces[space]
    terms = []
    for key, axis in spec.axes[space]:
        if key not in wanted:
            continue
        entry = spec.key_axes[key][axis]
        a = anchor[key].movedim(axis, 0)
        deps = tuple(dict.fromkeys(name for i, e in enumerate(spec.key_axes[key]) if i != axis for name in _names(e)))
        if isinstance(entry, Local):
            # rows (out channels) in groups; the units are (group, local index): (g, out/g, k, rest)
            terms.append(_Term(key, axis, 0, anchor[key], deps, local=entry.groups))
            continue
        offsets = [0]
        if isinstance(entry, Concat):
            offsets, start = [], 0
            for s, size in entry.segments:
                if s == space:
                    offsets.append(start)
                start += size
        for offset in offsets:
            terms.append(_Term(key, axis, offset, a[offset:offset + n].reshape(n, -1).contiguous(), deps))
    return terms


def _term_cost(spec: PermutationSpec, n: int, term: _Term, other: dict[str, Tensor], perms: dict[str, Tensor]) -> Tensor:
    """``cost[i, j]``: how well unit ``j`` of ``other`` matches unit ``i`` of the anchor on one weight axis,
    every other axis at its current permutation."""
    entries = spec.key_axes[term.key]
    if term.local:
        # the other model's weight with its rows permuted: same groups, so row group g reads group g
        b = _permute(other[term.key], entries, perms, skip=1)
        g, k = term.local, b.shape[1]
        a = term.anchor.reshape(g, term.anchor.shape[0] // g, k, -1)
        blocks = torch.einsum("gmir,gmjr->gij", a, b.reshape(g, b.shape[0] // g, k, -1))
        return torch.block_diag(*blocks)
    b = _permute(other[term.key], entries, perms, skip=term.axis)  # its other blocks: sliced away
    b = b.movedim(term.axis, 0)[term.offset:term.offset + n].reshape(n, -1)
    return term.anchor @ b.T


def _assign(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment  # 0.6 s to import: only the stages that align pay it

    return linear_sum_assignment(cost, maximize=True)[1]


def _solve_unit(spec: PermutationSpec, unit: list[str], costs: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """The best permutations of the spaces in ``unit`` (one space, or the spaces sharing a head tie) under
    their group constraints: within groups; with a tie, whole groups too (the same for every space)."""
    first = unit[0]
    n, g = spec.spaces[first], spec.groups.get(first, 1)
    if g == 1:
        return {first: torch.from_numpy(_assign(costs[first]).astype(np.int64))}
    k = n // g
    tied = first in spec.ties
    # value[a, b] of putting old group b at new group a, and the inner assignment achieving it
    value = np.zeros((g, g))
    inner: dict[tuple[str, int, int], np.ndarray] = {}
    pairs = [(a, c) for a in range(g) for c in range(g)] if tied else [(a, a) for a in range(g)]
    for space in unit:
        for a, c in pairs:
            block = costs[space][a * k:(a + 1) * k, c * k:(c + 1) * k]
            cols = _assign(block)
            inner[space, a, c] = cols
            value[a, c] += block[np.arange(k), cols].sum()
    order = _assign(value) if tied else np.arange(g)
    return {space: torch.from_numpy(np.concatenate([order[a] * k + inner[space, a, order[a]] for a in range(g)])
                                    .astype(np.int64)) for space in unit}


def _units(spec: PermutationSpec) -> list[list[str]]:
    units: dict[str, list[str]] = {}
    for space in spec.spaces:
        units.setdefault(spec.ties.get(space, space), []).append(space)
    return list(units.values())


def weight_matching(
    spec: PermutationSpec,
    anchor: dict[str, Tensor],
    other: dict[str, Tensor],
    max_iter: int = 100,
    seed: int = 0,
    tolerance: float = 0.01,
) -> dict[str, Tensor]:
    """Permutations of ``other``'s units that maximise its inner product with ``anchor`` (Git Re-Basin).

    Returns space name -> int64 permutation ``p`` (CPU): unit ``i`` of the aligned model is unit ``p[i]``
    of ``other``; pass it to :func:`apply_permutations`. Only floating parameters present in both states
    with equal shapes enter the cost; a space with none of them keeps the identity.

    The search starts with one sweep in network order, each unit matched on the weights whose other axes
    are fixed or already matched (the permutations propagate from the input as a forward pass does; a
    permuted copy is recovered exactly there, where coordinate ascent from identities can lock into a wrong
    residual stream). Then sweeps in random order solve each unit with all its weights; a unit whose
    neighbours did not change since it was last solved is skipped (exact), and a sweep that gains less than
    ``tolerance`` of the total gain over the identity so far ends the search (0: run to a fixed point).
    The identity is kept if it scores higher.
    """
    keys = _matched_keys(spec, anchor, other)
    a32 = {k: anchor[k].detach().to("cpu", torch.float32) for k in keys}
    b32 = {k: other[k].detach().to("cpu", torch.float32) for k in keys}
    search = _Search(spec, a32, b32)
    identity = {s: torch.arange(n) for s, n in spec.spaces.items()}
    start = _objective(spec, a32, b32, identity)
    search.forward_sweep()
    objective = search.objective()
    generator = torch.Generator().manual_seed(seed)
    for sweep in range(1, max_iter + 1):
        gain = search.sweep(torch.randperm(len(search.units), generator=generator).tolist())
        objective += gain
        log.debug("weight matching sweep %d: gain %.3g, %.6g -> %.6g", sweep, gain, start, objective)
        if gain <= tolerance * (objective - start):
            break
    log.debug("weight matching: %d spaces, %d sweeps, %d assignments", len(spec.spaces), sweep, search.solves)
    if start > objective:
        return identity
    return search.perms


def _objective(spec: PermutationSpec, a: dict[str, Tensor], b: dict[str, Tensor], perms: dict[str, Tensor]) -> float:
    return sum(float(torch.dot(a[k].flatten(), _permute(b[k], spec.key_axes[k], perms).flatten())) for k in a)


class _Search:
    """The state of one weight-matching search: current permutations, and when each unit changed."""

    def __init__(self, spec: PermutationSpec, a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
        self.spec, self.a, self.b = spec, a, b
        self.perms = {s: torch.arange(n) for s, n in spec.spaces.items()}
        self.units = _units(spec)
        self.terms = {s: _terms(spec, s, a, set(a)) for s in spec.spaces}
        unit_of = {s: i for i, unit in enumerate(self.units) for s in unit}
        self.neighbours = [
            {unit_of[o] for s in unit for t in self.terms[s] for o in _names_of_key(spec, t.key)} - {i}
            for i, unit in enumerate(self.units)
        ]
        self.changed_at = [0] * len(self.units)
        self.solved_at = [-1] * len(self.units)
        self.step = self.solves = 0
        self.version = dict.fromkeys(spec.spaces, 0)
        self.cache: dict[int, tuple[tuple[int, ...], Tensor]] = {}

    def objective(self) -> float:
        return _objective(self.spec, self.a, self.b, self.perms)

    def solve(self, index: int, terms: dict[str, list[_Term]]) -> float:
        """Re-match unit ``index`` on ``terms``; the gain in its part of the objective (0: kept)."""
        unit, spec = self.units[index], self.spec
        self.step += 1
        self.solves += 1
        self.solved_at[index] = self.step
        costs = {s: self.cost(s, terms[s]) for s in unit}
        new = _solve_unit(spec, unit, costs)
        rows = np.arange(spec.spaces[unit[0]])
        old = sum(costs[s][rows, self.perms[s].numpy()].sum() for s in unit)
        gain = sum(costs[s][rows, new[s].numpy()].sum() for s in unit) - old
        if gain <= 1e-9 * max(1.0, abs(old)):
            return 0.0
        self.perms.update(new)
        self.changed_at[index] = self.step
        for s in unit:
            self.version[s] += 1
        return float(gain)

    def cost(self, space: str, terms: list[_Term]) -> np.ndarray:
        """The assignment cost of ``space``; each term's part is cached until a space it depends on changes."""
        n = self.spec.spaces[space]
        total = torch.zeros(n, n, dtype=torch.float32)
        for term in terms:
            stamp = tuple(self.version[d] for d in term.deps)
            cached = self.cache.get(id(term))
            if cached is None or cached[0] != stamp:
                cached = (stamp, _term_cost(self.spec, n, term, self.b, self.perms))
                self.cache[id(term)] = cached
            total += cached[1]
        return total.double().numpy()

    def forward_sweep(self) -> None:
        matched: set[str] = set()
        for index, unit in enumerate(self.units):
            matched.update(unit)
            ready = {s: [t for t in self.terms[s] if set(_names_of_key(self.spec, t.key)) <= matched] for s in unit}
            if any(ready.values()):
                self.solve(index, ready)

    def sweep(self, order: list[int]) -> float:
        gain = 0.0
        for index in order:
            unit = self.units[index]
            stale = self.solved_at[index] < 0 or any(
                self.changed_at[o] >= self.solved_at[index] for o in self.neighbours[index]
            )
            if stale and any(self.terms[s] for s in unit):
                gain += self.solve(index, self.terms)
        return gain


def _names_of_key(spec: PermutationSpec, key: str) -> list[str]:
    return [name for entry in spec.key_axes[key] for name in _names(entry)]


def alignment_similarity(spec: PermutationSpec, anchor: dict[str, Tensor], other: dict[str, Tensor]) -> float:
    """Sum over the spec'd weights (present in both with equal shapes) of ``<anchor[k], other[k]>``."""
    total = 0.0
    for key in _matched_keys(spec, anchor, other):
        a = anchor[key].detach().to("cpu", torch.float64)
        total += float((a * other[key].detach().to("cpu", torch.float64)).sum())
    return total


# -------------------------------------------------------------------------------------------------- files


def save_permutations(permutations: dict[str, dict[str, Tensor]], path: Path) -> None:
    """``{source: {space: perm}}`` as one safetensors file with keys ``<source>/<space>``."""
    flat = {f"{source}/{space}": perm.contiguous() for source, perms in permutations.items()
            for space, perm in perms.items()}
    save_file(flat, str(path))


def load_permutations(path: Path) -> dict[str, dict[str, Tensor]]:
    """The inverse of :func:`save_permutations`; loads tensors only (no code runs)."""
    nested: dict[str, dict[str, Tensor]] = {}
    for key, perm in load_file(str(path)).items():
        source, sep, space = key.partition("/")
        if not sep or perm.dtype != torch.int64 or perm.dim() != 1:
            raise AlignmentError(f"{path}: '{key}' is not a '<source>/<space>' int64 permutation")
        nested.setdefault(source, {})[space] = perm
    return nested
