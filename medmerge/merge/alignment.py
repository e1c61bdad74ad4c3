"""Permutation alignment of same-architecture CNNs by weight matching (Git Re-Basin).

A *space* is a set of hidden channels that must be permuted together for the network to compute the same
function: the output channels of a conv/linear layer, plus every tensor axis that reads or carries those
channels (the next layer's input axis, a norm's per-channel parameters and running statistics, a
depthwise conv's channels, every branch joined to it by a residual add or a gating multiply). The spaces
are derived from the model itself: it is traced with ``torch.fx`` (parameter-owning layers and timm's
no-trace modules/functions are leaves), run once on a dummy input to learn every value's shape, and the
channel axis (dim 1) of every value is followed through the graph with union-find:

* the image input and the graph output (the logits) are FIXED; a space joined to FIXED is not permuted;
* a conv (groups=1) or linear layer starts a new space: weight axis 0 and bias are in it, weight axis 1
  is in its input's space;
* a depthwise conv and a per-channel norm (BatchNorm, timm BatchNormAct2d, GroupNorm with 1 or C groups,
  InstanceNorm) keep their input's space, with all their per-channel tensors on axis 0;
* an elementwise binary op on two tensors (add/sub/mul/div, operator, torch or method form, in place or
  not) joins its inputs' spaces; with one tensor and a scalar it passes the space through, as do
  activations, dropout, pooling, padding, spatial means and ``flatten(1)`` of a 1x1 map;
* anything that can reorder or mix channels (cat, split, reshape, permute, matmul, indexing, other grouped
  convs, LayerNorm, attention, parameters used outside a layer, unknown modules) raises AlignmentError.

Weight matching (Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation
Symmetries", ICLR 2023, arXiv:2209.04836, Algorithm 1) then permutes ``other`` towards ``anchor``:
starting from identities it visits the spaces in a random order and solves, for each, the linear
assignment maximising ``sum_(key, axis) <anchor[key], other[key] permuted>`` with every other axis held
at its current permutation, until a full sweep improves nothing. A permutation never changes the
function a model computes, only which of its units line up with the anchor's.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, fx, nn

__all__ = [
    "AlignmentError",
    "PermutationSpec",
    "alignment_similarity",
    "apply_permutations",
    "permutation_spec",
    "weight_matching",
]

_HINT = "weight-matching alignment supports CNNs built from conv/linear/norm layers (use merge.align: none)"


class AlignmentError(ValueError):
    """The model contains a layer or an operation whose channel symmetry alignment cannot follow."""


@dataclass(frozen=True)
class PermutationSpec:
    """The permutation symmetry of one architecture.

    Attributes:
        spaces: permutable space name (the module that creates it) -> number of channels.
        axes: space name -> every ``(state_dict key, axis)`` it permutes, BN running statistics included.
        key_axes: state_dict key -> per axis, the space permuting it or None (fixed / not permuted).
        weight_keys: the floating parameters among ``key_axes`` (what the matching cost and the
            similarity use; buffers are permuted but never matched on).
    """

    spaces: dict[str, int]
    axes: dict[str, list[tuple[str, int]]]
    key_axes: dict[str, tuple[str | None, ...]]
    weight_keys: tuple[str, ...]


# ----------------------------------------------------------------------------------------------- tracing

_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Flatten, nn.ZeroPad2d, nn.ConstantPad2d,
)  # fmt: skip
_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)

_UNARY_FUNCTIONS: set[Any] = {
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clip, torch.exp, torch.abs,
    torch.neg, torch.sqrt, torch.rsqrt, torch.square, torch.flatten, torch.clone, operator.neg,
    F.relu, F.relu_, F.relu6, F.silu, F.gelu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu,
    F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.pad,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
_UNARY_METHODS: set[str] = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_",
    "clamp_max", "clamp_max_", "clip", "clip_", "exp", "abs", "neg", "sqrt", "rsqrt", "square", "pow",
    "clone", "contiguous", "flatten", "float", "to", "type_as",
}  # fmt: skip
_BINARY_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum,
}  # fmt: skip
_BINARY_METHODS: set[str] = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
_MEAN = {torch.mean, "mean"}
_METADATA_METHODS = {"size", "dim"}


def _notrace() -> tuple[list[type[nn.Module]], list[Any]]:
    try:  # timm registers modules/functions that torch.fx cannot trace through (e.g. Conv2dSame padding)
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - timm is a dependency, but the tracer works without it
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


class _Tracer(fx.Tracer):
    """Leaves: modules owning parameters directly, timm's no-trace modules and torch.nn's own modules."""

    def __init__(self, notrace_modules: Iterable[type[nn.Module]], autowrap_functions: Iterable[Any]) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._notrace = tuple(notrace_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if next(m.parameters(recurse=False), None) is not None:
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


def _is_pass_through_module(m: nn.Module) -> bool:
    if isinstance(m, _ACTIVATIONS + _POOLS):
        return True
    module = type(m).__module__
    return module.startswith("timm.layers.activations") or module.startswith("timm.layers.pool2d_same")


def _supported_owner(m: nn.Module) -> str | None:
    """Why a module that owns parameters directly is unsupported, or None if it is supported."""
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.transposed:
            return "transposed conv"
        if m.groups != 1 and not (m.groups == m.in_channels == m.out_channels):
            return f"grouped conv (groups={m.groups}, in={m.in_channels}, out={m.out_channels})"
        return None
    if isinstance(m, (nn.Linear, *_NORMS)):
        return None
    if isinstance(m, nn.GroupNorm):
        if m.num_groups in (1, m.num_channels):
            return None
        return f"GroupNorm with {m.num_groups} groups over {m.num_channels} channels"
    return type(m).__name__


def _children_ok(m: nn.Module) -> bool:
    """A leaf layer's children (e.g. BatchNormAct2d's act/drop) must be parameter-free elementwise ops."""
    return all(_is_pass_through_module(c) and next(c.parameters(), None) is None for c in m.children())


def _prefix(name: str, attr: str) -> str:
    return f"{name}.{attr}" if name else attr


def _check_owners(model: nn.Module) -> None:
    problems = []
    for name, m in model.named_modules():
        owned = [n for n, _ in m.named_parameters(recurse=False)]
        if not owned:
            continue
        why = _supported_owner(m)
        if why is None and not _children_ok(m):
            why = f"{type(m).__name__} with non-elementwise children"
        if why is not None:
            problems.append(f"'{name or '<root>'}' ({why}; owns {', '.join(owned)})")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
        raise AlignmentError(f"unsupported modules for permutation alignment: {shown}. {_HINT}")


def _input_size(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if cfg.get("input_size"):
        return tuple(cfg["input_size"])
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return (first.in_channels if first is not None else 3, 224, 224)


# ----------------------------------------------------------------------------------------- union-find


class _Spaces:
    """Union-find over channel spaces; id 0 is FIXED (any size, never permuted)."""

    def __init__(self) -> None:
        self.parent: list[int] = [0]
        self.size: list[int | None] = [None]
        self.name: list[str] = ["<fixed>"]

    def new(self, name: str, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.name.append(name)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

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
        keep, drop = min(ra, rb), max(ra, rb)  # FIXED (0) wins, then the space created first
        self.parent[drop] = keep
        return keep


# ---------------------------------------------------------------------------------------------- spec


def _describe(node: fx.Node) -> str:
    target = node.target
    label = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return f"node '{node.name}' ({node.op} {label})"


def permutation_spec(model: nn.Module, input_size: tuple[int, ...] | None = None) -> PermutationSpec:
    """Derive the permutation symmetry of ``model`` from its torch.fx graph.

    Args:
        model: a CNN made of conv/linear/norm layers and channel-preserving ops (e.g. a timm ResNet or
            EfficientNet). It is not modified (it is traced and run once in eval mode, then restored).
        input_size: ``(C, H, W)`` of the dummy input used to learn shapes; default: the model's
            ``pretrained_cfg['input_size']``, else ``(in_channels of the first conv, 224, 224)``.

    Raises:
        AlignmentError: naming the first module or op whose channel handling cannot be followed.
    """
    _check_owners(model)
    notrace_modules, notrace_functions = _notrace()
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        try:
            graph = _Tracer(notrace_modules, notrace_functions).trace(model)
        except Exception as error:  # noqa: BLE001 - any tracing failure means: cannot derive a spec
            raise AlignmentError(
                f"torch.fx could not trace {type(model).__name__}: {error}. {_HINT}"
            ) from error
        gm = fx.GraphModule(model, graph)
        param = next(model.parameters(), torch.empty(0))
        size = input_size or _input_size(model)
        dummy = torch.zeros((1, *size), dtype=param.dtype, device=param.device)
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
    return _build_spec(model, gm, recorder.shapes)


def _build_spec(
    model: nn.Module, gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...] | None]
) -> PermutationSpec:
    spaces = _Spaces()
    value: dict[fx.Node, int] = {}  # tensor node -> space of its channel axis (dim 1)
    records: list[tuple[str, int, int]] = []  # (state_dict key, axis, space id)
    called: set[str] = set()
    modules = dict(model.named_modules())
    placeholders = 0

    def fail(node: fx.Node, why: str) -> AlignmentError:
        return AlignmentError(f"{_describe(node)}: {why}. {_HINT}")

    def tensor_args(node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
        return [a for a in found if shapes.get(a) is not None]

    def channels(node: fx.Node, shape: tuple[int, ...] | None) -> int:
        if shape is None or len(shape) < 2:
            raise fail(node, f"expected a tensor with a channel axis (N, C, ...), got shape {shape}")
        return shape[1]

    def pass_through(node: fx.Node, source: fx.Node) -> None:
        cin, cout = channels(node, shapes[source]), channels(node, shapes[node])
        if cin != cout:
            raise fail(node, f"changes the channel axis from {cin} to {cout} (mixes or reorders channels)")
        value[node] = value[source]

    for node in gm.graph.nodes:
        out_shape = shapes.get(node)
        if node.op == "placeholder":
            placeholders += 1
            if placeholders > 1:
                raise fail(node, "models with more than one input are not supported")
            value[node] = 0
        elif node.op == "get_attr":
            raise fail(node, "a parameter or buffer is used outside a conv/linear/norm layer")
        elif node.op == "output":
            for arg in tensor_args(node):
                spaces.union(value[arg], 0, _describe(node))
        elif node.op == "call_module":
            name = str(node.target)
            m = modules[name]
            inputs = tensor_args(node)
            if len(inputs) != 1 or len(node.args) != 1 or node.kwargs:
                raise fail(node, f"module {type(m).__name__} must be called on exactly one tensor")
            source = inputs[0]
            owned = dict(m.named_parameters(recurse=False)) | dict(m.named_buffers(recurse=False))
            if owned:
                if name in called:
                    raise fail(node, f"module '{name}' is called more than once (shared weights)")
                called.add(name)
            in_shape = shapes[source]
            if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
                weight = m.weight
                if isinstance(m, nn.Linear) and (in_shape is None or len(in_shape) != 2):
                    raise fail(
                        node, f"Linear applied to shape {in_shape}: only (N, features) inputs are followed"
                    )
                if isinstance(m, nn.modules.conv._ConvNd) and (
                    in_shape is None or len(in_shape) != weight.dim()
                ):
                    raise fail(node, f"conv applied to shape {in_shape}")
                extra = set(owned) - {"weight", "bias"}
                if extra:
                    raise fail(node, f"{type(m).__name__} has unexpected tensors {sorted(extra)}")
                if getattr(m, "groups", 1) == 1:
                    out = spaces.new(name, weight.shape[0])
                    records += [
                        (_prefix(name, "weight"), 0, out),
                        (_prefix(name, "weight"), 1, value[source]),
                    ]
                else:  # depthwise (other grouped convs were rejected by _check_owners)
                    out = value[source]
                    records.append((_prefix(name, "weight"), 0, out))
                if m.bias is not None:
                    records.append((_prefix(name, "bias"), 0, out))
                value[node] = out
                if channels(node, out_shape) != weight.shape[0]:
                    raise fail(node, f"output has {out_shape[1]} channels, weight {tuple(weight.shape)}")
            elif isinstance(m, (*_NORMS, nn.GroupNorm)):
                c = channels(node, in_shape)
                for attr, t in owned.items():
                    if t.dim() == 0 and not t.is_floating_point():
                        continue  # num_batches_tracked
                    if t.dim() != 1 or t.shape[0] != c:
                        raise fail(
                            node, f"{type(m).__name__}.{attr} of shape {tuple(t.shape)} is not per-channel"
                        )
                    records.append((_prefix(name, attr), 0, value[source]))
                pass_through(node, source)
            elif not owned and _is_pass_through_module(m):
                pass_through(node, source)
            else:
                raise fail(node, f"unsupported module {type(m).__name__} '{name}'")
        else:  # call_function / call_method
            target = node.target
            inputs = tensor_args(node)
            is_method = node.op == "call_method"
            if (target in _BINARY_FUNCTIONS and not is_method) or (is_method and target in _BINARY_METHODS):
                if len(inputs) == 1:
                    pass_through(node, inputs[0])
                elif len(inputs) == 2:
                    a, b = inputs
                    sa, sb = shapes[a], shapes[b]
                    if len(sa) != len(sb):
                        raise fail(node, f"broadcasts shapes {sa} and {sb} of different ranks")
                    ca, cb = channels(node, sa), channels(node, sb)
                    if ca == cb:
                        value[node] = spaces.union(value[a], value[b], _describe(node))
                    elif cb == 1:
                        value[node] = value[a]
                    elif ca == 1:
                        value[node] = value[b]
                    else:
                        raise fail(node, f"combines {ca} and {cb} channels")
                    channels(node, out_shape)
                else:
                    raise fail(node, f"elementwise op on {len(inputs)} tensors")
            elif target in _MEAN and (target == "mean") == is_method:
                dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
                rank = len(shapes[inputs[0]] or ())
                dims = [dims] if isinstance(dims, int) else dims
                if dims is None or any(d % max(rank, 1) in (0, 1) for d in dims) or len(inputs) != 1:
                    raise fail(node, f"mean over dims {dims} reduces the batch or channel axis")
                pass_through(node, inputs[0])
            elif (target in _UNARY_FUNCTIONS and not is_method) or (is_method and target in _UNARY_METHODS):
                if not inputs:
                    raise fail(node, "no tensor input")
                if target == "type_as" or len(inputs) == 1:
                    pass_through(node, node.args[0] if is_method else inputs[0])
                else:
                    raise fail(node, "takes several tensors")
            elif out_shape is None and (
                not inputs or target is getattr or (is_method and target in _METADATA_METHODS)
            ):
                pass  # shape/metadata arithmetic, no channels involved
            else:
                raise fail(node, "this op can reorder or mix channels and is not supported")

    return _assemble(model, spaces, records)


def _assemble(model: nn.Module, spaces: _Spaces, records: list[tuple[str, int, int]]) -> PermutationSpec:
    state = model.state_dict(keep_vars=True)
    params = {name for name, _ in model.named_parameters()}
    sizes: dict[str, int] = {}
    axes: dict[str, list[tuple[str, int]]] = {}
    key_axes: dict[str, list[str | None]] = {}
    for key, axis, sid in records:
        tensor = state[key]
        root = spaces.find(sid)
        slot = key_axes.setdefault(key, [None] * tensor.dim())
        if root == 0 or spaces.size[root] == 1:  # fixed, or a single channel: nothing to permute
            continue
        name = spaces.name[root]
        if tensor.shape[axis] != spaces.size[root]:
            raise AlignmentError(
                f"'{key}' axis {axis} has size {tensor.shape[axis]} but its channel space '{name}' has "
                f"{spaces.size[root]} channels. {_HINT}"
            )
        sizes[name] = int(spaces.size[root])
        slot[axis] = name
        axes.setdefault(name, []).append((key, axis))
    key_axes_t = {k: tuple(v) for k, v in key_axes.items() if any(s is not None for s in v)}
    weights = tuple(k for k in key_axes_t if k in params and state[k].is_floating_point())
    return PermutationSpec(spaces=sizes, axes=axes, key_axes=key_axes_t, weight_keys=weights)


# ------------------------------------------------------------------------------------ weight matching


def _matched_keys(spec: PermutationSpec, anchor: dict[str, Tensor], other: dict[str, Tensor]) -> list[str]:
    """Weight keys present in both states with equal shapes (differently sized heads are skipped)."""
    return [k for k in spec.weight_keys if k in anchor and k in other and anchor[k].shape == other[k].shape]


def _permute(
    tensor: Tensor, spaces: tuple[str | None, ...], perms: dict[str, Tensor], skip: int = -1
) -> Tensor:
    for axis, space in enumerate(spaces):
        if axis != skip and space is not None and space in perms:
            tensor = tensor.index_select(axis, perms[space].to(tensor.device))
    return tensor


def weight_matching(
    spec: PermutationSpec,
    anchor: dict[str, Tensor],
    other: dict[str, Tensor],
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Permutations of ``other``'s units that maximise its inner product with ``anchor`` (Git Re-Basin).

    Returns space name -> int64 permutation ``p`` (CPU): unit ``i`` of the aligned model is unit ``p[i]``
    of ``other``; pass it to :func:`apply_permutations`. Only floating parameters present in both states
    with equal shapes enter the cost; a space with none of them keeps the identity.
    """
    keys = _matched_keys(spec, anchor, other)
    wanted = set(keys)
    a64 = {k: anchor[k].detach().to("cpu", torch.float64) for k in keys}
    b64 = {k: other[k].detach().to("cpu", torch.float64) for k in keys}
    names = list(spec.spaces)
    perms = {s: torch.arange(spec.spaces[s]) for s in names}
    terms = {
        s: [
            (k, axis, a64[k].movedim(axis, 0).reshape(spec.spaces[s], -1))
            for k, axis in spec.axes[s]
            if k in wanted
        ]
        for s in names
    }
    # A space's cost only changes when a space it shares a tensor with changes: skip it otherwise (exact).
    neighbours = {s: set() for s in names}
    for s in names:
        for k, axis, _ in terms[s]:
            neighbours[s].update(o for i, o in enumerate(spec.key_axes[k]) if o is not None and i != axis)
    changed_at = {s: 0 for s in names}
    solved_at = {s: -1 for s in names}
    step = 0
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        progress = False
        for index in torch.randperm(len(names), generator=generator).tolist():
            space = names[index]
            n = spec.spaces[space]
            step += 1
            if not terms[space] or (
                solved_at[space] >= 0 and all(changed_at[o] < solved_at[space] for o in neighbours[space])
            ):
                continue
            solved_at[space] = step
            cost = torch.zeros(n, n, dtype=torch.float64)
            for key, axis, a in terms[space]:
                b = _permute(b64[key], spec.key_axes[key], perms, skip=axis)
                cost += a @ b.movedim(axis, 0).reshape(n, -1).T
            _, columns = linear_sum_assignment(cost.numpy(), maximize=True)
            rows = torch.arange(n)
            new_perm = torch.from_numpy(np.asarray(columns, dtype=np.int64))
            old, new = cost[rows, perms[space]].sum().item(), cost[rows, new_perm].sum().item()
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[space] = new_perm
                changed_at[space] = step
                progress = True
        if not progress:
            break
    return perms


def apply_permutations(
    spec: PermutationSpec, perms: dict[str, Tensor], state: dict[str, Tensor]
) -> dict[str, Tensor]:
    """A new state dict with every spec'd axis permuted (``out = t.index_select(axis, perm)``).

    Keys outside the spec (num_batches_tracked, the logits axis of the head, ...) are returned unchanged;
    spaces missing from ``perms`` keep the identity.
    """
    unknown = set(perms) - set(spec.spaces)
    if unknown:
        raise ValueError(f"permutations for spaces not in the spec: {sorted(unknown)[:5]}")
    for space, perm in perms.items():
        n = spec.spaces[space]
        if perm.shape != (n,) or not torch.equal(torch.sort(perm.cpu()).values, torch.arange(n)):
            raise ValueError(f"permutation for space '{space}' is not a permutation of {n} units")
    out = {}
    for key, tensor in state.items():
        spaces = spec.key_axes.get(key)
        if spaces is not None:
            if tensor.dim() != len(spaces):
                raise ValueError(f"'{key}' has {tensor.dim()} axes, the spec expects {len(spaces)}")
            for axis, space in enumerate(spaces):
                if space is not None and tensor.shape[axis] != spec.spaces[space]:
                    raise ValueError(
                        f"'{key}' axis {axis} has size {tensor.shape[axis]}, space '{space}' "
                        f"has {spec.spaces[space]}"
                    )
            tensor = _permute(tensor, spaces, perms)
        out[key] = tensor
    return out


def alignment_similarity(spec: PermutationSpec, anchor: dict[str, Tensor], other: dict[str, Tensor]) -> float:
    """Sum over the spec'd weights (present in both with equal shapes) of ``<anchor[k], other[k]>``."""
    total = 0.0
    for key in _matched_keys(spec, anchor, other):
        a = anchor[key].detach().to("cpu", torch.float64)
        total += float((a * other[key].detach().to("cpu", torch.float64)).sum())
    return total
