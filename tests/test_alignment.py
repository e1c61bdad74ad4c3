"""Weight-matching alignment: derived specs are true symmetries, matching recovers them, errors are clear."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from medmerge.merge.alignment import (
    AlignmentError,
    Concat,
    Local,
    PermutationSpec,
    alignment_similarity,
    apply_permutations,
    load_permutations,
    permutation_spec,
    random_permutations,
    save_permutations,
    weight_matching,
)
from medmerge.merge.alignment.rules import MODULE_RULES, OP_RULES, module_rule, op_rule

ARCHS = ["resnet18", "tf_efficientnet_lite0", "efficientnet_b0"]
SMALL = (3, 32, 32)


class _VggLike(nn.Module):
    """VGG's structure at a test's size: convs, then timm's VGG ``ConvMlp`` pre-logits and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.vgg import ConvMlp

        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.pre_logits = ConvMlp(16, 24, kernel_size=7, mlp_ratio=1.0)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(24, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_logits(self.features(x)))


def _densenet() -> nn.Module:
    from timm.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2), num_classes=5)


# Each family at a size that matches in about a second on the CPU (same modules and ops as the full models).
FAMILIES = {
    "densenet": _densenet,
    "vgg": _VggLike,
    "regnety_002": lambda: timm.create_model("regnety_002", pretrained=False, num_classes=5),  # grouped convs
    "convnext": lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=5, depths=(1, 1, 1, 1),
                                          dims=(16, 32, 48, 64)),
    "vit": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32,
                                     depth=2, embed_dim=48, num_heads=3),
}
# The full architectures the alignment supports, checked for a true symmetry at a small input.
FULL = ["resnet50", "densenet121", "resnext26ts", "regnety_002", "seresnext26d_32x4d", "convnext_atto",
        "mobilenetv3_small_100"]


# Over about 5 s each on 2 cores: run by `make test`, left out of `make test-fast` (which keeps one
# architecture of each kind: resnet18, tf_efficientnet_lite0, densenet, vgg, convnext, vit, mobilenetv3).
SLOW_ARCHS = {"efficientnet_b0", "regnety_002", "resnet50", "densenet121", "resnext26ts", "seresnext26d_32x4d"}


def archs(names: list[str]) -> list:
    """``names`` as parameters, the slow ones marked ``slow``."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_ARCHS else name for name in names]


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random per-channel affine parameters and statistics, so that every per-unit tensor influences the
    output (timm zero-inits some BN gammas and sets LayerNorm/layer-scale to constants, hiding errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":  # timm zero-inits many
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
                if name == "gamma" or name.endswith("_token") or name == "pos_embed":
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


def make(arch: str, seed: int) -> nn.Module:
    """An eval-mode model (timm ``arch`` or a key of FAMILIES) with randomised per-channel tensors."""
    torch.manual_seed(seed)
    model = FAMILIES[arch]() if arch in FAMILIES else timm.create_model(arch, pretrained=False, num_classes=5)
    return randomise(model, seed)


def random_perms(spec: PermutationSpec, seed: int) -> dict[str, torch.Tensor]:
    return random_permutations(spec, seed)


def with_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    return twin.eval()


@torch.no_grad()
def outputs(model: nn.Module) -> torch.Tensor:
    x = torch.randn(2, *SMALL, generator=torch.Generator().manual_seed(7))
    return model(x)


def assert_symmetry(model: nn.Module, spec: PermutationSpec, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random member of the spec's group touches every informative spec'd tensor, nothing else, and leaves
    the function unchanged; returns the permuted state."""
    state = model.state_dict()
    permuted = apply_permutations(spec, random_perms(spec, seed), state)
    changed = {k for k in state if not torch.equal(state[k], permuted[k])}
    informative = {k for k in spec.key_axes if state[k].unique().numel() > 1}  # e.g. not zero-init biases
    assert informative <= changed
    assert len(informative) > 0.8 * len(spec.key_axes)
    assert all(torch.equal(state[k], permuted[k]) for k in state if k not in spec.key_axes)
    torch.testing.assert_close(outputs(with_state(model, permuted)), outputs(model), atol=1e-4, rtol=1e-4)
    return permuted


@pytest.mark.parametrize("arch", archs(ARCHS + list(FAMILIES)))
def test_spec_is_a_symmetry_and_matching_recovers_it(arch: str) -> None:
    model = make(arch, 0)
    spec = permutation_spec(model, SMALL)
    state = model.state_dict()
    permuted = assert_symmetry(model, spec)
    perms = weight_matching(spec, state, permuted)
    recovered = apply_permutations(spec, perms, permuted)
    assert recovered.keys() == state.keys()
    for key in state:
        assert torch.equal(recovered[key], state[key]), key


@pytest.mark.parametrize("arch", archs(["resnet18", *FAMILIES]))
def test_aligning_independent_models_raises_similarity_and_keeps_function(arch: str) -> None:
    anchor, other = make(arch, 0), make(arch, 1)
    spec = permutation_spec(anchor, SMALL)
    a, b = anchor.state_dict(), other.state_dict()
    perms = weight_matching(spec, a, b)
    aligned = apply_permutations(spec, perms, b)
    before, after = alignment_similarity(spec, a, b), alignment_similarity(spec, a, aligned)
    assert after > before
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    torch.testing.assert_close(outputs(with_state(other, aligned)), outputs(other), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", archs(FULL))
def test_full_architectures_have_a_true_symmetry(arch: str) -> None:
    model = make(arch, 0)
    assert_symmetry(model, permutation_spec(model, SMALL))


def test_vgg16_pre_logits_continue_the_last_conv_space() -> None:
    spec = permutation_spec(timm.create_model("vgg16", pretrained=False, num_classes=5), SMALL)
    assert spec.key_axes["pre_logits.fc1.weight"] == ("pre_logits.fc1", "features.28", None, None)
    assert spec.key_axes["head.fc.weight"] == (None, "pre_logits.fc2")
    assert spec.spaces["pre_logits.fc2"] == 4096 and len(spec.spaces) == 15  # 13 convs + 2 pre-logits


@pytest.mark.slow
def test_full_vit_has_a_true_symmetry() -> None:
    torch.manual_seed(0)
    vit = randomise(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32), 0)
    spec = permutation_spec(vit)  # the dummy input follows patch_embed.img_size
    assert len(spec.spaces) == 1 + 12 * 3  # residual stream; per block q/k dims, v dims, MLP hidden units
    assert_symmetry(vit, spec)


def test_spec_structure_of_concat_groups_and_heads() -> None:
    dense = permutation_spec(make("densenet", 0), SMALL)
    # stem 1; per dense layer a bottleneck and a growth space (2 x 2 layers x 2 blocks = 8); transition 1
    assert len(dense.spaces) == 10
    head_input = dense.key_axes["classifier.weight"][1]
    assert isinstance(head_input, Concat)  # the last block's input and both growths, in order
    assert [size for _, size in head_input.segments] == [16, 8, 8]  # the transition halves 32 to 16

    regnet = permutation_spec(make("regnety_002", 0), SMALL)
    grouped = regnet.key_axes["s1.b1.conv2.conv.weight"]
    assert isinstance(grouped[1], Local) and grouped[1].groups == 3
    assert regnet.groups[grouped[0]] == 3 and regnet.groups[grouped[1].space] == 3
    assert grouped[0] not in regnet.ties  # groups of a conv stay in place

    vit = permutation_spec(make("vit", 0), SMALL)
    qkv = vit.key_axes["blocks.0.attn.qkv.weight"]
    assert qkv[1] == vit.key_axes["patch_embed.proj.weight"][0] == vit.key_axes["cls_token"][2]
    assert [s for s, _ in qkv[0].segments] == ["blocks.0.attn.qk", "blocks.0.attn.qk", "blocks.0.attn.v"]
    assert vit.key_axes["blocks.0.attn.proj.weight"] == (qkv[1], "blocks.0.attn.v")
    assert vit.ties["blocks.0.attn.qk"] == vit.ties["blocks.0.attn.v"]
    assert vit.groups["blocks.0.attn.qk"] == 3


def test_grouped_permutations_must_keep_their_groups() -> None:
    spec = permutation_spec(make("regnety_002", 0), SMALL)
    space = next(s for s in spec.groups if s not in spec.ties)
    bad = torch.roll(torch.arange(spec.spaces[space]), 1)  # moves a unit into the next group
    with pytest.raises(ValueError, match="out of their"):
        apply_permutations(spec, {space: bad}, make("regnety_002", 0).state_dict())


class _Flip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flip(1).mean((2, 3)))  # reversing the channels fixes their order


class _Reshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 30 * 30, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))  # flattening a 30x30 map mixes channels into features


class _Slice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x)[:, :4].mean((2, 3)))


@pytest.mark.parametrize(
    ("model", "named"),
    [
        (_Flip(), "flip"),
        (_Reshape(), "flatten"),
        (_Slice(), "indexes the feature axis"),
        (nn.Sequential(nn.ConvTranspose2d(3, 8, 3), nn.Conv2d(8, 8, 3)), "transposed"),
        (timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, qk_norm=True),
         "q_norm"),
    ],
)
def test_unsupported_ops_are_named(model: nn.Module, named: str) -> None:
    with pytest.raises(AlignmentError, match="merge.align: none") as info:
        permutation_spec(model, input_size=(3, 32, 32))
    assert named in str(info.value)


class _TimmActivation(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(3, 8, 3), act, nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("act", ["Swish", "GELUTanh", "HardSwishMe", "DropPath", "DropBlock2d"])
def test_timm_elementwise_layers_keep_the_units(act: str) -> None:
    from timm.layers import activations, activations_me, drop

    layer = next(getattr(m, act) for m in (activations, activations_me, drop) if hasattr(m, act))()
    assert permutation_spec(_TimmActivation(layer), (3, 16, 16)).spaces == {"conv": 8}


def test_timm_prelu_is_refused_for_its_weight() -> None:
    from timm.layers.activations import PReLU

    with pytest.raises(AlignmentError, match="PReLU 'act' owns tensors"):
        permutation_spec(_TimmActivation(PReLU(8)), (3, 16, 16))


def test_a_module_type_or_an_op_has_one_rule() -> None:
    def another_relu(*args: object) -> None: ...

    with pytest.raises(ValueError, match="module rule 'another_relu' claims .*ReLU.*'pass_through_module'"):
        module_rule(nn.ReLU)(another_relu)
    with pytest.raises(ValueError, match="op rule 'another_relu' claims 'relu', which op rule 'unary'"):
        op_rule("relu")(another_relu)
    assert "another_relu" not in MODULE_RULES and "another_relu" not in OP_RULES


def test_permutations_round_trip_through_the_file_pair(tmp_path) -> None:
    model = make("tf_efficientnet_lite0", 0)
    spec = permutation_spec(model)
    perms = {"b": random_perms(spec, 3), "c": random_perms(spec, 4)}
    path = tmp_path / "permutations.safetensors"
    save_permutations(perms, path)
    loaded = load_permutations(path)
    assert loaded.keys() == perms.keys() and all(loaded[n].keys() == perms[n].keys() for n in perms)
    assert all(loaded[n][s].dtype == torch.int64 and torch.equal(loaded[n][s], perms[n][s]) for n in perms for s in perms[n])
    state = model.state_dict()
    again = apply_permutations(spec, loaded["b"], state)
    assert all(torch.equal(t, again[k]) for k, t in apply_permutations(spec, perms["b"], state).items())
    save_file({"no_source": torch.arange(3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AlignmentError, match="bad.safetensors.*'no_source'"):
        load_permutations(tmp_path / "bad.safetensors")


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
