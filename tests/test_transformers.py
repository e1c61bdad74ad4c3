"""Vision Transformers through the kernel merge: explicit per-kernel sums, granularities, gradients, mismatches.

What one *kernel* (one coefficient per source) is for each ViT parameter kind at ``granularity: kernel``
(the rule is the same as for CNNs: one coefficient per index of the first axis; D = embedding width,
T = tokens, p = patch size):

    parameter                                  shape          one kernel                       coefficients
    cls_token                                  (1, 1, D)      the whole class token            1
    pos_embed                                  (1, T, D)      the whole position table         1
    patch_embed.proj.weight (conv)             (D, 3, p, p)   one patch filter = one channel   D
    attn.qkv.weight (fused)                    (3D, D)        one output row: rows [0, D) are  3D
                                                              query, [D, 2D) key, [2D, 3D)
                                                              value features (each head's
                                                              head_dim rows contiguous)
    attn.proj.weight, mlp.fc2.weight           (D, D|4D)      one output row (residual chan.)  D
    mlp.fc1.weight                             (4D, D)        one output row (hidden unit)     4D
    every bias, norm*.weight/bias, ls*.gamma   (n,)           one channel                      n
    head.weight, head.bias                     -              not merged: learned directly     -

The first axis of ``cls_token``/``pos_embed`` is a size-1 broadcast axis, so at ``kernel`` each is blended
by one coefficient. For the class token that is exactly one kernel (a single D-vector, like one row of a
linear layer); the position table is blended as a whole (``slice`` gives it one coefficient per token).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from medmerge.config import MergeSettings
from medmerge.device import Runtime
from medmerge.merge.coefficients import GRANULARITIES, initial_weights, resolve_normalizer
from medmerge.merge.functional import KernelMerge, SourceMismatchError
from medmerge.models import StateDictMismatchError, create_model, head_keys, load_backbone
from medmerge.pipeline import build_kernel_merge, collapse

ARCH = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "depth": 2}  # D = 192, 3 heads, T = 1 + 16 tokens, two blocks
D, TOKENS, NUM_CLASSES = 192, 17, 3
TOKEN_PARAMETERS = ("cls_token", "pos_embed")  # first axis of size 1: the whole tensor is one kernel
QKV, NORM = "blocks.0.attn.qkv.weight", "blocks.0.norm1.weight"


def vit(num_classes: int = NUM_CLASSES, **overrides) -> nn.Module:
    return create_model(ARCH, num_classes=num_classes, **{**TINY, **overrides})


def vit_sources(count: int, **overrides) -> list[dict[str, Tensor]]:
    """One state dict per seed; source heads differ from the target's (they are never merged).

    Every tensor is perturbed: at init all biases are 0 and all norm weights 1 in every source, and a blend
    of equal tensors is constant in its coefficients (no gradient, nothing to check per channel)."""
    states = []
    for index in range(count):
        torch.manual_seed(100 + index)
        model = vit(num_classes=1000 + index, **overrides)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter), alpha=0.05)
        states.append(model.state_dict())
    return states


def build(count: int, granularity: str = "kernel", sources: list[dict] | None = None) -> tuple[KernelMerge, list]:
    sources = vit_sources(count) if sources is None else sources
    torch.manual_seed(0)
    skeleton = vit()
    merge = KernelMerge(skeleton, sources, [f"s{i}" for i in range(count)], head_keys(skeleton), granularity,
                        resolve_normalizer("auto", count), initial_weights(count, 0, 0.5))
    with torch.no_grad():  # non-trivial coefficients: every row gets its own blend
        for logits in merge.logits.values():
            logits.normal_(0, 1.5)
    return merge, sources


def inputs(batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def kernels(key: str, shape: tuple[int, ...]) -> list:
    """The index of every kernel of a parameter at granularity ``kernel`` (see the module docstring)."""
    if key in TOKEN_PARAMETERS:
        return [...]
    return list(range(shape[0]))  # conv filter / linear output row (qkv included) / norm or bias channel


def weights_by_hand(logits: Tensor) -> list[Tensor]:
    """Per-source weights from raw logits: sigmoid for one logit (two sources), else softmax."""
    if logits.shape[0] == 1:
        first = 1 / (1 + torch.exp(-logits[0]))
        return [first, 1 - first]
    exp = torch.exp(logits - logits.max(dim=0).values)
    return list(exp / exp.sum(dim=0))


@torch.no_grad()
def explicit_state(merge: KernelMerge, sources: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The skeleton's state with every backbone tensor replaced by ``sum_i w_i * W_i``, kernel by kernel."""
    groups = merge.group_weights()
    state = {key: value.clone() for key, value in merge.skeleton.state_dict().items()}
    for key in merge.merged_keys:
        by_hand = weights_by_hand(merge.logits[key.replace(".", "__")])
        torch.testing.assert_close(torch.stack(by_hand), groups[key])
        shape = tuple(sources[0][key].shape)
        index_list = kernels(key, shape)
        flat = [w.reshape(-1) for w in by_hand]
        assert flat[0].numel() == len(index_list), key  # one coefficient per kernel, no more, no fewer
        total = torch.empty(shape)
        for k, index in enumerate(index_list):
            total[index] = sum(float(w[k]) * source[key][index] for w, source in zip(flat, sources, strict=True))
        state[key] = total
    return state


@pytest.mark.parametrize("count", [2, 3])  # sigmoid (one logit) for two sources, softmax for three
def test_vit_kernel_merge_equals_explicit_per_row_weighted_sum(count: int) -> None:
    merge, sources = build(count)
    assert merge.head_keys == ["head.weight", "head.bias"]
    assert {"cls_token", "pos_embed", QKV, "blocks.0.attn.qkv.bias", "norm.weight"} <= set(merge.merged_keys)
    qkv_weights = merge.group_weights()[QKV][0].flatten()
    assert qkv_weights.shape == (3 * D,) and qkv_weights.std() > 0.1  # rows really are blended differently

    expected_state = explicit_state(merge, sources)
    plain = vit()
    plain.load_state_dict(expected_state, strict=True)
    x = inputs()
    merge.eval()
    with torch.no_grad():
        expected = plain.eval()(x)
        actual = merge(x)
        for source in sources:  # the merge is none of its sources
            assert not torch.equal(expected_state[QKV], source[QKV])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)

    collapsed = merge.collapsed_state_dict()
    for key in merge.merged_keys:
        torch.testing.assert_close(collapsed[key], expected_state[key], rtol=1e-5, atol=1e-6)
    fresh = vit()
    fresh.load_state_dict(collapsed, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=1e-4, atol=1e-5)


# coefficient shape (without the source axis) of: qkv (3D, D), layer norm (D,), pos_embed (1, T, D), cls (1, 1, D)
EXPECTED_SHAPES = {
    "kernel": {QKV: (3 * D, 1), NORM: (D,), "pos_embed": (1, 1, 1), "cls_token": (1, 1, 1)},
    "slice": {QKV: (3 * D, D), NORM: (D,), "pos_embed": (1, TOKENS, 1), "cls_token": (1, 1, 1)},
    "layer": {QKV: (1, 1), NORM: (1,), "pos_embed": (1, 1, 1), "cls_token": (1, 1, 1)},
    "model": {QKV: (), NORM: (), "pos_embed": (), "cls_token": ()},  # one scalar per source, shared
}


@pytest.mark.parametrize("granularity", sorted(GRANULARITIES))
def test_each_granularity_builds_on_vit_with_the_expected_coefficient_shapes(granularity: str) -> None:
    assert set(EXPECTED_SHAPES) == set(GRANULARITIES)
    merge, sources = build(3, granularity)
    weights = merge.group_weights()
    for key, shape in EXPECTED_SHAPES[granularity].items():
        assert weights[merge.group_of[key]].shape == (3, *shape), key
    if granularity == "model":
        assert set(merge.group_of.values()) == {"model"} and list(weights) == ["model"]
    else:
        assert len(weights) == len(merge.merged_keys)  # one group per tensor
    merged = merge.merged_parameters()  # every blend keeps its tensor's shape, so the forward runs
    assert {key: tuple(v.shape) for key, v in merged.items()} == {k: tuple(sources[0][k].shape) for k in merged}
    with torch.no_grad():
        assert merge.eval()(inputs()).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("granularity,count", [("kernel", 2), ("kernel", 3), ("slice", 3), ("layer", 2),
                                               ("model", 3)])
def test_gradients_reach_every_coefficient_group(granularity: str, count: int) -> None:
    merge, _ = build(count, granularity)
    merge.train()
    loss = nn.functional.cross_entropy(merge(inputs(4)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for name, logits in merge.logits.items():
        assert logits.grad is not None and logits.grad.abs().sum() > 0, name
        if count > 2:  # softmax is shift-invariant across sources: per coefficient the grads sum to zero
            torch.testing.assert_close(logits.grad.sum(dim=0), torch.zeros_like(logits.grad[0]),
                                       rtol=0, atol=1e-6)
    if granularity == "kernel":  # every single qkv row (query, key and value features) learns
        assert (merge.logits[QKV.replace(".", "__")].grad.abs().flatten(1) > 0).all()
    head = dict(merge.skeleton.named_parameters())
    assert all(head[key].grad is not None for key in merge.head_keys)
    assert all(p.grad is None for holder in merge.sources for p in holder.parameters())  # sources are frozen


@pytest.mark.parametrize("overrides,message", [
    ({"embed_dim": 96}, r"source 's1' parameter 'cls_token' has shape \(1, 1, 96\), expected \(1, 1, 192\)"),
    ({"mlp_ratio": 2.0},
     r"source 's1' parameter 'blocks\.0\.mlp\.fc1\.weight' has shape \(384, 192\), expected \(768, 192\)"),
    ({"depth": 1}, r"source 's1' has no parameter 'blocks\.1\.norm1\.weight'"),
    ({"depth": 3}, r"source 's1' has parameter 'blocks\.2\.norm1\.weight' that the architecture lacks"),
    ({"qkv_bias": False}, r"source 's1' has no parameter 'blocks\.0\.attn\.qkv\.bias'"),
])
def test_differently_shaped_vit_source_names_the_first_differing_parameter(overrides: dict, message: str) -> None:
    sources = vit_sources(1) + vit_sources(1, **overrides)
    with pytest.raises(SourceMismatchError, match=message):
        build(2, sources=sources)


def test_vit_head_keys_and_load_backbone() -> None:
    model = vit()
    assert head_keys(model) == ["head.weight", "head.bias"]
    pooled = vit(global_pool="avg", class_token=False)  # fc_norm is backbone, not head
    assert "fc_norm.weight" in pooled.state_dict() and head_keys(pooled) == ["head.weight", "head.bias"]

    source = vit_sources(1)[0]  # a 1000-class ViT
    fresh_head = {key: model.state_dict()[key].clone() for key in head_keys(model)}
    report = load_backbone(model, source)
    assert report.missing == report.unexpected == ["head.weight", "head.bias"]
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in source.items() if not key.startswith("head."))
    assert all(torch.equal(state[key], value) for key, value in fresh_head.items())  # the new head stays
    assert state["head.weight"].shape == (NUM_CLASSES, D)
    with pytest.raises(StateDictMismatchError, match="cls_token"):
        load_backbone(vit(), vit_sources(1, embed_dim=96)[0])


def test_pipeline_builds_and_collapses_a_vit_merge() -> None:
    """build_kernel_merge + collapse on timm's registered tiny ViT (no size overrides needed)."""
    states = []
    for seed in range(2):
        torch.manual_seed(100 + seed)
        states.append(create_model("test_vit", num_classes=10).state_dict())
    merge = build_kernel_merge("test_vit", states, ["s0", "s1"], NUM_CLASSES, MergeSettings(anchor="s0"))
    assert merge.head_keys == ["head.weight", "head.bias"]
    with torch.no_grad():
        for logits in merge.logits.values():
            logits.normal_(0, 1.5)
    model = collapse(merge, "test_vit", NUM_CLASSES, None, Runtime(torch.device("cpu")))
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), merge.eval()(x), rtol=1e-4, atol=1e-5)
