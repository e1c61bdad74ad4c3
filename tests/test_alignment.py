"""Weight-matching alignment: derived specs are true symmetries, matching recovers them, errors are clear."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medmerge.merge.alignment import (
    AlignmentError,
    PermutationSpec,
    alignment_similarity,
    apply_permutations,
    permutation_spec,
    weight_matching,
)

ARCHS = ["resnet18", "tf_efficientnet_lite0", "efficientnet_b0"]


def make(arch: str, seed: int) -> nn.Module:
    """An eval-mode model whose BN affine parameters and running statistics are random, so every
    per-channel tensor influences the output (timm zero-inits some BN gammas, which would hide errors)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=5).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def random_perms(spec: PermutationSpec, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {space: torch.randperm(n, generator=generator) for space, n in spec.spaces.items()}


def with_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    return twin.eval()


@torch.no_grad()
def outputs(model: nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    return model(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_is_a_symmetry_and_matching_recovers_it(arch: str) -> None:
    model = make(arch, 0)
    spec = permutation_spec(model)
    state = model.state_dict()
    permuted = apply_permutations(spec, random_perms(spec, 1), state)

    changed = {k for k in state if not torch.equal(state[k], permuted[k])}
    informative = {k for k in spec.key_axes if state[k].unique().numel() > 1}  # e.g. not zero-init SE biases
    assert informative <= changed  # random perms touched every spec'd tensor that can show it
    assert len(informative) > 0.8 * len(spec.key_axes)
    assert any(k.endswith("running_var") for k in changed)  # BN buffers are permuted too
    assert all(torch.equal(state[k], permuted[k]) for k in state if k not in spec.key_axes)

    # a true symmetry: the permuted network computes the same function
    torch.testing.assert_close(outputs(with_state(model, permuted)), outputs(model), atol=1e-4, rtol=1e-4)

    perms = weight_matching(spec, state, permuted)
    recovered = apply_permutations(spec, perms, permuted)
    assert recovered.keys() == state.keys()
    for key in state:
        assert torch.equal(recovered[key], state[key]), key


def test_aligning_independent_models_raises_similarity_and_keeps_function() -> None:
    anchor, other = make("resnet18", 0), make("resnet18", 1)
    spec = permutation_spec(anchor)
    a, b = anchor.state_dict(), other.state_dict()
    perms = weight_matching(spec, a, b)
    aligned = apply_permutations(spec, perms, b)
    before, after = alignment_similarity(spec, a, b), alignment_similarity(spec, a, aligned)
    assert after > before
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    torch.testing.assert_close(outputs(with_state(other, aligned)), outputs(other), atol=1e-4, rtol=1e-4)
    # matching the aligned model again finds nothing to improve
    again = weight_matching(spec, a, aligned)
    assert all(torch.equal(p, torch.arange(len(p))) for p in again.values())


def test_vit_is_rejected_with_the_offending_modules() -> None:
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=2, num_classes=5
    )
    with pytest.raises(AlignmentError) as info:
        permutation_spec(vit)
    message = str(info.value)
    assert "LayerNorm" in message and "blocks.0.norm1" in message
    assert "merge.align: none" in message


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.a(x), self.b(x)], dim=1).mean((2, 3)))


class _Reshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 30 * 30, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))  # flattening a 30x30 map mixes channels into features


@pytest.mark.parametrize(
    ("model", "named"),
    [
        (_Cat(), "cat"),
        (_Reshape(), "flatten"),
        (nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2)), "'1' (grouped conv"),
        (nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8)), "GroupNorm with 2 groups"),
    ],
)
def test_unsupported_ops_are_named(model: nn.Module, named: str) -> None:
    with pytest.raises(AlignmentError, match="conv/linear/norm") as info:
        permutation_spec(model, input_size=(3, 32, 32))
    assert named in str(info.value)


def test_permutations_round_trip_through_safetensors(tmp_path) -> None:
    model = make("tf_efficientnet_lite0", 0)
    spec = permutation_spec(model)
    perms = random_perms(spec, 3)
    path = tmp_path / "perms.safetensors"
    save_file(perms, str(path))
    loaded = load_file(str(path))
    assert loaded.keys() == perms.keys()
    assert all(loaded[s].dtype == torch.int64 and torch.equal(loaded[s], perms[s]) for s in perms)
    state = model.state_dict()
    again = apply_permutations(spec, loaded, state)
    assert all(torch.equal(t, again[k]) for k, t in apply_permutations(spec, perms, state).items())


def test_space_counts_and_fixed_axes() -> None:
    resnet = permutation_spec(timm.create_model("resnet18", pretrained=False, num_classes=5))
    # resnet18: the stem conv's 64 channels run through all of layer1 (no downsample, identity residuals)
    # = 1 space; each stage 2-4 has one residual space (downsample conv + both blocks' conv2) = 3; each of
    # the 8 BasicBlocks has one internal space (conv1 -> bn1 -> conv2 input) = 8. Total 1 + 3 + 8 = 12.
    assert len(resnet.spaces) == 12
    assert resnet.spaces["conv1"] == 64 and resnet.spaces["layer4.0.conv2"] == 512
    assert resnet.key_axes["conv1.weight"] == ("conv1", None, None, None)  # image channels are fixed
    assert resnet.key_axes["fc.weight"] == (None, "layer4.0.conv2")  # logits are fixed
    assert "fc.bias" not in resnet.key_axes
    assert ("bn1.running_mean", 0) in resnet.axes["conv1"]
    assert "bn1.running_mean" not in resnet.weight_keys

    lite = permutation_spec(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=5))
    # lite0: stem 1; stage 0 (one depthwise-separable block, 32->16, no skip) 1; stages 1-6 have
    # 2+2+3+3+4+1 = 15 inverted-residual blocks, each with one expansion space (its depthwise conv stays in
    # it), and 6 output spaces (the first block's conv_pwl, shared by the skips); conv_head 1. Total 24.
    assert len(lite.spaces) == 24
    b0 = permutation_spec(timm.create_model("efficientnet_b0", pretrained=False, num_classes=5))
    # b0 = lite0's structure + one squeeze-excitation reduce space in each of its 16 blocks (the SE expand
    # output is joined to the gated space by `x * gate`): 24 + 16 = 40.
    assert len(b0.spaces) == 40
