"""The math of the functional merge: explicit weighted sums, normalisation, collapse, frozen sources."""

from __future__ import annotations

import pytest
import timm
import torch

from medmerge.merge.coefficients import GRANULARITIES, NORMALIZERS, initial_weights, resolve_normalizer
from medmerge.merge.functional import KernelMerge, SourceMismatchError

FAMILIES = ["test_resnet", "test_efficientnet", "test_convnext", "tf_efficientnet_lite0", "test_vit"]
NUM_CLASSES = 3


def head_keys(model: torch.nn.Module) -> list[str]:
    prefix = model.pretrained_cfg["classifier"]
    return [name for name, _ in model.named_parameters() if name.startswith(prefix + ".")]


def random_sources(arch: str, count: int) -> list[dict[str, torch.Tensor]]:
    sources = []
    for seed in range(count):
        torch.manual_seed(100 + seed)
        model = timm.create_model(arch, num_classes=1000 + seed)  # source heads differ: they are not merged
        with torch.no_grad():  # non-trivial BN statistics, different per source
            for name, buffer in model.named_buffers():
                if buffer.is_floating_point():
                    buffer.uniform_(0.5, 1.5) if "var" in name else buffer.normal_(0, 0.1)
        sources.append(model.state_dict())
    return sources


def build(arch: str, count: int = 2, granularity: str = "kernel", normalization: str = "auto",
          trainable=None, randomise: bool = True) -> tuple[KernelMerge, list[dict]]:
    sources = random_sources(arch, count)
    torch.manual_seed(0)
    skeleton = timm.create_model(arch, num_classes=NUM_CLASSES)
    merge = KernelMerge(skeleton, sources, [f"s{i}" for i in range(count)], head_keys(skeleton), granularity,
                        resolve_normalizer(normalization, count), initial_weights(count, 0, 0.5), trainable)
    if randomise:
        with torch.no_grad():
            for logits in merge.logits.values():
                logits.normal_(0, 1.5)
    return merge, sources


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("count", [2, 3])
def test_functional_merge_equals_explicit_weighted_sum(arch: str, count: int) -> None:
    merge, sources = build(arch, count, normalization="softmax" if count > 2 else "auto")
    merged = merge.merged_parameters()
    assert set(merged) == set(merge.merged_keys)
    for key in merge.merged_keys:
        logits = merge.logits[key.replace(".", "__")].detach()
        if logits.shape[0] == 1:  # sigmoid: one logit for two sources
            first = torch.sigmoid(logits[0])
            weights = [first, 1 - first]
        else:
            weights = list(torch.softmax(logits, dim=0))
        expected = sum(w * src[key] for w, src in zip(weights, sources, strict=True))
        torch.testing.assert_close(merged[key], expected, rtol=1e-6, atol=1e-6)
        # per output channel: each channel c is its own blend, sum_i w_i[c] * W_i[c]
        channel = min(1, merged[key].shape[0] - 1)
        by_hand = sum(float(w.flatten()[channel]) * src[key][channel] for w, src in zip(weights, sources, strict=True))
        torch.testing.assert_close(merged[key][channel], by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", sorted(GRANULARITIES))
@pytest.mark.parametrize("normalization,count", [("softmax", 2), ("softmax", 3), ("sigmoid", 2)])
def test_weights_are_positive_and_sum_to_one(granularity: str, normalization: str, count: int) -> None:
    merge, _ = build("test_resnet", count, granularity, normalization)
    for group, weights in merge.group_weights().items():
        assert weights.shape[0] == count, group
        assert (weights > 0).all()
        torch.testing.assert_close(weights.sum(dim=0), torch.ones_like(weights[0]))


def test_coefficient_shapes_per_granularity() -> None:
    conv = ("conv1.weight", (8, 4, 3, 3))
    bias = ("bn1.bias", (8,))
    assert GRANULARITIES["kernel"](*conv) == ("conv1.weight", (8, 1, 1, 1))
    assert GRANULARITIES["kernel"](*bias) == ("bn1.bias", (8,))
    assert GRANULARITIES["slice"](*conv) == ("conv1.weight", (8, 4, 1, 1))
    assert GRANULARITIES["layer"](*conv) == ("conv1.weight", (1, 1, 1, 1))
    assert GRANULARITIES["model"](*conv)[0] == GRANULARITIES["model"](*bias)[0] == "model"
    merge, _ = build("test_resnet", 2, "model")
    assert list(merge.group_weights()) == ["model"]
    merge, _ = build("test_resnet", 2, "kernel")
    conv_weight = next(k for k in merge.merged_keys if k.endswith("conv1.weight"))
    out_channels = merge.sources[0][conv_weight.replace(".", "__")].shape[0]
    assert merge.group_weights()[conv_weight].shape == (2, out_channels, 1, 1, 1)


def test_sigmoid_equals_softmax_on_two_logits() -> None:
    z = torch.randn(5, 1)
    sigmoid = NORMALIZERS["sigmoid"].weights(z.unsqueeze(0))
    softmax = NORMALIZERS["softmax"].weights(torch.stack([z, torch.zeros_like(z)]))
    torch.testing.assert_close(sigmoid, softmax)


def test_initial_coefficients_give_the_configured_blend() -> None:
    for normalization, count in [("sigmoid", 2), ("softmax", 2), ("softmax", 3)]:
        merge = KernelMerge(
            timm.create_model("test_resnet", num_classes=2), random_sources("test_resnet", count),
            [f"s{i}" for i in range(count)], ["fc.weight", "fc.bias"], "kernel",
            NORMALIZERS[normalization], initial_weights(count, 1, 0.7),
        )
        for weights in merge.group_weights().values():
            assert torch.allclose(weights[1], torch.tensor(0.7))
            assert torch.allclose(weights[0], torch.tensor(0.3 / (count - 1)))


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"])
def test_collapsed_model_equals_functional_merge(arch: str) -> None:
    merge, _ = build(arch, 3, normalization="softmax")
    merge.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = merge(x)
        model = timm.create_model(arch, num_classes=NUM_CLASSES)
        model.load_state_dict(merge.collapsed_state_dict(), strict=True)
        actual = model.eval()(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def _learn(merge: KernelMerge, steps: int = 3) -> None:
    groups = merge.learnable_groups()
    optimizer = torch.optim.AdamW(
        [{"params": groups["coefficients"], "lr": 0.1}, {"params": groups["head"], "lr": 0.01}]
        + ([{"params": groups["sources"], "lr": 0.01}] if groups["sources"] else [])
    )
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    merge.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(merge(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_frozen_sources_unchanged_byte_for_byte_after_learning() -> None:
    merge, _ = build("test_resnet", 2, randomise=False)
    before_sources = [{k: v.detach().clone() for k, v in holder.items()} for holder in merge.sources]
    before_logits = {k: v.detach().clone() for k, v in merge.logits.items()}
    _learn(merge)
    for holder, before in zip(merge.sources, before_sources, strict=True):
        for key, value in holder.items():
            assert torch.equal(value, before[key]), key
    assert any(not torch.equal(merge.logits[k], v) for k, v in before_logits.items()), "coefficients did not learn"


def test_train_sources_keeps_the_anchor_frozen() -> None:
    merge, _ = build("test_resnet", 2, trainable=[False, True], randomise=False)
    anchor = {k: v.detach().clone() for k, v in merge.sources[0].items()}
    other = {k: v.detach().clone() for k, v in merge.sources[1].items()}
    _learn(merge)
    assert all(torch.equal(v, anchor[k]) for k, v in merge.sources[0].items())
    assert any(not torch.equal(v, other[k]) for k, v in merge.sources[1].items())


def test_bn_buffers_start_at_the_initial_blend() -> None:
    merge, sources = build("test_resnet", 2, randomise=False)
    key = next(k for k, _ in merge.skeleton.named_buffers() if k.endswith("running_mean"))
    expected = 0.5 * sources[0][key] + 0.5 * sources[1][key]
    torch.testing.assert_close(dict(merge.skeleton.named_buffers())[key], expected)


@pytest.mark.parametrize("count", [2, 3, 4])
def test_bn_buffers_start_bit_for_bit_at_the_left_to_right_blend(count: int) -> None:
    """The starting statistics come from ``blended_buffers(init_weights)``; up to four sources they are the
    bits the left-to-right sum ``w_0 t_0 + w_1 t_1 + ...`` gave before (torch's reduction over more
    sources may sum in another order)."""
    sources = random_sources("test_resnet", count)
    skeleton = timm.create_model("test_resnet", num_classes=NUM_CLASSES)
    weights = initial_weights(count, 1, 0.8)
    merge = KernelMerge(skeleton, sources, [f"s{i}" for i in range(count)], head_keys(skeleton), "kernel",
                        resolve_normalizer("auto", count), weights)
    checked = 0
    for key, buffer in merge.skeleton.named_buffers():
        if buffer.is_floating_point():
            expected = sum(w * state[key].float() for w, state in zip(weights.tolist(), sources, strict=True))
            assert torch.equal(buffer.view(torch.int32), expected.view(torch.int32)), key
            checked += 1
    assert checked > 0


def test_mismatched_architecture_names_the_first_differing_parameter() -> None:
    resnet = random_sources("test_resnet", 1)[0]
    other = timm.create_model("test_efficientnet").state_dict()
    skeleton = timm.create_model("test_resnet", num_classes=2)
    with pytest.raises(SourceMismatchError, match=r"source 'b' has no parameter 'conv1\.0\.weight'|source 'b'.*shape"):
        KernelMerge(skeleton, [resnet, other], ["a", "b"], ["fc.weight", "fc.bias"], "kernel",
                    NORMALIZERS["sigmoid"], initial_weights(2, 0, 0.5))
    wide = dict(resnet)
    first = next(k for k in resnet if k.endswith("weight"))
    wide[first] = torch.zeros(resnet[first].shape[0] + 1, *resnet[first].shape[1:])
    with pytest.raises(SourceMismatchError, match=rf"source 'b' parameter '{first}' has shape"):
        KernelMerge(skeleton, [resnet, wide], ["a", "b"], ["fc.weight", "fc.bias"], "kernel",
                    NORMALIZERS["sigmoid"], initial_weights(2, 0, 0.5))


def test_layer_summary_is_in_network_order_with_one_column_per_source() -> None:
    merge, _ = build("test_resnet", 3, normalization="softmax")
    summary = merge.layer_summary()
    assert list(summary["parameter"]) == merge.merged_keys
    assert {"s0", "s1", "s2"} <= set(summary.columns)
    torch.testing.assert_close(torch.tensor(summary[["s0", "s1", "s2"]].sum(axis=1).to_numpy()),
                               torch.ones(len(summary), dtype=torch.float64))
    assert abs(sum(merge.source_means().values()) - 1) < 1e-6
