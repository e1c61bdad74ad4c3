"""What the rules read and write while a traced graph is walked (values' feature axes, union-find over
spaces, tensor axes recorded per space), and the :class:`PermutationSpec` assembled from it."""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor, fx, nn

from medmerge.merge.alignment.spec import (
    UNSUPPORTED_HINT,
    AlignmentError,
    AxisSpace,
    Concat,
    Local,
    PermutationSpec,
    space_names,
)


class _Spaces:
    """Union-find over spaces; id 0 is FIXED (any size, never permuted). A root carries the union's size,
    its number of groups (lcm of the constraints joined) and its head tie."""

    def __init__(self) -> None:
        self.parent: list[int] = [0]
        self.size: list[int | None] = [None]
        self.name: list[str] = ["<fixed>"]
        self.groups: list[int] = [1]
        self.tie: list[str | None] = [None]

    def new(self, name: str, size: int, groups: int = 1, tie: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.name.append(name)
        self.groups.append(groups)
        self.tie.append(tie)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def constrain(self, i: int, groups: int, where: str) -> None:
        """Keep the permutation of ``i``'s space inside ``groups`` contiguous groups."""
        root = self.find(i)
        if root == 0 or groups == 1:
            return
        size = self.size[root]
        combined = math.lcm(self.groups[root], groups)
        if size % combined:
            raise AlignmentError(
                f"{where}: {groups} groups do not divide space '{self.name[root]}' ({size}). "
                f"{UNSUPPORTED_HINT}"
            )
        self.groups[root] = combined

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        sa, sb = self.size[ra], self.size[rb]
        if sa is not None and sb is not None and sa != sb:
            raise AlignmentError(
                f"{where} joins channel spaces '{self.name[ra]}' ({sa}) and '{self.name[rb]}' ({sb}) of "
                f"different sizes. {UNSUPPORTED_HINT}"
            )
        if self.tie[ra] or self.tie[rb]:
            raise AlignmentError(
                f"{where} joins attention head space '{self.name[ra]}' with '{self.name[rb]}'. "
                f"{UNSUPPORTED_HINT}"
            )
        keep, drop = min(ra, rb), max(ra, rb)  # FIXED (0) wins, then the space created first
        self.parent[drop] = keep
        if keep != 0:
            self.groups[keep] = math.lcm(self.groups[ra], self.groups[rb])
        return keep


Layout = tuple[tuple[int, int], ...]  # the feature axis as consecutive (space id, size) blocks


class Feature(NamedTuple):
    """A traced value's feature axis: which dim it is and the spaces along it (None: no feature axis,
    e.g. a scalar-like tensor that broadcasts over every unit)."""

    layout: Layout | None
    axis: int


class Builder:
    """What the rules read and write while the graph is walked."""

    def __init__(self, model: nn.Module, shapes: dict[fx.Node, tuple[int, ...] | None]) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.state = model.state_dict(keep_vars=True)
        self.shapes = shapes
        self.spaces = _Spaces()
        self.value: dict[fx.Node, Feature] = {}
        self.records: list[tuple[str, int, Layout | tuple[str, int, int]]] = []
        self.called: set[str] = set()

    # helpers used by the rules
    def fail(self, node: fx.Node, why: str) -> AlignmentError:
        return AlignmentError(f"{describe(node)}: {why}. {UNSUPPORTED_HINT}")

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        shape = self.shapes.get(node)
        if shape is None:
            raise self.fail(node, "expected a tensor")
        return shape

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
        return [a for a in found if self.shapes.get(a) is not None]

    def new(self, name: str, size: int, groups: int = 1, tie: str | None = None) -> Layout:
        return ((self.spaces.new(name, size, groups, tie), size),)

    def record(self, key: str, axis: int, layout: Layout | None) -> None:
        if layout is not None:
            self.records.append((key, axis, layout))

    def record_local(self, key: str, layout: Layout, groups: int, node: fx.Node) -> None:
        """Axis 1 of a grouped conv's weight: local to the group of its single input space."""
        if len(layout) != 1:
            raise self.fail(node, "a grouped conv reading concatenated channels is not supported")
        sid = layout[0][0]
        self.spaces.constrain(sid, groups, describe(node))
        self.records.append((key, 1, (sid, groups, -1)))

    def join(self, a: Layout, b: Layout, where: str) -> Layout:
        if [s for _, s in a] == [s for _, s in b]:
            return tuple((self.spaces.union(x, y, where), s) for (x, s), (y, _) in zip(a, b, strict=True))
        if len(a) == 1 and a[0][0] == 0 or len(b) == 1 and b[0][0] == 0:  # FIXED absorbs every block
            fixed = a if len(a) == 1 and a[0][0] == 0 else b
            for sid, _ in a + b:
                self.spaces.union(sid, 0, where)
            return fixed
        raise AlignmentError(
            f"{where} joins concatenations with different blocks {a} and {b}. {UNSUPPORTED_HINT}"
        )

    def layout_size(self, layout: Layout) -> int:
        return sum(size for _, size in layout)

    def owner(self, name: str, node: fx.Node) -> dict[str, Tensor]:
        """The tensors a leaf module owns directly; each module may be called only once (no shared
        weights)."""
        m = self.modules[name]
        owned = dict(m.named_parameters(recurse=False)) | dict(m.named_buffers(recurse=False))
        if owned:
            if name in self.called:
                raise self.fail(node, f"module '{name}' is called more than once (shared weights)")
            self.called.add(name)
        return owned


def describe(node: fx.Node) -> str:
    """How errors name a graph node: ``node 'layer1_0_conv1' (call_module layer1.0.conv1)``."""
    target = node.target
    label = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return f"node '{node.name}' ({node.op} {label})"


def dotted(name: str, attr: str) -> str:
    """The qualified name of ``attr`` (a child module or tensor) of module ``name`` ('' is the root)."""
    return f"{name}.{attr}" if name else attr


def assemble_spec(b: Builder) -> PermutationSpec:
    """The spec from the walk's records: each space named by its union's root, FIXED and one-unit spaces
    dropped, every recorded axis checked against its space's size."""
    spaces = b.spaces
    params = {name for name, _ in b.model.named_parameters()}
    sizes: dict[str, int] = {}
    axes: dict[str, list[tuple[str, int]]] = {}
    key_axes: dict[str, list[AxisSpace]] = {}
    groups: dict[str, int] = {}
    ties: dict[str, str] = {}

    def resolve(sid: int) -> str | None:
        root = spaces.find(sid)
        if root == 0 or spaces.size[root] == 1:  # fixed, or a single unit: nothing to permute
            return None
        name = spaces.name[root]
        sizes[name] = int(spaces.size[root])
        if spaces.groups[root] > 1:
            groups[name] = spaces.groups[root]
        if spaces.tie[root]:
            ties[name] = spaces.tie[root]
        return name

    for key, axis, layout in b.records:
        tensor = b.state[key]
        slot = key_axes.setdefault(key, [None] * tensor.dim())
        if isinstance(layout[0], int):  # a Local view: (space id, groups, -1)
            name = resolve(layout[0])
            entry: AxisSpace = None if name is None else Local(name, layout[1])
            expected = None if name is None else sizes[name] // layout[1]
        else:
            segments = tuple((resolve(sid), size) for sid, size in layout)
            expected = sum(size for _, size in segments)
            entry = segments[0][0] if len(segments) == 1 else Concat(segments)
            if isinstance(entry, Concat) and all(s is None for s, _ in segments):
                entry = None
        if entry is None:
            continue
        if tensor.shape[axis] != expected:
            raise AlignmentError(f"'{key}' axis {axis} has size {tensor.shape[axis]} but its channel space "
                                 f"has {expected} units. {UNSUPPORTED_HINT}")
        slot[axis] = entry
        for name in space_names(entry):
            axes.setdefault(name, []).append((key, axis))
    key_axes_t = {k: tuple(v) for k, v in key_axes.items() if any(s is not None for s in v)}
    weights = tuple(k for k in key_axes_t if k in params and b.state[k].is_floating_point())
    return PermutationSpec(spaces=sizes, axes=axes, key_axes=key_axes_t, weight_keys=weights, groups=groups,
                           ties=ties)
