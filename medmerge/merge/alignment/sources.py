"""The sources of a merge aligned onto an anchor source (and saved permutations re-applied), one spec per
architecture traced once per process."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from medmerge.merge.alignment.apply import apply_permutations
from medmerge.merge.alignment.matching import alignment_similarity, weight_matching
from medmerge.merge.alignment.spec import PermutationSpec
from medmerge.merge.alignment.tracing import permutation_spec
from medmerge.models import backbone_state, create_model, load_backbone

log = logging.getLogger("medmerge.alignment")


@functools.lru_cache(maxsize=4)
def alignment_skeleton(arch: str) -> tuple[nn.Module, PermutationSpec]:
    """A model of ``arch`` (to tell its head from its backbone) and its permutation spec, traced once per
    process and shared by :func:`align_sources` and :func:`apply_saved_permutations`."""
    skeleton = create_model(arch, num_classes=2)
    return skeleton, permutation_spec(skeleton)


def align_sources(
    arch: str, sources: Sequence[dict[str, Tensor]], source_names: Sequence[str], anchor: str, seed: int = 0
) -> tuple[list[dict[str, Tensor]], dict[str, dict[str, Tensor]], dict[str, dict[str, float]]]:
    """Permute every non-anchor source's hidden units onto the anchor's (weight matching, Git Re-Basin).

    The permutation structure comes from tracing the architecture (``medmerge.merge.alignment``); the
    sources' own heads are left out (they classify different source tasks). Returns the aligned backbones,
    the permutations per source (space -> index tensor) and, per source, the weight similarity to the anchor
    before and after.
    """
    skeleton, spec = alignment_skeleton(arch)
    backbones = [backbone_state(state, skeleton) for state in sources]
    reference = backbones[list(source_names).index(anchor)]
    aligned, permutations, report = [], {}, {}
    for name, state in zip(source_names, backbones, strict=True):
        if name == anchor:
            aligned.append(state)
            continue
        perms = weight_matching(spec, reference, state, seed=seed)
        aligned.append(apply_permutations(spec, perms, state))
        permutations[name] = perms
        report[name] = {"similarity_before": alignment_similarity(spec, reference, state),
                        "similarity_after": alignment_similarity(spec, reference, aligned[-1])}
        log.info("aligned %s to %s: weight similarity %.4g -> %.4g", name, anchor,
                 report[name]["similarity_before"], report[name]["similarity_after"])
    return aligned, permutations, report


def apply_saved_permutations(
    arch: str, sources: Sequence[dict[str, Tensor]], source_names: Sequence[str], permutations: dict[str, dict]
) -> list[dict[str, Tensor]]:
    """Re-apply permutations that :func:`align_sources` found (``collapse`` rebuilds the aligned sources)."""
    skeleton, spec = alignment_skeleton(arch)
    return [apply_permutations(spec, permutations[name], backbone_state(state, skeleton))
            if name in permutations else backbone_state(state, skeleton)
            for name, state in zip(source_names, sources, strict=True)]


def source_models(arch: str, sources: Sequence[dict[str, Tensor]], device: torch.device | str = "cpu"
                  ) -> list[nn.Module]:
    """Each source's backbone in a model of ``arch`` (eval mode, on ``device``; the head is the skeleton's, and
    no permutation space reads it), for the methods that run the sources on images."""
    skeleton, _ = alignment_skeleton(arch)
    models = []
    for state in sources:
        model = copy.deepcopy(skeleton)
        load_backbone(model, backbone_state(state, skeleton))
        models.append(model.to(device).eval())
    return models


def align_sources_by_activations(
    arch: str, sources: Sequence[dict[str, Tensor]], source_names: Sequence[str], anchor: str,
    inputs: Callable[[], Iterable[Tensor]], device: torch.device | str = "cpu",
) -> tuple[list[dict[str, Tensor]], dict[str, dict[str, Tensor]], dict[str, dict[str, float]]]:
    """Permute every non-anchor source's hidden units onto the anchor's by activation matching (Git Re-Basin,
    data-based): the correlation of their features on ``inputs()`` (model-ready batches, e.g. the target
    training images) maximised space by space. Returns what :func:`align_sources` returns; each source's
    report also holds the mean feature correlation to the anchor before and after."""
    from medmerge.merge.alignment.activation_matching import activation_matching, mean_correlation
    from medmerge.merge.alignment.activations import feature_statistics

    skeleton, spec = alignment_skeleton(arch)
    backbones = [backbone_state(state, skeleton) for state in sources]
    order = list(source_names)
    first = order.index(anchor)
    ranked = [first] + [i for i in range(len(order)) if i != first]  # the anchor is model 0 of the statistics
    stats = feature_statistics(source_models(arch, [sources[i] for i in ranked], device), spec, inputs())
    reference = backbones[first]
    aligned, permutations, report = [], {}, {}
    for index, (name, state) in enumerate(zip(source_names, backbones, strict=True)):
        if name == anchor:
            aligned.append(state)
            continue
        other = ranked.index(index)
        perms = activation_matching(spec, stats, 0, other)
        aligned.append(apply_permutations(spec, perms, state))
        permutations[name] = perms
        report[name] = {"similarity_before": alignment_similarity(spec, reference, state),
                        "similarity_after": alignment_similarity(spec, reference, aligned[-1]),
                        "correlation_before": mean_correlation(stats, 0, other),
                        "correlation_after": mean_correlation(stats, 0, other, perms)}
        log.info("aligned %s to %s by activations: feature correlation %.4f -> %.4f", name, anchor,
                 report[name]["correlation_before"], report[name]["correlation_after"])
    return aligned, permutations, report
