"""Rules for timm modules: its elementwise layers, and layers traced as a whole (whose forward torch.fx
cannot follow)."""

from __future__ import annotations

from timm.layers import LayerNorm2d, activations, activations_me, drop, resample_abs_pos_embed
from timm.models.vgg import ConvMlp as VggConvMlp
from timm.models.vision_transformer import Attention
from torch import fx, nn

from medmerge.merge.alignment.builder import Builder, Feature, dotted
from medmerge.merge.alignment.rules import module_rule, module_rule_for, op_rule
from medmerge.merge.alignment.rules_torch import (
    conv,
    expect_axis,
    linear,
    pass_through_module,
    per_unit_tensors,
    unary,
)

_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    activations.GELU, activations.GELUTanh, activations.HardMish, activations.HardSigmoid,
    activations.HardSwish, activations.Mish, activations.PReLU, activations.QuickGELU, activations.Sigmoid,
    activations.Swish, activations.Tanh,
    activations_me.HardMishMe, activations_me.HardSigmoidMe, activations_me.HardSwishMe,
    activations_me.MishMe, activations_me.SwishMe,
    drop.DropBlock2d, drop.DropPath,
)  # fmt: skip
"""Every module class of timm's activation and drop modules (its ``*Pool2dSame`` have the torch pools'
rule); PReLU among them, so that the pass-through rule refuses it for its weight."""

module_rule(*_ELEMENTWISE)(pass_through_module)
op_rule(resample_abs_pos_embed)(unary)  # a ViT's position table interpolated per channel (dynamic_img_size)


@module_rule(LayerNorm2d)
def layer_norm_2d(b: Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    per_unit_tensors(b, node, name, m, expect_axis(b, node, feature, 1, "LayerNorm2d"))
    return feature


@module_rule(VggConvMlp)
def vgg_conv_mlp(b: Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    """VGG's pre-logits: (adaptive pool to >= 7x7) fc1 conv -> act -> drop -> fc2 1x1 conv -> act."""
    for child in ("act1", "drop", "act2"):
        if module_rule_for(getattr(m, child)) is not pass_through_module:
            raise b.fail(node, f"{name}.{child} is not an elementwise op")
    hidden = conv(b, node, dotted(name, "fc1"), m.fc1, feature)
    return conv(b, node, dotted(name, "fc2"), m.fc2, hidden)


@module_rule(Attention)
def attention(b: Builder, node: fx.Node, name: str, m: nn.Module, feature: Feature) -> Feature:
    """Multi-head self-attention: the heads may be permuted (q, k and v together), and inside a head the
    dims of q and k together, and the dims of v with the output projection's inputs."""
    for child in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(m, child), nn.Identity):
            raise b.fail(node, f"attention with {child} ({type(getattr(m, child)).__name__}) is not "
                               "supported")
    if getattr(m, "gate", None) is not None:
        raise b.fail(node, "gated attention is not supported")
    layout = expect_axis(b, node, feature, -1, "attention")
    heads, dim = m.num_heads, m.num_heads * m.head_dim
    qk = b.new(dotted(name, "qk"), dim, groups=heads, tie=dotted(name, "heads"))
    v = b.new(dotted(name, "v"), dim, groups=heads, tie=dotted(name, "heads"))
    qkv = dotted(name, "qkv")
    b.owner(qkv, node)
    b.record(dotted(qkv, "weight"), 0, qk + qk + v)
    b.record(dotted(qkv, "weight"), 1, layout)
    if m.qkv.bias is not None:
        b.record(dotted(qkv, "bias"), 0, qk + qk + v)
    return linear(b, node, dotted(name, "proj"), m.proj, Feature(v, feature.axis))
