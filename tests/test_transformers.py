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
import timm
import torch
from torch import Tensor, nn
from torch.func import functional_call

from medmerge.config import MergeSettings
from medmerge.device import Runtime
from medmerge.merge.coefficients import GRANULARITIES, GranularityError, initial_weights, resolve_normalizer
from medmerge.merge.collapse import collapse
from medmerge.merge.functional import KernelMerge, SourceMismatchError
from medmerge.methods.medmerge import build_learned_merge
from medmerge.models import StateDictMismatchError, create_model, head_keys, load_backbone
from medmerge.report import layerwise

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


def two_test_vits() -> list[dict[str, torch.Tensor]]:
    """timm's registered tiny ViT from two seeds (no size overrides needed)."""
    states = []
    for seed in range(2):
        torch.manual_seed(100 + seed)
        states.append(create_model("test_vit", num_classes=10).state_dict())
    return states


def collapse_equals_functional_forward(merge) -> None:
    """Random coefficients, then ``collapse`` gives the functional merge's outputs."""
    with torch.no_grad():
        for logits in merge.logits.values():
            logits.normal_(0, 1.5)
    model = collapse(merge, "test_vit", NUM_CLASSES, None, Runtime(torch.device("cpu")))
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), merge.eval()(x), rtol=1e-4, atol=1e-5)


def test_pipeline_builds_and_collapses_a_vit_merge() -> None:
    """build_learned_merge + collapse on timm's registered tiny ViT."""
    merge = build_learned_merge("test_vit", two_test_vits(), ["s0", "s1"], NUM_CLASSES, MergeSettings(anchor="s0"))
    assert merge.head_keys == ["head.weight", "head.bias"]
    collapse_equals_functional_forward(merge)


# granularity: head. One coefficient per source per attention head, shared by the head's q, k and v rows
# (weight rows and bias entries of the fused qkv) and by the proj columns that read the head; every other
# tensor (proj.bias included) keeps kernel, one coefficient per output row.
HEADS, DEPTH = 3, 2
HEAD_DIM = D // HEADS
HEAD_KEYS = ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight")  # per block: the tensors a head owns


def head_group(block: int) -> str:
    return f"blocks.{block}.attn.heads"


def head_weights_by_hand(key: str, heads: Tensor) -> Tensor:
    """Per-source weights ``(S, *shape)`` of one attention tensor from its block's head weights ``(S, H)``,
    head by head: rows ``part * D + h * head_dim ...`` of q (part 0), k (1), v (2), columns of proj."""
    shape = (3 * D, D) if key.endswith("qkv.weight") else (3 * D,) if key.endswith("qkv.bias") else (D, D)
    full = torch.zeros(heads.shape[0], *shape)
    for h in range(HEADS):
        features = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        if key.endswith("proj.weight"):
            full[:, :, features] = heads[:, h, None, None]
            continue
        for part in range(3):
            rows = slice(part * D + features.start, part * D + features.stop)
            full[:, rows] = heads[:, h].view(-1, *([1] * len(shape)))
    return full


def weights_per_tensor(merge: KernelMerge, logits: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each merged tensor's per-source weights ``(S, *shape or broadcastable)``, from logits by hand."""
    weights = {}
    for key in merge.merged_keys:
        block = key.split(".")[1] if key.startswith("blocks.") else None
        if block is not None and key.endswith(HEAD_KEYS):
            weights[key] = head_weights_by_hand(key, torch.stack(weights_by_hand(logits[head_group(int(block))])))
        else:
            weights[key] = torch.stack(weights_by_hand(logits[key]))  # kernel: (S, rows, 1, ...)
    return weights


@pytest.mark.parametrize("count", [2, 3])
def test_vit_head_merge_equals_explicit_per_head_weighted_sum(count: int) -> None:
    merge, sources = build(count, "head")
    logits = {group.replace("__", "."): value.detach() for group, value in merge.logits.items()}
    assert logits[head_group(0)].shape == (1 if count == 2 else count, HEADS)
    heads = torch.stack(weights_by_hand(logits[head_group(0)]))
    assert len(set(heads[0].tolist())) == HEADS  # every head has its own blend
    expected = {key: sum(w[i] * sources[i][key] for i in range(count))
                for key, w in weights_per_tensor(merge, logits).items()}
    merged = merge.merged_parameters()
    for key in merge.merged_keys:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    # spot check: head 1's value rows and proj columns carry head 1's weight, proj.bias keeps its own rows
    rows, columns = slice(2 * D + HEAD_DIM, 2 * D + 2 * HEAD_DIM), slice(HEAD_DIM, 2 * HEAD_DIM)
    by_hand = sum(float(heads[i, 1]) * sources[i][QKV][rows] for i in range(count))
    torch.testing.assert_close(merged[QKV][rows], by_hand, rtol=1e-5, atol=1e-6)
    proj = "blocks.0.attn.proj.weight"
    by_hand = sum(float(heads[i, 1]) * sources[i][proj][:, columns] for i in range(count))
    torch.testing.assert_close(merged[proj][:, columns], by_hand, rtol=1e-5, atol=1e-6)
    assert merge.group_of["blocks.0.attn.proj.bias"] == "blocks.0.attn.proj.bias"

    plain = vit()
    plain.load_state_dict({**merge.skeleton.state_dict(), **expected}, strict=True)
    x = inputs()
    merge.eval()
    with torch.no_grad():
        torch.testing.assert_close(merge(x), plain.eval()(x), rtol=1e-4, atol=1e-5)
    merge.use_channels_last()  # the rebuilt layout (patch conv in channels_last) blends the same
    for key, value in merge.merged_parameters().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_vit_head_coefficient_count_is_kernels_outside_attention_plus_heads_per_block() -> None:
    head, sources = build(2, "head")
    kernel, _ = build(2, "kernel", sources=sources)
    owned = {f"blocks.{b}.{key}" for b in range(DEPTH) for key in HEAD_KEYS}
    outside = sum(len(kernels(key, tuple(sources[0][key].shape))) for key in head.merged_keys if key not in owned)
    assert head.layout.num_columns == outside + DEPTH * HEADS
    assert {head.group_of[key] for key in owned} == {head_group(b) for b in range(DEPTH)}
    # the tiny ViT: 9218 coefficients per source at kernel, 6536 at head (2 x (576 + 576 + 192) rows -> 2 x 3)
    assert (kernel.layout.num_columns, head.layout.num_columns) == (9218, 6536)
    assert head.group_weights()[head_group(1)].shape == (2, HEADS)


def test_vit_head_gradients_reach_every_head_and_equal_autograd_through_the_explicit_sum() -> None:
    merge, sources = build(3, "head")
    merge.train()
    x, labels = inputs(4), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(merge(x), labels).backward()
    for block in range(DEPTH):
        grad = merge.logits[head_group(block).replace(".", "__")].grad
        assert grad.shape == (3, HEADS) and bool((grad.abs() > 0).all()), block  # every head, every source
    assert all(logits.grad.abs().sum() > 0 for logits in merge.logits.values())

    leaves = {group.replace("__", "."): value.detach().clone().requires_grad_(True)
              for group, value in merge.logits.items()}
    merged = {key: sum(w[i] * sources[i][key] for i in range(3))
              for key, w in weights_per_tensor(merge, leaves).items()}
    nn.functional.cross_entropy(functional_call(merge.skeleton, merged, (x,), strict=False), labels).backward()
    for group, leaf in leaves.items():
        torch.testing.assert_close(merge.logits[group.replace(".", "__")].grad, leaf.grad, rtol=1e-4, atol=1e-7,
                                   msg=group)


def test_pipeline_collapse_of_a_head_merge_equals_its_functional_forward() -> None:
    settings = MergeSettings(anchor="s0", granularity="head")
    merge = build_learned_merge("test_vit", two_test_vits(), ["s0", "s1"], NUM_CLASSES, settings)
    assert merge.granularity == "head" and "blocks.0.attn.heads" in merge.group_weights()
    collapse_equals_functional_forward(merge)
    # REPAIR's per-channel weights: qkv rows carry their head's weight, proj rows the mean over the heads
    heads = merge.group_weights()["blocks.0.attn.heads"]
    qkv = merge.channel_weights("blocks.0.attn.qkv", 3 * heads.shape[1] * 32)  # test_vit: 2 heads of 32
    torch.testing.assert_close(qkv[:, 32:64], heads[:, 1:2].expand(2, 32))
    torch.testing.assert_close(merge.channel_weights("blocks.0.attn.proj", 64), heads.mean(dim=1, keepdim=True)
                               .expand(2, 64))


def test_head_granularity_on_a_cnn_stops_with_one_line_naming_the_setting_and_the_arch() -> None:
    states = [create_model("test_resnet", num_classes=4).state_dict() for _ in range(2)]
    with pytest.raises(GranularityError, match=r"merge\.granularity 'head' needs attention blocks .*arch 'test_resnet' "
                                         r"has none") as error:
        build_learned_merge("test_resnet", states, ["s0", "s1"], NUM_CLASSES,
                            MergeSettings(anchor="s0", granularity="head"))
    assert "\n" not in str(error.value)


def test_head_merge_layer_summary_and_layerwise_report() -> None:
    merge, _ = build(2, "head")
    summary = merge.layer_summary()
    assert list(summary["parameter"]) == merge.merged_keys  # one row per merged tensor, in network order
    row = summary.set_index("parameter").loc[QKV]
    assert row["numel"] == HEADS and row["s0"] + row["s1"] == pytest.approx(1.0) and row["s0_std"] > 0
    report = layerwise({0: summary, 1: summary}, ["s0", "s1"])
    assert "blocks.0.attn.qkv" in set(report["layer"]) and report.notna().all().all()


def test_head_granularity_covers_separate_q_k_v_projections() -> None:
    """EVA-02 keeps q_proj, k_proj (no bias) and v_proj apart: head h is rows h*hd... of each."""
    def eva(seed: int, classes: int) -> nn.Module:
        torch.manual_seed(seed)
        return timm.create_model("eva02_base_patch14_224", img_size=28, patch_size=14, embed_dim=64, depth=1,
                                 num_heads=4, ref_feat_shape=(2, 2), num_classes=classes)
    sources = [eva(100 + i, 5).state_dict() for i in range(2)]
    merge = KernelMerge(eva(0, NUM_CLASSES), sources, ["s0", "s1"], ["head.weight", "head.bias"], "head",
                        resolve_normalizer("auto", 2), initial_weights(2, 0, 0.5))
    owned = [key for key, group in merge.group_of.items() if group == "blocks.0.attn.heads"]
    assert owned == ["blocks.0.attn.q_proj.weight", "blocks.0.attn.q_proj.bias", "blocks.0.attn.k_proj.weight",
                     "blocks.0.attn.v_proj.weight", "blocks.0.attn.v_proj.bias", "blocks.0.attn.proj.weight"]
    with torch.no_grad():
        merge.coefficient_logits.normal_(0, 1.5)
    heads, merged = merge.group_weights()["blocks.0.attn.heads"], merge.merged_parameters()
    for key in owned:
        for h in range(4):
            features = slice(16 * h, 16 * h + 16)  # head_dim 16: rows of q/k/v, columns of proj
            part = (slice(None), features) if key == "blocks.0.attn.proj.weight" else (features,)
            by_hand = heads[0, h] * sources[0][key][part] + heads[1, h] * sources[1][key][part]
            torch.testing.assert_close(merged[key][part], by_hand, rtol=1e-5, atol=1e-6, msg=key)
