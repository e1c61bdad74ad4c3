"""Activation capture on the traced spec: the sites of each space, and statistics that follow a permutation."""

from __future__ import annotations

import copy
import functools

import timm
import torch
from torch import nn

from medmerge.merge.alignment import (
    apply_permutations,
    feature_sites,
    feature_statistics,
    permutation_spec,
    random_permutations,
)


@functools.lru_cache(maxsize=2)
def permuted_twins(arch: str = "test_resnet", size: int = 64, seed: int = 0):
    """A model with live units (random BN affine, positive shifts), a copy with its units permuted, the spec
    and the permutation."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) * 0.5 + 0.5)
    model.eval()
    spec = permutation_spec(model, (3, size, size))
    perms = random_permutations(spec, seed + 1)
    twin = copy.deepcopy(model)
    twin.load_state_dict(apply_permutations(spec, perms, model.state_dict()))
    return model, twin.eval(), spec, perms


@functools.lru_cache(maxsize=2)
def batches(size: int = 64, count: int = 2, seed: int = 3) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(8, 3, size, size, generator=generator) for _ in range(count))


def test_sites_cover_every_space_and_residual_spaces_have_several() -> None:
    model, _, spec, _ = permuted_twins()
    sites = feature_sites(model, spec)
    assert set(sites) == set(spec.spaces)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], nn.BatchNorm2d) for names in sites.values() for n in names)
    assert any(len(names) > 1 for names in sites.values())  # a residual stream read after every block


def test_statistics_of_a_permuted_copy_are_the_permuted_statistics() -> None:
    model, twin, spec, perms = permuted_twins()
    stats = feature_statistics([model, twin], spec, batches())
    assert set(stats) == set(spec.spaces)
    for space, s in stats.items():
        p = perms[space]
        assert s.second.shape == (2, 2, spec.spaces[space], spec.spaces[space])
        close = {"atol": 1e-5, "rtol": 1e-4}  # the copy's float32 sums round differently
        torch.testing.assert_close(s.mean[1], s.mean[0][p], **close)
        torch.testing.assert_close(s.covariance(1, 1), s.covariance(0, 0)[p][:, p], **close)
        torch.testing.assert_close(s.covariance(0, 1), s.covariance(1, 0).T)
        corr = s.correlation(1, 0)
        torch.testing.assert_close(corr[torch.arange(len(p)), p], torch.ones(len(p), dtype=torch.float64), **close)
        joint = s.joint_correlation()
        assert joint.shape == (2 * len(p), 2 * len(p))
        torch.testing.assert_close(joint[len(p):, :len(p)], corr)
    assert not model.training and not twin.training


def test_statistics_equal_a_direct_computation() -> None:
    model, twin, spec, _ = permuted_twins()
    sites = feature_sites(model, spec)
    space = next(s for s, names in sites.items() if len(names) == 1)
    captured = []
    handle = dict(model.named_modules())[sites[space][0]].register_forward_hook(
        lambda m, i, out: captured.append(out.detach().clone()))  # before the in-place ReLU
    xs = batches()
    with torch.no_grad():
        for x in xs:
            model(x)
    handle.remove()
    values = torch.cat([c.movedim(1, -1).reshape(-1, c.shape[1]) for c in captured]).double()
    stats = feature_statistics([model, twin], spec, xs)[space]
    assert stats.count == values.shape[0] == 16 * captured[0].shape[2] * captured[0].shape[3]
    torch.testing.assert_close(stats.mean[0], values.mean(dim=0))
    torch.testing.assert_close(stats.covariance(0, 0), torch.cov(values.T, correction=0))
