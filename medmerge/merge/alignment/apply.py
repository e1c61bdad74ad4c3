"""Applying permutations to a state dict (it never changes the function), and drawing random ones."""

from __future__ import annotations

import torch
from torch import Tensor

from medmerge.merge.alignment.spec import AxisSpace, Concat, Local, PermutationSpec


def _axis_index(entry: str | Concat, perms: dict[str, Tensor]) -> Tensor | None:
    """The index that permutes an axis (None: identity)."""
    if isinstance(entry, str):
        return perms.get(entry)
    parts, offset, changed = [], 0, False
    for space, size in entry.segments:
        perm = perms.get(space) if space is not None else None
        changed |= perm is not None
        parts.append((perm if perm is not None else torch.arange(size)) + offset)
        offset += size
    return torch.cat(parts) if changed else None


def _local_gather(tensor: Tensor, local: Local, perm: Tensor) -> Tensor:
    """Permute axis 1 of a grouped conv weight: output group g reads group g of ``local.space``."""
    g = local.groups
    k = tensor.shape[1]
    inner = perm.to(tensor.device).view(g, k) - (torch.arange(g, device=tensor.device) * k)[:, None]
    rows = tensor.reshape(g, tensor.shape[0] // g, k, -1)
    index = inner[:, None, :, None].expand(g, rows.shape[1], k, rows.shape[3])
    return rows.gather(2, index).reshape(tensor.shape)


def permute_axes(
    tensor: Tensor, entries: tuple[AxisSpace, ...], perms: dict[str, Tensor], skip: int = -1
) -> Tensor:
    """``tensor`` with every axis permuted by its entry's spaces (those in ``perms``), axis ``skip`` aside."""
    for axis, entry in enumerate(entries):
        if axis == skip or entry is None:
            continue
        if isinstance(entry, Local):
            if entry.space in perms:
                tensor = _local_gather(tensor, entry, perms[entry.space])
            continue
        index = _axis_index(entry, perms)
        if index is not None:
            tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor


def _check_permutation(spec: PermutationSpec, space: str, perm: Tensor) -> None:
    n = spec.spaces[space]
    if perm.shape != (n,) or not torch.equal(torch.sort(perm.cpu()).values, torch.arange(n)):
        raise ValueError(f"permutation for space '{space}' is not a permutation of {n} units")
    g = spec.groups.get(space, 1)
    if g > 1:
        blocks = perm.cpu().view(g, n // g) // (n // g)
        if not bool((blocks == blocks[:, :1]).all()) or (space not in spec.ties and
                                                         not torch.equal(blocks[:, 0], torch.arange(g))):
            raise ValueError(f"permutation for space '{space}' moves units out of their {g} groups")


def apply_permutations(
    spec: PermutationSpec, perms: dict[str, Tensor], state: dict[str, Tensor]
) -> dict[str, Tensor]:
    """A new state dict with every spec'd axis permuted (``out = t.index_select(axis, perm)``).

    Keys outside the spec (num_batches_tracked, the logits axis of the head, ...) are returned unchanged;
    spaces missing from ``perms`` keep the identity.
    """
    unknown = set(perms) - set(spec.spaces)
    if unknown:
        raise ValueError(f"permutations for spaces not in the spec: {sorted(unknown)[:5]}")
    for space, perm in perms.items():
        _check_permutation(spec, space, perm)
    out = {}
    for key, tensor in state.items():
        entries = spec.key_axes.get(key)
        if entries is not None:
            if tensor.dim() != len(entries):
                raise ValueError(f"'{key}' has {tensor.dim()} axes, the spec expects {len(entries)}")
            tensor = permute_axes(tensor, entries, perms)
        out[key] = tensor
    return out


def random_permutations(spec: PermutationSpec, seed: int = 0) -> dict[str, Tensor]:
    """A random member of the spec's symmetry group (heads shuffled with their ties, units within groups)."""
    generator = torch.Generator().manual_seed(seed)
    group_perms: dict[str, Tensor] = {}
    perms = {}
    for space, n in spec.spaces.items():
        g = spec.groups.get(space, 1)
        k = n // g
        tie = spec.ties.get(space)
        order = torch.arange(g)
        if tie is not None:
            order = group_perms.setdefault(tie, torch.randperm(g, generator=generator))
        inner = torch.stack([torch.randperm(k, generator=generator) for _ in range(g)])
        perms[space] = (order[:, None] * k + inner).reshape(n)
    return perms
