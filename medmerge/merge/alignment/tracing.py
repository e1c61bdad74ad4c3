"""The permutation spec of a model: traced with torch.fx, run once on a dummy input for every value's shape,
and its graph walked with the rules."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import Tensor, fx, nn

from medmerge.merge.alignment import rules_timm, rules_torch  # noqa: F401 - they register the rules
from medmerge.merge.alignment.builder import Builder, Feature, assemble_spec, describe
from medmerge.merge.alignment.rules import module_rule_for, op_rule_for
from medmerge.merge.alignment.spec import UNSUPPORTED_HINT, AlignmentError, PermutationSpec


class _Tracer(fx.Tracer):
    """Leaves: modules with a rule, timm's no-trace modules and torch.nn's own modules. Everything else,
    parameter owners included (ConvNeXt blocks, LayerScale), is traced through."""

    def __init__(self, notrace_modules: Iterable[type[nn.Module]], autowrap_functions: Iterable[Any]) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._notrace = tuple(notrace_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_rule_for(m) is not None:
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
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        try:
            graph = _Tracer(get_notrace_modules(), get_notrace_functions()).trace(model)
        except Exception as error:  # noqa: BLE001 - any tracing failure means: cannot derive a spec
            raise AlignmentError(
                f"torch.fx could not trace {type(model).__name__}: {error}. {UNSUPPORTED_HINT}"
            ) from error
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
                f"{error}. {UNSUPPORTED_HINT}"
            ) from error
    finally:
        for m, training in modes.items():
            m.train(training)
    builder = Builder(model, recorder.shapes)
    _walk(builder, gm.graph)
    return assemble_spec(builder)


def _walk(b: Builder, graph: fx.Graph) -> None:
    """Give every node's value its feature axis: the input's, a parameter's own, or the one its module's
    or op's rule gives."""
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
                        b.spaces.union(sid, 0, describe(node))
        elif node.op == "call_module":
            name = str(node.target)
            m = b.modules[name]
            inputs = b.tensor_args(node)
            rule = module_rule_for(m)
            if rule is None:
                raise b.fail(node, f"unsupported module {type(m).__name__} '{name}'")
            if len(inputs) != 1 or node.args[0] is not inputs[0]:
                raise b.fail(node, f"module {type(m).__name__} must be called on exactly one tensor")
            b.value[node] = rule(b, node, name, m, b.value[inputs[0]])
        else:
            inputs = b.tensor_args(node)
            rule = op_rule_for(node.target)
            if shape is None and (not inputs or node.target in (getattr, "size", "dim")):
                continue  # shape/metadata arithmetic, no channels involved
            if rule is None:
                if not inputs:
                    b.value[node] = Feature(None, 0)  # a new tensor (torch.zeros...): no units
                    continue
                raise b.fail(node, "this op can reorder or mix channels and is not supported")
            b.value[node] = rule(b, node, inputs)
