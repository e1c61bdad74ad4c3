"""ZipIt! (medmerge.merge.zipit, method ``zipit``): the zip of one space, the merge of permuted copies, refusals."""

from __future__ import annotations

import time

import pytest
import torch

from medmerge.config import MergeSettings
from medmerge.merge.alignment import apply_permutations, permutation_spec, random_permutations
from medmerge.merge.zipit import (
    correlation,
    within_model_merges,
    zip_correlation,
    zip_sources,
    zip_states,
)
from medmerge.methods import get_method, run_merge_method
from medmerge.models import backbone_state, create_model, load_backbone
from tests.test_methods import CPU, inputs, sources, tiny_task


def _corr(features: torch.Tensor) -> torch.Tensor:
    centered = features - features.mean(dim=0)
    return correlation(centered.T @ centered / len(features))


def test_zip_of_a_permuted_copy_pairs_every_unit_with_its_copy() -> None:
    torch.manual_seed(0)
    x = torch.randn(500, 12)
    perm = torch.randperm(12)
    merge, unmerge = zip_correlation(_corr(torch.cat([x, x[:, perm]], dim=1)), 2)
    assert merge.shape == (12, 24) and unmerge.shape == (24, 12)
    torch.testing.assert_close(merge @ unmerge, torch.eye(12))  # M U = I: unmerging then merging is exact
    assert torch.equal(unmerge[:12], torch.eye(12))  # groups in the anchor's order
    assert torch.equal(unmerge[12:].argmax(dim=1), perm)  # copy unit k is the anchor's unit perm[k]
    assert within_model_merges(unmerge, 2) == 0


def test_within_model_merges_average_matched_pairs_and_respect_the_budget() -> None:
    """Model 0's units 0 and 1 are one feature twice; model 1 has it once, and a unit of its own (5) that
    nothing in model 0 resembles. The zip merges 0 and 1 of model 0 (the paper's within-model merge) and
    keeps model 1's stray unit alone; U M averages each group (the merged feature of a pair is its mean)."""
    torch.manual_seed(1)
    base = torch.randn(400, 6)
    a = base[:, [0, 0, 2, 3, 4, 5]].clone()
    a[:, 5] = torch.randn(400)  # model 0's last unit: unlike anything
    b = base.clone()
    b[:, 1] = torch.randn(400)  # model 1's unit 1: unlike anything in model 0
    features = torch.cat([a, b], dim=1)
    merge, unmerge = zip_correlation(_corr(features), 2, alpha=0.0, beta=1.0)
    groups = [sorted(torch.nonzero(unmerge[:, g]).flatten().tolist()) for g in range(6)]
    assert [0, 1, 6] in groups or [0, 1] in groups
    assert within_model_merges(unmerge, 2) >= 1
    torch.testing.assert_close(merge @ unmerge, torch.eye(6))
    for g, group in enumerate(groups):
        torch.testing.assert_close(merge[g, group], torch.full((len(group),), 1 / len(group)))
    stacked = torch.randn(12)
    averaged = unmerge @ (merge @ stacked)
    for group in groups:
        torch.testing.assert_close(averaged[group], stacked[group].mean().expand(len(group)))
    for kwargs in ({"beta": 0.0}, {"beta": 1.0, "same_model_merges": False}):
        _, across = zip_correlation(_corr(features), 2, alpha=0.0, **kwargs)
        assert within_model_merges(across, 2) == 0
        assert torch.equal(across.reshape(2, 6, 6).sum(dim=1), torch.ones(2, 6))  # a permutation per model


def test_three_models_without_repeats_zip_to_one_unit_of_each() -> None:
    torch.manual_seed(2)
    x = torch.randn(300, 5)
    features = torch.cat([x, x[:, [4, 3, 2, 1, 0]], x[:, [1, 0, 2, 4, 3]]], dim=1)
    merge, unmerge = zip_correlation(_corr(features), 3, alpha=0.0, same_model_merges=False)
    assert torch.equal(unmerge.reshape(3, 5, 5).sum(dim=1), torch.ones(3, 5))
    assert torch.equal(unmerge[5:10].argmax(dim=1), torch.tensor([4, 3, 2, 1, 0]))


def _randomise_norm_stats(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


@pytest.mark.parametrize(("arch", "same_model_merges"), [("test_resnet", True), ("test_resnet", False),
                                                         ("test_efficientnet", True),
                                                         pytest.param("tf_efficientnet_lite0", True,
                                                                      marks=pytest.mark.slow)])  # ~100 s on 2 cores
def test_zipit_of_two_permuted_copies_is_the_network(arch: str, same_model_merges: bool) -> None:
    """ZipIt! of a network and a copy with randomly permuted units computes the network's function
    (depthwise convs and squeeze-excite gates included): each unit is zipped with its copy."""
    torch.manual_seed(3)
    model = create_model(arch, num_classes=4).eval()
    _randomise_norm_stats(model, 3)
    size = 32
    spec = permutation_spec(model, (3, size, size))
    state = backbone_state(model.state_dict(), model)
    copy = apply_permutations(spec, random_permutations(spec, seed=5), state)
    images = [torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    merged, report = zip_sources(model, spec, [state, copy], images, same_model_merges=same_model_merges)
    assert report["within_model_merges"] == 0
    zipped = create_model(arch, num_classes=4).eval()
    load_backbone(zipped, merged)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(zipped.forward_features(x), model.forward_features(x), rtol=1e-4, atol=1e-4)


def test_zip_states_merges_a_conv_as_m_blockdiag_w_u() -> None:
    """The merged weight of a conv is M blockdiag(W_0, W_1) U, its bias M b."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 1))
    spec = permutation_spec(model, (3, 4, 4))
    states = [{k: torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(2)]
    (space,) = spec.spaces
    groups = [[0, 5], [1, 2], [3, 7], [4, 6]]
    unmerge = torch.zeros(8, 4)
    for g, group in enumerate(groups):
        unmerge[group, g] = 1
    merge = (unmerge / unmerge.sum(0)).T
    merged = zip_states(spec, states, {space: (merge, unmerge)})
    w = [s["0.weight"].flatten(1) for s in states]
    torch.testing.assert_close(merged["0.weight"].flatten(1), merge @ torch.cat(w), atol=1e-6, rtol=0)
    torch.testing.assert_close(merged["0.bias"], merge @ torch.cat([s["0.bias"] for s in states]))
    w2 = torch.block_diag(*[s["2.weight"].flatten(1) for s in states])  # 10 x 8 -> fixed outputs: averaged
    expected = torch.cat([torch.eye(5), torch.eye(5)], dim=1) / 2 @ w2 @ unmerge
    torch.testing.assert_close(merged["2.weight"].flatten(1), expected, atol=1e-6, rtol=0)


def test_zipit_refuses_attention_and_grouped_layers_in_one_line() -> None:
    for arch, size in [("test_vit", 160)]:
        model = create_model(arch, num_classes=2).eval()
        spec = permutation_spec(model)
        state = backbone_state(model.state_dict(), model)
        with pytest.raises(ValueError, match=r"^zipit cannot merge '[^']+': attention heads") as error:
            zip_sources(model, spec, [state, state], [torch.randn(1, 3, size, size)])
        assert "\n" not in str(error.value)


def test_zipit_settings_are_its_own_and_partial_zipping_is_refused() -> None:
    method = get_method("zipit")
    own = method.validate(MergeSettings(method="zipit", anchor="a", options={"alpha": 0.0, "images": 16}), ["a", "b"])
    assert own.alpha == 0.0 and own.images == 16 and own.beta == 0.125 and own.same_model_merges
    with pytest.raises(ValueError, match=r"options\.stop_at: .*partial zipping"):
        method.validate(MergeSettings(method="zipit", anchor="a", options={"stop_at": "layer3"}), ["a", "b"])
    with pytest.raises(ValueError, match=r"align: none"):
        method.validate(MergeSettings(method="zipit", anchor="a", align="weight_matching"), ["a", "b"])


def test_zipit_method_returns_a_probed_model_and_its_cost_is_reported() -> None:
    """The method on test_efficientnet (depthwise convs) at 32 px: an ordinary model with its probe head;
    the zip's time beside one fine-tune epoch on the same tiny data (printed: pytest -s)."""
    from medmerge.config import TrainSettings
    from medmerge.train import train_classifier

    states = sources(2)
    start = time.perf_counter()
    result = run_merge_method(inputs("zipit", states, options={"images": 32}))
    zip_seconds = time.perf_counter() - start
    assert result.merge is None and result.model is not None and 0 <= result.val_f1 <= 1
    assert type(result.model).__name__ == type(create_model("test_efficientnet", num_classes=3)).__name__
    assert result.model.get_classifier().out_features == 3
    assert result.details["zipit"]["merged_units"] > 0
    start = time.perf_counter()
    train_classifier("test_efficientnet", states[0], tiny_task(), TrainSettings(epochs=1, lr=1e-3, batch_size=16), CPU)
    epoch_seconds = time.perf_counter() - start
    print(f"zipit merge {zip_seconds:.2f} s (zip {result.details['zipit']['seconds']:.2f} s) vs one fine-tune "
          f"epoch {epoch_seconds:.2f} s")
