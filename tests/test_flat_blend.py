"""The flat blend (medmerge.merge.flat): its gradients equal autograd through the explicit per-tensor weighted
sum, its layout covers every value once, its reused buffers survive two forwards before one backward, and the
skeleton keeps no backbone of its own."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.func import functional_call

from medmerge.merge.coefficients import GRANULARITIES, initial_weights, resolve_normalizer
from medmerge.merge.flat import FlatLayout
from medmerge.merge.functional import KernelMerge

NUM_CLASSES = 3


def sources(arch: str, count: int) -> list[dict[str, torch.Tensor]]:
    states = []
    for seed in range(count):
        torch.manual_seed(200 + seed)
        states.append(timm.create_model(arch, num_classes=5).state_dict())
    return states


def build(arch: str, count: int, granularity: str, trainable=None) -> tuple[KernelMerge, list[dict]]:
    states = sources(arch, count)
    torch.manual_seed(0)
    skeleton = timm.create_model(arch, num_classes=NUM_CLASSES)
    head = [k for k, _ in skeleton.named_parameters() if k.startswith(skeleton.pretrained_cfg["classifier"] + ".")]
    merge = KernelMerge(skeleton, states, [f"s{i}" for i in range(count)], head, granularity,
                        resolve_normalizer("auto", count), initial_weights(count, 0, 0.6), trainable)
    with torch.no_grad():
        merge.coefficient_logits.normal_(0, 1.0)
    return merge.eval(), states  # eval: BatchNorm uses fixed statistics, so both forwards see the same ones


def explicit_gradients(merge: KernelMerge, states: list[dict], x: torch.Tensor, trainable) -> tuple:
    """Loss and gradients of autograd through ``W = sum_i w_i * W_i`` written tensor by tensor."""
    logits = merge.coefficient_logits.detach().clone().requires_grad_(True)
    weights = merge.layout.group_views(merge.normalizer.weights(logits))
    tensors = [{k: v.detach().clone().float().requires_grad_(bool(learn)) for k, v in state.items()}
               for state, learn in zip(states, trainable, strict=True)]
    merged = {key: sum(weights[merge.group_of[key]][i] * tensors[i][key] for i in range(len(states)))
              for key in merge.merged_keys}
    loss = functional_call(merge.skeleton, merged, (x,), strict=False).square().mean()
    loss.backward()
    return loss.detach(), logits.grad, [{k: t[k].grad for k in merge.merged_keys} if learn else None
                                         for t, learn in zip(tensors, trainable, strict=True)]


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet", "test_vit"])
@pytest.mark.parametrize("granularity", sorted(GRANULARITIES))
@pytest.mark.parametrize("count,trainable", [(2, None), (3, None), (2, [False, True])])
@pytest.mark.parametrize("channels_last", [False, True])
def test_flat_blend_gradients_equal_the_explicit_weighted_sum(arch, granularity, count, trainable, channels_last):
    merge, states = build(arch, count, granularity, trainable)
    if channels_last:
        merge.use_channels_last()
    trainable = trainable or [False] * count
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = merge(x).square().mean()
    loss.backward()
    expected_loss, expected_logits_grad, expected_source_grads = explicit_gradients(merge, states, x, trainable)
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merge.coefficient_logits.grad, expected_logits_grad, rtol=1e-4, atol=1e-7)
    assert merge.coefficient_logits.grad.abs().sum() > 0
    learned = merge.learnable_groups()["sources"]
    assert len(learned) == sum(trainable)
    for index, expected in enumerate(expected_source_grads):
        if expected is None:
            continue
        flat = merge.sources.flats[index]
        for key, grad in expected.items():
            torch.testing.assert_close(merge.layout.placement[key].view(flat.grad), grad, rtol=1e-4, atol=1e-7,
                                       msg=key)


@pytest.mark.parametrize("granularity", sorted(GRANULARITIES))
@pytest.mark.parametrize("channels_last", [False, True])
def test_layout_places_every_value_once_and_buckets_share_a_row_length(granularity: str, channels_last: bool) -> None:
    model = timm.create_model("test_efficientnet")
    keys = [k for k, _ in model.named_parameters()]
    shapes = [tuple(p.shape) for _, p in model.named_parameters()]
    layout = FlatLayout(keys, shapes, GRANULARITIES[granularity], channels_last=channels_last)
    covered = torch.zeros(layout.numel, dtype=torch.int32)
    for placement in layout.placements:
        covered[placement.offset:placement.offset + placement.numel] += 1
    assert layout.numel == sum(p.numel() for p in model.parameters()) and bool((covered == 1).all())
    assert layout.buckets[0].start == 0 and layout.buckets[-1].stop == layout.numel
    assert all(a.stop == b.start and a.row_stop == b.row_start for a, b in zip(layout.buckets, layout.buckets[1:], strict=False))
    assert layout.row_columns.numel() == layout.buckets[-1].row_stop
    # the views reproduce each tensor from the packed vector, in channels_last where asked
    state = dict(model.named_parameters())
    flat = layout.pack(state)
    for key, view in layout.views(flat).items():
        assert torch.equal(view, state[key].detach()), key
        if view.dim() == 4:
            assert view.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_two_forwards_before_one_backward_get_their_own_merged_weights() -> None:
    """The forward reuses one output buffer between steps; a second forward while the first graph still needs
    it gets fresh memory, so the gradient is that of the two forwards (as with chunked batches)."""
    merge, _ = build("test_resnet", 2, "kernel")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    (merge(x[:2]).square().mean() + merge(x[2:]).square().mean()).backward()
    chunked = merge.coefficient_logits.grad.clone()
    merge.coefficient_logits.grad = None
    for part in (x[:2], x[2:]):  # the same gradient, one backward per forward
        merge(part).square().mean().backward()
    torch.testing.assert_close(chunked, merge.coefficient_logits.grad, rtol=1e-5, atol=1e-8)
    fresh = merge.merged_parameters()
    reused = merge.merged_parameters(reuse_buffers=True)
    assert all(torch.equal(fresh[k], reused[k]) for k in fresh)


def test_the_skeleton_keeps_only_its_head_and_two_frozen_sources_are_a_base_and_a_difference() -> None:
    merge, states = build("test_resnet", 2, "kernel")
    assert [k for k, _ in merge.skeleton.named_parameters()] == ["fc.weight", "fc.bias"]
    backbone = sum(states[0][k].numel() for k in merge.merged_keys)
    stored = sum(p.numel() for p in merge.sources.parameters())
    assert stored == 2 * backbone  # base + difference: no third copy
    anchor, other = merge.sources[0], merge.sources[1]
    for key in merge.merged_keys:
        safe = key.replace(".", "__")
        assert torch.equal(anchor[safe], states[0][key])
        torch.testing.assert_close(other[safe], states[1][key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("granularity", ["kernel", "slice"])
def test_a_channels_last_merge_saves_its_trained_sources_for_a_merge_without_it(granularity: str) -> None:
    """Flat vectors are saved in one canonical order, whatever layout the merge that learned them used."""
    from medmerge.merge.collapse import merge_state_to_save, restore_merge_state

    learned, _ = build("test_efficientnet", 2, granularity, [False, True])
    learned.use_channels_last()
    optimizer = torch.optim.SGD([p for group in learned.learnable_groups().values() for p in group], lr=0.1)
    learned.train()(torch.randn(2, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    rebuilt, _ = build("test_efficientnet", 2, granularity, [False, True])
    restore_merge_state(rebuilt, merge_state_to_save(learned))
    expected, actual = learned.collapsed_state_dict(), rebuilt.collapsed_state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    fresh, _ = build("test_efficientnet", 2, granularity, [False, True])
    assert any(not torch.equal(rebuilt.sources[1][k], fresh.sources[1][k]) for k in fresh.sources[1])  # it learned
