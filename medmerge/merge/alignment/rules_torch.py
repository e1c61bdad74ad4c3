"""Rules for torch.nn modules and torch ops: what each does to the feature axis (the units) of its input."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from medmerge.merge.alignment.builder import Builder, Feature, Layout, describe, dotted
from medmerge.merge.alignment.rules import module_rule, module_rule_for, op_rule

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


def _same_units(b: Builder, node: fx.Node, source: fx.Node, feature: Feature) -> Feature:
    """The output keeps the input's feature axis (at the same position from the end) and its units."""
    if feature.layout is None:
        return feature
    shape_in, shape_out = b.shape(source), b.shape(node)
    axis = feature.axis - len(shape_in) + len(shape_out)
    if axis < 0 or shape_out[axis] != shape_in[feature.axis]:
        raise b.fail(node, f"changes the feature axis from {shape_in} to {shape_out} (mixes or reorders "
                           "channels)")
    return Feature(feature.layout, axis)


@module_rule(*_ACTIVATIONS, *_POOLS)
def pass_through_module(b: Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    if b.owner(name, node):
        raise b.fail(node, f"{type(m).__name__} '{name}' owns tensors")
    return _same_units(b, node, node.args[0], feature)


@module_rule(nn.Flatten)
def flatten_module(b: Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    return _reshaped(b, node, node.args[0], feature)


def expect_axis(b: Builder, node: fx.Node, feature: Feature, axis: int, what: str) -> Layout:
    ndim = len(b.shape(node.args[0]))
    if feature.layout is None or feature.axis != axis % ndim:
        raise b.fail(node, f"{what} expects its units on dim {axis}, got a value whose feature axis is "
                           f"{feature.axis}")
    return feature.layout


def _check_tensors(
    b: Builder, node: fx.Node, name: str, m: nn.Module, allowed: set[str]
) -> dict[str, Tensor]:
    owned = b.owner(name, node)
    extra = set(owned) - allowed
    if extra:
        raise b.fail(node, f"{type(m).__name__} has unexpected tensors {sorted(extra)}")
    return owned


@module_rule(nn.modules.conv._ConvNd)
def conv(b: Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    if m.transposed:
        raise b.fail(node, "transposed convs are not supported")
    _check_tensors(b, node, name, m, {"weight", "bias"})
    if len(b.shape(node.args[0])) != m.weight.dim():
        raise b.fail(node, f"conv applied to shape {b.shape(node.args[0])}")
    layout = expect_axis(b, node, feature, 1, "a conv")
    weight = dotted(name, "weight")
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
        b.record(dotted(name, "bias"), 0, out)
    return Feature(out, 1)


@module_rule(nn.Linear)
def linear(b: Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    _check_tensors(b, node, name, m, {"weight", "bias"})
    layout = expect_axis(b, node, feature, -1, "a Linear layer")
    out = b.new(name, m.out_features)
    b.record(dotted(name, "weight"), 0, out)
    b.record(dotted(name, "weight"), 1, layout)
    if m.bias is not None:
        b.record(dotted(name, "bias"), 0, out)
    return Feature(out, len(b.shape(node)) - 1)


def per_unit_tensors(b: Builder, node: fx.Node, name: str, m: nn.Module, layout: Layout) -> None:
    """Every tensor a norm owns is per unit (num_batches_tracked aside)."""
    size = b.layout_size(layout)
    for attr, t in b.owner(name, node).items():
        if t.dim() == 0 and not t.is_floating_point():
            continue  # num_batches_tracked
        if t.dim() != 1 or t.shape[0] != size:
            raise b.fail(node, f"{type(m).__name__}.{attr} of shape {tuple(t.shape)} is not per-channel")
        b.record(dotted(name, attr), 0, layout)
    children_ok = all(
        module_rule_for(c) is pass_through_module and next(c.parameters(), None) is None for c in m.children()
    )
    if not children_ok:  # e.g. BatchNormAct2d's act/drop must be parameter-free elementwise ops
        raise b.fail(node, f"{type(m).__name__} '{name}' has non-elementwise children")


@module_rule(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
def channel_norm(b: Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    per_unit_tensors(b, node, name, m, expect_axis(b, node, feature, 1, type(m).__name__))
    return feature


@module_rule(nn.GroupNorm)
def group_norm(b: Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    layout = expect_axis(b, node, feature, 1, "GroupNorm")
    if m.num_groups not in (1, m.num_channels):  # statistics per group: channels must stay in their group
        if len(layout) != 1:
            raise b.fail(node, "GroupNorm over concatenated channels is not supported")
        b.spaces.constrain(layout[0][0], m.num_groups, describe(node))
    per_unit_tensors(b, node, name, m, layout)
    return feature


@module_rule(nn.LayerNorm)
def layer_norm(b: Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    """LayerNorm over the last dim (tokens, channels-last maps): mean and variance ignore the unit order."""
    if len(m.normalized_shape) != 1:
        raise b.fail(node, f"LayerNorm over {tuple(m.normalized_shape)} (more than the feature axis)")
    per_unit_tensors(b, node, name, m, expect_axis(b, node, feature, -1, "LayerNorm"))
    return feature


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


def _first(b: Builder, node: fx.Node, inputs: list[fx.Node]) -> fx.Node:
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if source is None or source not in b.value:
        raise b.fail(node, "expected a tensor as the first argument")
    return source


@op_rule(*_UNARY)
def unary(b: Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
    source = _first(b, node, inputs)
    if node.target != "type_as" and len(inputs) > 1:
        raise b.fail(node, "takes several tensors")
    return _same_units(b, node, source, b.value[source])


@op_rule(*_BINARY)
def binary(b: Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
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
        layout = b.join(layout, carried[1][0].layout, describe(node))
    for f, s, _ in features:  # a plain tensor with several values along the units would tell them apart
        if f.layout is None and -pos <= len(s) and s[pos] > 1:
            raise b.fail(node, f"scales the units by a tensor of shape {s} that is not a channel of the "
                               "model")
    return Feature(layout, pos + out_rank)


def _reshaped(b: Builder, node: fx.Node, source: fx.Node, feature: Feature) -> Feature:
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
def reshape(b: Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
    source = _first(b, node, inputs)
    return _reshaped(b, node, source, b.value[source])


@op_rule(torch.transpose, torch.permute, "transpose", "permute", "swapaxes")
def move_axes(b: Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
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
def cat(b: Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
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
        layout = b.join(layout, f.layout, describe(node))
    return Feature(layout, features[0].axis)


@op_rule(torch.mean, "mean", torch.sum, "sum", torch.amax, "amax")
def reduce(b: Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
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
def getitem(b: Builder, node: fx.Node, inputs: list[fx.Node]) -> Feature:
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
