"""The flat blend: every merged tensor of every source in one contiguous buffer, blended in a few kernels.

A :class:`FlatLayout` places the merged tensors of one architecture in one flat vector of ``P`` values. Each
tensor is stored in its *storage order* (its own order, or ``(out, h, w, in)`` for a 4-D kernel in
channels_last), and its positions are cut into *rows*: runs of consecutive values that share one coefficient
(a kernel's filter at ``kernel`` granularity, a 2-D spatial kernel at ``slice``, the whole tensor at
``layer``). A group given as a :class:`~medmerge.merge.coefficients.CoefficientMap` (``head``: one head's
q, k and v rows, three separate runs, and the proj columns that read it, strided) is cut into the longest
runs that divide every change of coefficient. Tensors whose rows have the same length ``K`` sit next to each
other, so each such *bucket* is one ``(rows, K)`` matrix and the coefficient of a row broadcasts along it. A
blend step is then:

* one ``index_select`` that expands the ``G`` coefficients to the ``R`` rows (``R = G`` at ``kernel``);
* per bucket, one fused ``addcmul`` (two frozen sources, against the precomputed difference
  ``W = W_base + w * (W_other - W_base)``) or one multiply-add per source;
* the merged tensors are views of the one output buffer (``narrow`` + ``view``).

Its backward (:class:`FlatBlend`) concatenates the merged tensors' gradients into one buffer, multiplies it
by the difference (or each source) and sums each row: per bucket a multiply and a row sum. The kernel count
depends on the number of distinct row lengths (about 10 for a ResNet, 30 for an EfficientNet), not on the
depth of the network. On the CPU the output, gradient and scratch buffers are kept between steps, so a step
does not page in fresh memory for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from medmerge.merge.coefficients import CoefficientMap

# (parameter name, parameter shape) -> (coefficient group name, coefficient shape or map)
Grouping = Callable[[str, tuple[int, ...]], tuple[str, tuple[int, ...] | CoefficientMap]]

_CHANNELS_LAST = (0, 2, 3, 1)  # (out, in, h, w) -> storage order (out, h, w, in)


@dataclass(frozen=True)
class Placement:
    """Where one merged tensor lives in the flat buffer."""

    key: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    storage: tuple[int, ...] | None  # the permutation to storage order; None: the tensor's own order

    def view(self, flat: Tensor) -> Tensor:
        """The tensor as a view of ``flat`` (channels_last strides where the storage order says so)."""
        chunk = flat.narrow(-1, self.offset, self.numel)
        if self.storage is None:
            return chunk.view(*flat.shape[:-1], *self.shape)
        stored = chunk.view(*flat.shape[:-1], *(self.shape[d] for d in self.storage))
        lead = flat.dim() - 1
        inverse = [self.storage.index(d) for d in range(len(self.shape))]
        return stored.permute(*range(lead), *(lead + d for d in inverse))

    def flatten(self, tensor: Tensor) -> Tensor:
        """``tensor`` (of ``shape``) as a 1-D run in storage order; a view where its layout matches."""
        if self.storage is not None:
            tensor = tensor.permute(*self.storage)
        return tensor.reshape(-1)


@dataclass(frozen=True)
class Bucket:
    """Consecutive positions ``[start, stop)`` that form a ``(rows, K)`` matrix; rows ``[row_start, ...)``."""

    start: int
    stop: int
    row_start: int
    row_stop: int

    @property
    def row_length(self) -> int:
        return (self.stop - self.start) // (self.row_stop - self.row_start)

    def matrix(self, flat: Tensor) -> Tensor:
        return flat[self.start:self.stop].view(self.row_stop - self.row_start, self.row_length)


def _storage_order(shape: tuple[int, ...], channels_last: bool) -> tuple[int, ...] | None:
    return _CHANNELS_LAST if channels_last and len(shape) == 4 else None


def _row_length(shape: Sequence[int], coefficient: Sequence[int]) -> int:
    """The longest trailing run of dimensions along which the coefficient does not change."""
    length = 1
    for size, c in zip(reversed(shape), reversed(coefficient), strict=True):
        if c != 1:
            break
        length *= size
    return length


def _run_length(ids: Tensor) -> int:
    """The longest run length that divides the length of ``ids`` and every position where ``ids`` changes."""
    changes = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
    return math.gcd(ids.numel(), *changes.tolist())


class FlatLayout:
    """The flat placement of ``keys`` (shapes ``shapes``) and the coefficient columns they read.

    Coefficient groups get columns ``[start, start + size)`` of one ``(L, G)`` logits matrix in the order the
    groups first appear in ``keys``; ``group_shapes[group]`` is the group's coefficient shape; ``maps[key]`` is
    the coefficient index of a tensor whose group is a :class:`CoefficientMap`.
    """

    def __init__(self, keys: Sequence[str], shapes: Sequence[tuple[int, ...]], grouping: Grouping,
                 channels_last: bool = False) -> None:
        self.channels_last = channels_last
        self.group_of: dict[str, str] = {}
        self.group_shapes: dict[str, tuple[int, ...]] = {}
        self.group_columns: dict[str, tuple[int, int]] = {}
        self.maps: dict[str, Tensor] = {}
        coefficient_shapes = {}
        for key, shape in zip(keys, shapes, strict=True):
            group, coefficient = grouping(key, shape)
            self.group_of[key] = group
            if isinstance(coefficient, CoefficientMap):
                self.maps[key] = coefficient.index.long()
                coefficient = coefficient.shape
            if group not in self.group_shapes:
                self.group_shapes[group] = coefficient
                size = math.prod(coefficient)
                self.group_columns[group] = (sum(n for _, n in self.group_columns.values()), size)
            elif key in self.maps and self.group_shapes[group] != tuple(coefficient):
                raise ValueError(f"'{key}' maps into group '{group}' of shape {self.group_shapes[group]} "
                                 f"with shape {tuple(coefficient)}")
            coefficient_shapes[key] = (1,) * (len(shape) - len(coefficient)) + tuple(coefficient)  # broadcast
        self.num_columns = sum(n for _, n in self.group_columns.values())

        # rows: per tensor in storage order; tensors with the same row length next to each other
        per_key = {}
        for key, shape in zip(keys, shapes, strict=True):
            order = _storage_order(shape, channels_last)
            stored = [shape[d] for d in order] if order else list(shape)
            if key in self.maps:  # each position's column, in storage order; rows: runs dividing every change
                ids = self.maps[key].expand(shape) + self.group_columns[self.group_of[key]][0]
                ids = (ids.permute(*order) if order else ids).reshape(-1)
                per_key[key] = (shape, order, _run_length(ids), ids, None)
                continue
            coefficient = coefficient_shapes[key]
            stored_coefficient = [coefficient[d] for d in order] if order else list(coefficient)
            per_key[key] = (shape, order, _row_length(stored, stored_coefficient), stored, stored_coefficient)
        lengths = sorted({entry[2] for entry in per_key.values()})
        self.placements: list[Placement] = []
        self.buckets: list[Bucket] = []
        row_columns: list[Tensor] = []
        offset = rows = 0
        for length in lengths:
            start, row_start = offset, rows
            for key in keys:
                shape, order, row_length, stored, stored_coefficient = per_key[key]
                if row_length != length:
                    continue
                numel = math.prod(shape)
                self.placements.append(Placement(key, tuple(shape), offset, numel, order))
                if key in self.maps:
                    row_columns.append(stored.view(-1, length)[:, 0])
                else:
                    first, size = self.group_columns[self.group_of[key]]
                    ids = torch.arange(first, first + size).view(stored_coefficient).expand(stored)
                    row_columns.append(ids.reshape(-1, length)[:, 0])
                offset += numel
                rows += numel // length
            self.buckets.append(Bucket(start, offset, row_start, rows))
        self.numel = offset
        self.row_columns = torch.cat(row_columns) if row_columns else torch.zeros(0, dtype=torch.long)
        self.rows_are_columns = bool(torch.equal(self.row_columns, torch.arange(self.num_columns)))
        self.placement = {p.key: p for p in self.placements}

    def pack(self, tensors: dict[str, Tensor]) -> Tensor:
        """One flat float32 vector of ``tensors`` (one per key) in this layout."""
        return torch.cat([p.flatten(tensors[p.key].detach().float()) for p in self.placements])

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Every merged tensor as a view of ``flat`` (``(..., P)``), by key, in the layout's order."""
        return {p.key: p.view(flat) for p in self.placements}

    def expand(self, columns: Tensor) -> Tensor:
        """Per-coefficient values ``(S, G)`` to per-row values ``(S, R)``: one gather (none at ``kernel``)."""
        if self.rows_are_columns:
            return columns
        index = self.row_columns
        if index.device != columns.device:
            index = self.row_columns = index.to(columns.device)
        return columns.index_select(1, index)

    def tensor_weights(self, key: str, group: Tensor) -> Tensor:
        """``group`` ``(S, *group shape)``, the values of ``key``'s group, broadcastable against ``key``'s tensor
        (after the source axis): the group itself, or its values gathered by the tensor's map."""
        index = self.maps.get(key)
        return group if index is None else group.reshape(group.shape[0], -1)[:, index.to(group.device)]

    def group_views(self, columns: Tensor) -> dict[str, Tensor]:
        """``(S, G)`` per-coefficient values as ``(S, *group shape)`` views, by group."""
        return {group: columns[:, start:start + size].view(columns.shape[0], *self.group_shapes[group])
                for group, (start, size) in self.group_columns.items()}


class _Lease:
    """A pooled buffer lent to one blend: back in the pool at the blend's backward, or when its graph is freed
    without one (or at once where no graph was built)."""

    def __init__(self, pool: BlendBuffers, name: str) -> None:
        self.pool, self.name = pool, name

    def release(self) -> None:
        if self.pool is not None:
            self.pool.lent.discard(self.name)
            self.pool = None

    def __del__(self) -> None:
        self.release()


class BlendBuffers:
    """The output, gradient and scratch vectors a blend reuses from step to step (one of each).

    The output is *lent* to the merged tensors of one forward until that forward's backward has run (its
    consumers are done with them by then) or its graph is dropped; a second forward in the meantime (two
    forwards before one backward) gets fresh memory instead.
    """

    def __init__(self) -> None:
        self._tensors: dict[str, Tensor] = {}
        self.lent: set[str] = set()

    def get(self, name: str, like: Tensor, numel: int) -> Tensor:
        tensor = self._tensors.get(name)
        if tensor is None or tensor.numel() != numel or tensor.device != like.device or tensor.dtype != like.dtype:
            tensor = self._tensors[name] = torch.empty(numel, device=like.device, dtype=like.dtype)
        return tensor

    def lend(self, name: str, like: Tensor, numel: int) -> tuple[Tensor, _Lease | None]:
        if name in self.lent:
            return torch.empty(numel, device=like.device, dtype=like.dtype), None
        tensor = self.get(name, like, numel)
        self.lent.add(name)
        return tensor, _Lease(self, name)

    def clear(self) -> None:
        self._tensors.clear()


@dataclass
class BlendPlan:
    """What :class:`FlatBlend` needs besides its differentiable inputs.

    ``difference`` mode (``base`` and ``difference`` set): ``W = base + w * difference`` with one row of
    weights. Otherwise ``W = sum_i w_i * sources[i]`` over the sources passed to :meth:`FlatBlend.apply`.
    ``buffers`` (optional) keeps the output and work vectors between calls (:class:`BlendBuffers`).
    """

    layout: FlatLayout
    base: Tensor | None = None
    difference: Tensor | None = None
    buffers: BlendBuffers | None = None

    def vector(self, name: str, like: Tensor) -> Tensor:
        """A work vector of ``P`` values, used only within one call."""
        if self.buffers is None:
            return torch.empty(self.layout.numel, device=like.device, dtype=like.dtype)
        return self.buffers.get(name, like, self.layout.numel)

    def output(self, like: Tensor) -> tuple[Tensor, _Lease | None]:
        """The vector the merged tensors will be views of, and its lease if it is pooled."""
        if self.buffers is None:
            return torch.empty(self.layout.numel, device=like.device, dtype=like.dtype), None
        return self.buffers.lend("out", like, self.layout.numel)


class FlatBlend(torch.autograd.Function):
    """``(plan, row_weights (S, R), *sources (P,)) -> merged tensors``, in ``plan.layout.placements`` order."""

    @staticmethod
    def forward(ctx, plan: BlendPlan, rows: Tensor, *sources: Tensor) -> tuple[Tensor, ...]:
        reference = plan.base if plan.base is not None else sources[0]
        out, ctx.lease = plan.output(reference)
        with torch.autocast(device_type=reference.device.type, enabled=False):
            for bucket in plan.layout.buckets:
                merged = bucket.matrix(out)
                w = rows[:, bucket.row_start:bucket.row_stop, None]
                if plan.base is not None:
                    torch.addcmul(bucket.matrix(plan.base), w[0], bucket.matrix(plan.difference), out=merged)
                    continue
                torch.mul(bucket.matrix(sources[0]), w[0], out=merged)
                for index in range(1, len(sources)):
                    merged.addcmul_(bucket.matrix(sources[index]), w[index])
        ctx.plan = plan
        ctx.save_for_backward(rows, *sources)
        return tuple(p.view(out) for p in plan.layout.placements)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        plan: BlendPlan = ctx.plan
        if ctx.lease is not None:  # every consumer of the merged tensors has run its backward
            ctx.lease.release()
        rows, *sources = ctx.saved_tensors
        layout = plan.layout
        grad = plan.vector("grad", grads[0])
        torch.cat([p.flatten(g) for p, g in zip(layout.placements, grads, strict=True)], out=grad)
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[1] else None
        grad_sources = [torch.empty_like(s) if ctx.needs_input_grad[2 + i] else None for i, s in enumerate(sources)]
        scratch = plan.vector("scratch", grad) if plan.base is None and grad_rows is not None else None
        for bucket in layout.buckets:
            g = bucket.matrix(grad)
            span = slice(bucket.row_start, bucket.row_stop)
            if plan.base is not None:
                if grad_rows is not None:  # in place: nothing else reads the gradient buffer
                    torch.sum(g.mul_(bucket.matrix(plan.difference)), dim=1, out=grad_rows[0, span])
                continue
            for index, source in enumerate(sources):
                if grad_sources[index] is not None:
                    torch.mul(g, rows[index, span, None], out=bucket.matrix(grad_sources[index]))
                if grad_rows is not None:
                    product = torch.mul(g, bucket.matrix(source), out=bucket.matrix(scratch))
                    torch.sum(product, dim=1, out=grad_rows[index, span])
        return (None, grad_rows, *grad_sources)
