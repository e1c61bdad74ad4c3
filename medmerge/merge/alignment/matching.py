"""Weight matching (Git Re-Basin): the permutations of one model's units that best match another's weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from medmerge.merge.alignment.apply import permute_axes
from medmerge.merge.alignment.spec import Concat, Local, PermutationSpec, space_names

log = logging.getLogger("medmerge.alignment")


def _matched_keys(spec: PermutationSpec, anchor: dict[str, Tensor], other: dict[str, Tensor]) -> list[str]:
    """Weight keys present in both states with equal shapes (differently sized heads are skipped)."""
    return [k for k in spec.weight_keys if k in anchor and k in other and anchor[k].shape == other[k].shape]


@dataclass
class _Term:
    """One weight axis in a space: the anchor's tensor with that axis first, flattened, and where the
    space's units sit along it (``offset`` for a Concat block; ``local`` for a grouped conv's input)."""

    key: str
    axis: int
    offset: int
    anchor: Tensor
    deps: tuple[str, ...]  # the spaces on the key's other axes: the term's cost changes with them
    local: int = 0  # groups of a Local axis


def _terms(spec: PermutationSpec, space: str, anchor: dict[str, Tensor], wanted: set[str]) -> list[_Term]:
    n = spec.spaces[space]
    terms = []
    for key, axis in spec.axes[space]:
        if key not in wanted:
            continue
        entry = spec.key_axes[key][axis]
        a = anchor[key].movedim(axis, 0)
        deps = tuple(dict.fromkeys(
            name for i, e in enumerate(spec.key_axes[key]) if i != axis for name in space_names(e)
        ))
        if isinstance(entry, Local):
            # rows (out channels) in groups; the units are (group, local index): (g, out/g, k, rest)
            terms.append(_Term(key, axis, 0, anchor[key], deps, local=entry.groups))
            continue
        offsets = [0]
        if isinstance(entry, Concat):
            offsets, start = [], 0
            for s, size in entry.segments:
                if s == space:
                    offsets.append(start)
                start += size
        for offset in offsets:
            terms.append(_Term(key, axis, offset, a[offset:offset + n].reshape(n, -1).contiguous(), deps))
    return terms


def _term_cost(
    spec: PermutationSpec, n: int, term: _Term, other: dict[str, Tensor], perms: dict[str, Tensor]
) -> Tensor:
    """``cost[i, j]``: how well unit ``j`` of ``other`` matches unit ``i`` of the anchor on one weight axis,
    every other axis at its current permutation."""
    entries = spec.key_axes[term.key]
    if term.local:
        # the other model's weight with its rows permuted: same groups, so row group g reads group g
        b = permute_axes(other[term.key], entries, perms, skip=1)
        g, k = term.local, b.shape[1]
        a = term.anchor.reshape(g, term.anchor.shape[0] // g, k, -1)
        blocks = torch.einsum("gmir,gmjr->gij", a, b.reshape(g, b.shape[0] // g, k, -1))
        return torch.block_diag(*blocks)
    b = permute_axes(other[term.key], entries, perms, skip=term.axis)  # its other blocks: sliced away
    b = b.movedim(term.axis, 0)[term.offset:term.offset + n].reshape(n, -1)
    return term.anchor @ b.T


def _assign(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment  # 0.6 s to import: only the stages that align pay it

    return linear_sum_assignment(cost, maximize=True)[1]


def _solve_unit(spec: PermutationSpec, unit: list[str], costs: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """The best permutations of the spaces in ``unit`` (one space, or the spaces sharing a head tie) under
    their group constraints: within groups; with a tie, whole groups too (the same for every space)."""
    first = unit[0]
    n, g = spec.spaces[first], spec.groups.get(first, 1)
    if g == 1:
        return {first: torch.from_numpy(_assign(costs[first]).astype(np.int64))}
    k = n // g
    tied = first in spec.ties
    # value[a, b] of putting old group b at new group a, and the inner assignment achieving it
    value = np.zeros((g, g))
    inner: dict[tuple[str, int, int], np.ndarray] = {}
    pairs = [(a, c) for a in range(g) for c in range(g)] if tied else [(a, a) for a in range(g)]
    for space in unit:
        for a, c in pairs:
            block = costs[space][a * k:(a + 1) * k, c * k:(c + 1) * k]
            cols = _assign(block)
            inner[space, a, c] = cols
            value[a, c] += block[np.arange(k), cols].sum()
    order = _assign(value) if tied else np.arange(g)
    return {space: torch.from_numpy(
        np.concatenate([order[a] * k + inner[space, a, order[a]] for a in range(g)]).astype(np.int64)
    ) for space in unit}


def _units(spec: PermutationSpec) -> list[list[str]]:
    units: dict[str, list[str]] = {}
    for space in spec.spaces:
        units.setdefault(spec.ties.get(space, space), []).append(space)
    return list(units.values())


def weight_matching(
    spec: PermutationSpec,
    anchor: dict[str, Tensor],
    other: dict[str, Tensor],
    max_iter: int = 100,
    seed: int = 0,
    tolerance: float = 0.01,
) -> dict[str, Tensor]:
    """Permutations of ``other``'s units that maximise its inner product with ``anchor`` (Git Re-Basin).

    Returns space name -> int64 permutation ``p`` (CPU): unit ``i`` of the aligned model is unit ``p[i]``
    of ``other``; pass it to :func:`apply_permutations`. Only floating parameters present in both states
    with equal shapes enter the cost; a space with none of them keeps the identity.

    The search starts with one sweep in network order, each unit matched on the weights whose other axes
    are fixed or already matched (the permutations propagate from the input as a forward pass does; a
    permuted copy is recovered exactly there, where coordinate ascent from identities can lock into a wrong
    residual stream). Then sweeps in random order solve each unit with all its weights; a unit whose
    neighbours did not change since it was last solved is skipped (exact), and a sweep that gains less than
    ``tolerance`` of the total gain over the identity so far ends the search (0: run to a fixed point).
    The identity is kept if it scores higher.
    """
    keys = _matched_keys(spec, anchor, other)
    a32 = {k: anchor[k].detach().to("cpu", torch.float32) for k in keys}
    b32 = {k: other[k].detach().to("cpu", torch.float32) for k in keys}
    search = _Search(spec, a32, b32)
    identity = {s: torch.arange(n) for s, n in spec.spaces.items()}
    start = _objective(spec, a32, b32, identity)
    search.forward_sweep()
    objective = search.objective()
    generator = torch.Generator().manual_seed(seed)
    for sweep in range(1, max_iter + 1):
        gain = search.sweep(torch.randperm(len(search.units), generator=generator).tolist())
        objective += gain
        log.debug("weight matching sweep %d: gain %.3g, %.6g -> %.6g", sweep, gain, start, objective)
        if gain <= tolerance * (objective - start):
            break
    log.debug("weight matching: %d spaces, %d sweeps, %d assignments", len(spec.spaces), sweep, search.solves)
    if start > objective:
        return identity
    return search.perms


def _objective(
    spec: PermutationSpec, a: dict[str, Tensor], b: dict[str, Tensor], perms: dict[str, Tensor]
) -> float:
    return sum(
        float(torch.dot(a[k].flatten(), permute_axes(b[k], spec.key_axes[k], perms).flatten())) for k in a
    )


class _Search:
    """The state of one weight-matching search: current permutations, and when each unit changed."""

    def __init__(self, spec: PermutationSpec, a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
        self.spec, self.a, self.b = spec, a, b
        self.perms = {s: torch.arange(n) for s, n in spec.spaces.items()}
        self.units = _units(spec)
        self.terms = {s: _terms(spec, s, a, set(a)) for s in spec.spaces}
        unit_of = {s: i for i, unit in enumerate(self.units) for s in unit}
        self.neighbours = [
            {unit_of[o] for s in unit for t in self.terms[s] for o in _names_of_key(spec, t.key)} - {i}
            for i, unit in enumerate(self.units)
        ]
        self.changed_at = [0] * len(self.units)
        self.solved_at = [-1] * len(self.units)
        self.step = self.solves = 0
        self.version = dict.fromkeys(spec.spaces, 0)
        self.cache: dict[int, tuple[tuple[int, ...], Tensor]] = {}

    def objective(self) -> float:
        return _objective(self.spec, self.a, self.b, self.perms)

    def solve(self, index: int, terms: dict[str, list[_Term]]) -> float:
        """Re-match unit ``index`` on ``terms``; the gain in its part of the objective (0: kept)."""
        unit, spec = self.units[index], self.spec
        self.step += 1
        self.solves += 1
        self.solved_at[index] = self.step
        costs = {s: self.cost(s, terms[s]) for s in unit}
        new = _solve_unit(spec, unit, costs)
        rows = np.arange(spec.spaces[unit[0]])
        old = sum(costs[s][rows, self.perms[s].numpy()].sum() for s in unit)
        gain = sum(costs[s][rows, new[s].numpy()].sum() for s in unit) - old
        if gain <= 1e-9 * max(1.0, abs(old)):
            return 0.0
        self.perms.update(new)
        self.changed_at[index] = self.step
        for s in unit:
            self.version[s] += 1
        return float(gain)

    def cost(self, space: str, terms: list[_Term]) -> np.ndarray:
        """The assignment cost of ``space``; each term's part is cached until a space it depends on
        changes."""
        n = self.spec.spaces[space]
        total = torch.zeros(n, n, dtype=torch.float32)
        for term in terms:
            stamp = tuple(self.version[d] for d in term.deps)
            cached = self.cache.get(id(term))
            if cached is None or cached[0] != stamp:
                cached = (stamp, _term_cost(self.spec, n, term, self.b, self.perms))
                self.cache[id(term)] = cached
            total += cached[1]
        return total.double().numpy()

    def forward_sweep(self) -> None:
        matched: set[str] = set()
        for index, unit in enumerate(self.units):
            matched.update(unit)
            ready = {s: [t for t in self.terms[s] if set(_names_of_key(self.spec, t.key)) <= matched]
                     for s in unit}
            if any(ready.values()):
                self.solve(index, ready)

    def sweep(self, order: list[int]) -> float:
        gain = 0.0
        for index in order:
            unit = self.units[index]
            stale = self.solved_at[index] < 0 or any(
                self.changed_at[o] >= self.solved_at[index] for o in self.neighbours[index]
            )
            if stale and any(self.terms[s] for s in unit):
                gain += self.solve(index, self.terms)
        return gain


def _names_of_key(spec: PermutationSpec, key: str) -> list[str]:
    return [name for entry in spec.key_axes[key] for name in space_names(entry)]


def alignment_similarity(spec: PermutationSpec, anchor: dict[str, Tensor], other: dict[str, Tensor]) -> float:
    """Sum over the spec'd weights (present in both with equal shapes) of ``<anchor[k], other[k]>``."""
    total = 0.0
    for key in _matched_keys(spec, anchor, other):
        a = anchor[key].detach().to("cpu", torch.float64)
        total += float((a * other[key].detach().to("cpu", torch.float64)).sum())
    return total
