"""Activation matching (Git Re-Basin, data-based): a permuted copy's permutation is recovered exactly."""

from __future__ import annotations

import torch
from test_activations import batches, permuted_twins

from medmerge.merge.alignment import (
    activation_matching,
    align_sources_by_activations,
    apply_permutations,
    feature_statistics,
)
from medmerge.merge.alignment.activation_matching import mean_correlation


def test_activation_matching_recovers_the_permutation_of_a_copy() -> None:
    model, twin, spec, perms = permuted_twins()
    stats = feature_statistics([model, twin], spec, batches())
    # the copy's unit i is the model's unit perms[i]: aligning the model onto the copy recovers perms
    found = activation_matching(spec, stats, anchor=1, other=0)
    assert set(found) == set(spec.spaces)
    for space, perm in perms.items():
        assert torch.equal(found[space], perm), space
    # and the other way round: the inverse, which undoes it
    back = activation_matching(spec, stats, anchor=0, other=1)
    restored = apply_permutations(spec, back, twin.state_dict())
    assert all(torch.equal(restored[k], v) for k, v in model.state_dict().items())
    assert mean_correlation(stats, 0, 1, back) > 0.999 > mean_correlation(stats, 0, 1)


def test_align_sources_by_activations_undoes_a_permutation() -> None:
    model, twin, _, _ = permuted_twins()
    names = ["a", "b"]
    inputs = batches()
    aligned, permutations, report = align_sources_by_activations(
        "test_resnet", [model.state_dict(), twin.state_dict()], names, "a", lambda: iter(inputs))
    assert set(permutations) == {"b"}
    assert all(torch.equal(aligned[1][k], aligned[0][k]) for k in aligned[0])
    assert report["b"]["correlation_after"] > 0.999 > report["b"]["correlation_before"]
    assert report["b"]["similarity_after"] > report["b"]["similarity_before"]
