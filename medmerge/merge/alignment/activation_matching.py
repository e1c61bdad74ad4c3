"""Activation matching (Git Re-Basin, Ainsworth, Hayase & Srinivasa, ICLR 2023, the data-based variant): the
permutations of one model's units that best correlate its features with an anchor's on images.

Each space is matched on its own: a unit's features do not depend on how the other spaces are permuted (a
permutation never changes what a unit computes, only where it sits), so the spaces' assignments are
independent and solved one linear assignment each (neither a sequential nor a joint search is needed). The
cost of putting unit ``j`` of the other model at unit ``i`` of the anchor is the Pearson correlation of their
features over the target images and positions (:mod:`medmerge.merge.alignment.activations`), maximised; the
group constraints (grouped convs, attention heads) are those of weight matching. A unit that does not vary on
the data (a dead ReLU) correlates 0 with everything: its place is arbitrary among such units.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from medmerge.merge.alignment.activations import SpaceStatistics
from medmerge.merge.alignment.matching import _solve_unit, _units
from medmerge.merge.alignment.spec import PermutationSpec

log = logging.getLogger("medmerge.alignment")


def activation_matching(
    spec: PermutationSpec, stats: dict[str, SpaceStatistics], anchor: int = 0, other: int = 1
) -> dict[str, Tensor]:
    """Permutations of model ``other``'s units maximising the summed correlation of its features with model
    ``anchor``'s (indices into the models of ``stats``, from :func:`feature_statistics`).

    Returns space -> int64 permutation ``p``, as :func:`weight_matching` (unit ``i`` of the aligned model is
    unit ``p[i]`` of ``other``); a space without statistics keeps the identity.
    """
    perms = {space: torch.arange(n) for space, n in spec.spaces.items()}
    for unit in _units(spec):
        if not any(space in stats for space in unit):
            continue
        costs = {space: (stats[space].correlation(anchor, other).numpy() if space in stats
                         else torch.zeros(spec.spaces[space], spec.spaces[space], dtype=torch.float64).numpy())
                 for space in unit}
        perms.update(_solve_unit(spec, unit, costs))
    return perms


def mean_correlation(stats: dict[str, SpaceStatistics], anchor: int, other: int,
                     perms: dict[str, Tensor] | None = None) -> float:
    """The mean over spaces and units of the correlation of each anchor unit with the other model's unit at
    its place (after ``perms`` when given): how alike the two models' features are."""
    values = []
    for space, s in stats.items():
        corr = s.correlation(anchor, other)
        index = perms[space] if perms is not None else torch.arange(corr.shape[0])
        values.append(corr[torch.arange(corr.shape[0]), index].mean())
    return float(torch.stack(values).mean()) if values else 0.0
