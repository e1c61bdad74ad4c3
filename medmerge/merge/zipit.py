"""ZipIt! (Stoica et al., ICLR 2024): merge N same-architecture networks by pairing their most correlated
features, within and across models, in every permutation space of the traced spec (docs/methods.md).

Three parts, each usable alone:

- :func:`zip_correlation`: the greedy "zip" of one space, a pure function of the ``(N*C, N*C)`` correlation
  matrix of the N models' concatenated features: a merge matrix ``M`` (``C x N*C``, each row the average of a
  group of features) and an unmerge matrix ``U`` (``N*C x C``, 0/1: which merged feature reproduces each
  original one).
- :func:`space_correlations`: those matrices from the models' activations on a few images, per space.
- :func:`zip_states`: the merged state dict: for every tensor of the spec, ``sum_n A0_n T_n A1_n ...``
  where the output axis (axis 0) takes ``M``'s block of model ``n`` and every input axis ``U``'s block
  (for a conv/linear weight: ``M blockdiag(W_n) U``); per-channel tensors (biases, norms, depthwise kernels)
  take ``M`` alone, i.e. the average of each group, which is exact structure: ``M D U`` of a diagonal ``D``
  is diagonal because the groups partition the features.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from medmerge.merge.alignment.spec import Concat, Local, PermutationSpec

log = logging.getLogger("medmerge.merge.zipit")

Merges = dict[str, tuple[Tensor, Tensor]]  # space -> (merge M: C x N*C, unmerge U: N*C x C)

#: norms whose statistics run across the units: a group with two units of one model would change them
_CROSS_UNIT_NORMS = (nn.LayerNorm, nn.GroupNorm)


def correlation(covariance: Tensor, eps: float = 1e-7) -> Tensor:
    """Pearson correlation from a covariance matrix (a unit that never varies correlates 0 with all)."""
    std = torch.diagonal(covariance).clamp_min(0).sqrt()
    return (covariance / torch.outer(std, std).clamp_min(eps)).clamp(-1, 1)


def zip_correlation(corr: Tensor, num_models: int, alpha: float = 0.3, beta: float = 0.125,
                    same_model_merges: bool = True, cross_only: bool = False) -> tuple[Tensor, Tensor]:
    """ZipIt!'s greedy matching of one space (the public code's ``match_tensors_zipit``, re-derived).

    ``corr`` is the correlation of the ``N*C`` features, model by model (features ``n*C .. (n+1)*C - 1`` are
    model ``n``'s). Until ``C`` features remain, the most correlated pair of current features is merged;
    a merged feature's correlation to another is the minimum of its members'. ``alpha`` (repeated matching):
    0 lets a merged feature join no further feature of a model it already holds; > 0 lets it join any, its
    correlations scaled by ``alpha``. ``beta`` (same-model budget): each model may take part in at most
    ``int(beta * (N*C - C) / N)`` merges of two features of its own; ``same_model_merges=False`` (or
    ``cross_only``, for spaces whose norm mixes the units) allows none, so with ``alpha=0`` every group holds
    exactly one feature of each model (a permutation per model).

    Returns ``(M, U)``: ``M`` (``C x N*C``) averages each group, ``U`` (``N*C x C``) is its 0/1 membership;
    groups are ordered by their first feature (model 0's order first).
    """
    total = corr.shape[0]
    if corr.shape != (total, total) or total % num_models:
        raise ValueError(f"zipit: a correlation of {tuple(corr.shape)} is not square over {num_models} models")
    width = total // num_models
    sims = torch.nan_to_num(corr.detach().to(torch.float32).clone(), nan=0.0)
    neg = float("-inf")
    sims.fill_diagonal_(neg)
    models = torch.zeros(total, num_models, dtype=torch.bool)
    models[torch.arange(total), torch.arange(total) // width] = True
    budget = torch.full((num_models,), int(beta * ((total - width) // num_models) + 1e-4))
    forbid_shared = cross_only or not same_model_merges or int(budget[0]) <= 0
    if forbid_shared:
        sims[models.float() @ models.float().T > 0] = neg
    members: list[list[int]] = [[i] for i in range(total)]
    alive = torch.ones(total, dtype=torch.bool)
    best, best_at = sims.max(dim=1)  # each row's maximum, kept up to date: the argmax of the whole matrix is slow
    for _ in range(total - width):
        i = int(torch.argmax(best))
        j = int(best_at[i])
        if best[i] == neg:
            raise RuntimeError(f"zipit: no pair left to merge with {int(alive.sum())} features of {width} wanted")
        i, j = min(i, j), max(i, j)
        shared = models[i] & models[j]
        members[i] += members[j]
        members[j] = []
        alive[j] = False
        models[i] |= models[j]
        row = torch.minimum(sims[i], sims[j])
        shares = (models.float() @ models[i].float()) > 0
        if alpha > 0:
            row = row * alpha
        if alpha <= 0 or forbid_shared:
            row[shares] = neg
        row[~alive] = neg
        row[i] = neg
        sims[i], sims[:, i] = row, row
        sims[j], sims[:, j] = neg, neg
        stale = (best_at == i) | (best_at == j)
        if bool(shared.any()):  # a merge inside one model spends that model's budget
            budget[shared] -= 1
            for m in torch.nonzero(shared & (budget <= 0)).flatten().tolist():
                holds = models[:, m]
                sims[holds[:, None] & holds[None, :]] = neg
                stale |= holds
        stale[i] = True
        best[stale], best_at[stale] = sims[stale].max(dim=1)
        better = row > best
        best[better], best_at[better] = row[better], i
    groups = [members[i] for i in torch.nonzero(alive).flatten().tolist()]
    unmerge = torch.zeros(total, width, dtype=corr.dtype, device=corr.device)
    for g, group in enumerate(groups):
        unmerge[group, g] = 1.0
    merge = (unmerge / unmerge.sum(dim=0, keepdim=True)).T.contiguous()
    return merge, unmerge


def check_zippable(spec: PermutationSpec) -> None:
    """Stop with one line naming ``zipit`` and a layer whose units a merge matrix cannot be pushed through."""
    for space, groups in spec.groups.items():
        key = spec.axes[space][0][0]
        what = "attention heads" if space in spec.ties else f"a grouped layer ({groups} groups)"
        raise ValueError(f"zipit cannot merge '{key}': {what} would mix units across groups; supported are "
                         "plain and depthwise convs, linear layers, norms and residual/gating ops")
    for key, entries in spec.key_axes.items():
        if any(isinstance(e, Local) for e in entries):
            raise ValueError(f"zipit cannot merge '{key}': a grouped conv's local input axis")


def cross_only_spaces(spec: PermutationSpec, model: nn.Module) -> set[str]:
    """Spaces normalised by a LayerNorm/GroupNorm (statistics across the units): zipped across models only."""
    modules = dict(model.named_modules())
    found = set()
    for key, entries in spec.key_axes.items():
        owner = modules.get(key.rsplit(".", 1)[0]) if "." in key else model
        if isinstance(owner, _CROSS_UNIT_NORMS) and isinstance(entries[0], str):
            found.add(entries[0])
    return found


def layer_sites(model: nn.Module, spec: PermutationSpec) -> dict[str, list[str]]:
    """Space -> the conv/linear layers (depthwise included) whose outputs carry it; a space no such layer
    writes keeps the norm sites of :func:`~medmerge.merge.alignment.activations.feature_sites`.

    Before the norm and the activation: a unit that an activation kills on the data (a dead ReLU, a
    saturated ReLU6) still varies there, so it is matched by what it computes, not left to tie at zero
    correlation with every other dead unit; a BatchNorm in eval mode is affine per unit and changes no
    correlation but a sign.
    """
    from medmerge.merge.alignment.activations import feature_sites

    sites = feature_sites(model, spec)
    for name, module in model.named_modules():
        entries = spec.key_axes.get(f"{name}.weight")
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear) and entries and isinstance(entries[0], str):
            sites.setdefault(f"layers:{entries[0]}", []).append(name)
    return {space: sites.get(f"layers:{space}") or names for space, names in sites.items()
            if not space.startswith("layers:")}


@torch.no_grad()
def space_correlations(models: Sequence[nn.Module], spec: PermutationSpec, batches: Iterable[Tensor]
                       ) -> dict[str, Tensor]:
    """Per space, the correlation of the N models' concatenated features (``N*C`` square, model-major) over
    ``batches`` (:mod:`medmerge.merge.alignment.activations`; every position a sample), read at the outputs
    of the conv/linear layers that write the space (:func:`layer_sites`)."""
    from medmerge.merge.alignment.activations import feature_statistics

    stats = feature_statistics(models, spec, batches, layer_sites(models[0], spec))
    missing = sorted(set(spec.spaces) - set(stats))
    if missing:
        raise ValueError(f"zipit: no conv/linear/norm output carries space '{missing[0]}' to correlate")
    return {space: stats[space].joint_correlation() for space in spec.spaces}


def _axis_matrix(entry: str | Concat, size: int, model: int, merges: Merges, output_side: bool) -> Tensor:
    """The matrix (new x old) that maps axis ``entry`` of model ``model``'s tensor to the merged axis."""
    segments = [(entry, size)] if isinstance(entry, str) or entry is None else list(entry.segments)
    blocks = []
    for space, length in segments:
        if space is None:  # not merged: summed over the models here, averaged by the caller on axis 0
            blocks.append(torch.eye(length))
            continue
        merge, unmerge = merges[space]
        cols = slice(model * length, (model + 1) * length)
        blocks.append(merge[:, cols] if output_side else unmerge[cols, :].T)
    return torch.block_diag(*blocks)


def zip_states(spec: PermutationSpec, states: Sequence[dict[str, Tensor]], merges: Merges,
               owner: Callable[[str], nn.Module | None] | None = None) -> dict[str, Tensor]:
    """The merged state dict (see the module docstring). Tensors outside the spec are averaged (integer
    buffers such as ``num_batches_tracked`` taken from the first state)."""
    count = len(states)
    merged = {}
    for key, first in states[0].items():
        entries = spec.key_axes.get(key)
        if not first.is_floating_point():
            merged[key] = first.clone()
            continue
        if entries is None:
            merged[key] = sum(s[key].double() for s in states).div(count).to(first.dtype)
            continue
        if entries[0] is None and first.dim() > 1 and owner is not None and not isinstance(
                owner(key), nn.modules.conv._ConvNd | nn.Linear):
            raise ValueError(f"zipit cannot merge '{key}': its units are not on its first axis")
        total = None
        for n, state in enumerate(states):
            tensor = state[key].double()
            for axis, entry in enumerate(entries):
                if entry is None:
                    continue
                if isinstance(entry, Concat) and all(s is None for s, _ in entry.segments):
                    continue
                matrix = _axis_matrix(entry, tensor.shape[axis], n, merges, axis == 0).double()
                tensor = torch.movedim(torch.tensordot(matrix, tensor, dims=([1], [axis])), 0, axis)
            total = tensor if total is None else total + tensor
        if entries[0] is None or isinstance(entries[0], Concat):
            total = _average_fixed_rows(total, entries[0], count)
        merged[key] = total.to(first.dtype)
    return merged


def _average_fixed_rows(total: Tensor, entry, count: int) -> Tensor:
    """Divide by the number of models the rows of axis 0 that no space merges (they were summed)."""
    if entry is None:
        return total / count
    offset, scale = 0, torch.ones(total.shape[0], dtype=total.dtype)
    for space, length in entry.segments:
        if space is None:
            scale[offset:offset + length] = 1.0 / count
        offset += length
    return total * scale.view(-1, *[1] * (total.dim() - 1))


def zip_sources(skeleton: nn.Module, spec: PermutationSpec, states: Sequence[dict[str, Tensor]],
                batches: Iterable[Tensor], alpha: float = 0.3, beta: float = 0.125, same_model_merges: bool = True,
                device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], dict]:
    """ZipIt! of ``states`` (backbones of ``skeleton``'s architecture, anchor first) to one state of the
    anchor's width, the features correlated on ``batches``; and a summary (merges inside one model, per
    space and in all)."""
    import copy

    check_zippable(spec)
    models = []
    for state in states:
        model = copy.deepcopy(skeleton)
        model.load_state_dict(state, strict=False)
        model.to(device)
        models.append(model)
    corrs = space_correlations(models, spec, batches)
    cross = cross_only_spaces(spec, skeleton)
    merges = {space: zip_correlation(corrs[space].float(), len(states), alpha, beta, same_model_merges,
                                     space in cross)
              for space in spec.spaces}
    modules = dict(skeleton.named_modules())
    merged = zip_states(spec, states, {s: (m.cpu(), u.cpu()) for s, (m, u) in merges.items()},
                        owner=lambda key: modules.get(key.rsplit(".", 1)[0]))
    within = {space: within_model_merges(unmerge, len(states)) for space, (_, unmerge) in merges.items()}
    log.info("zipit: %d spaces, %d merges inside one model", len(merges), sum(within.values()))
    return merged, {"within_model_merges": sum(within.values()),
                    "merged_units": sum(m.shape[0] for m, _ in merges.values()),
                    "cross_model_only_spaces": sorted(cross)}


def within_model_merges(unmerge: Tensor, num_models: int) -> int:
    """How many merges joined two features of one model: per group, its size less its distinct models."""
    per_model = unmerge.reshape(num_models, -1, unmerge.shape[1]).sum(dim=1)  # models x groups
    return int((per_model.sum(dim=0) - (per_model > 0).sum(dim=0)).sum())
