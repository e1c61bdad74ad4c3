"""The permutation symmetry of one architecture as plain data (:class:`PermutationSpec`) and the error raised
when a model has none that alignment can follow."""

from __future__ import annotations

from dataclasses import dataclass, field

from medmerge.errors import InputError

UNSUPPORTED_HINT = (
    "weight-matching alignment follows conv/linear/norm/attention layers and channel-wise ops "
    "(use merge.align: none)"
)


class AlignmentError(ValueError, InputError):
    """The model contains a layer or an operation whose channel symmetry alignment cannot follow."""


@dataclass(frozen=True)
class Concat:
    """An axis made of consecutive blocks, each permuted by its own space (None: not permuted)."""

    segments: tuple[tuple[str | None, int], ...]


@dataclass(frozen=True)
class Local:
    """The input axis of a grouped conv's weight: the rows of output group ``g`` hold the channels of group
    ``g`` of ``space`` (whose permutation keeps channels inside their groups), permuted as that group is."""

    space: str
    groups: int


AxisSpace = str | Concat | Local | None


@dataclass(frozen=True)
class PermutationSpec:
    """The permutation symmetry of one architecture.

    A *space* is a set of hidden units that must be permuted together for the network to compute the same
    function: the output channels of a conv/linear layer, plus every tensor axis that reads or carries them
    (the next layer's input axis, a norm's per-channel parameters and running statistics, a depthwise conv's
    channels, every branch joined to it by a residual add or a gating multiply, a ViT's class and position
    tokens).

    Attributes:
        spaces: permutable space name (the module that creates it) -> number of units.
        axes: space name -> every ``(state_dict key, axis)`` it permutes, BN running statistics included.
        key_axes: state_dict key -> per axis, the space permuting it (a name, a :class:`Concat` of several,
            a :class:`Local` group view) or None (fixed / not permuted).
        weight_keys: the floating parameters among ``key_axes`` (what the matching cost and the
            similarity use; buffers are permuted but never matched on).
        groups: space -> number of contiguous groups its permutation must keep channels inside (grouped
            convs, GroupNorm, attention heads); absent: 1 (any permutation).
        ties: space -> name of the permutation *of whole groups* it shares with other spaces (attention:
            q/k and v of one block share the head permutation); absent: groups stay in place.
    """

    spaces: dict[str, int]
    axes: dict[str, list[tuple[str, int]]]
    key_axes: dict[str, tuple[AxisSpace, ...]]
    weight_keys: tuple[str, ...]
    groups: dict[str, int] = field(default_factory=dict)
    ties: dict[str, str] = field(default_factory=dict)


def space_names(entry: AxisSpace) -> list[str]:
    """The spaces that permute one axis (none, one, or the distinct blocks of a :class:`Concat`)."""
    if entry is None:
        return []
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, Local):
        return [entry.space]
    return list(dict.fromkeys(s for s, _ in entry.segments if s is not None))
