"""The functional merged model: N frozen source weight sets blended by learned coefficients.

``KernelMerge`` holds the source tensors once (flat, :mod:`medmerge.merge.flat`), the coefficient logits
(one ``(L, G)`` matrix, seen per group through :attr:`KernelMerge.logits`) and a *skeleton*: an ordinary timm
model with the target's head and no backbone parameters of its own. Its forward computes
``W = sum_i w_i * W_i`` for every backbone parameter in a few kernels and runs the skeleton with
``torch.func.functional_call``: no model copy per step, gradients flow to the coefficients (and, if asked,
to the non-anchor sources). The skeleton's own head is learned directly and its BatchNorm buffers track the
merged network's statistics during learning.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call

from medmerge.errors import InputError
from medmerge.merge.coefficients import Normalizer, resolve_granularity
from medmerge.merge.flat import BlendBuffers, BlendPlan, FlatBlend, FlatLayout


class SourceMismatchError(ValueError, InputError):
    """Sources whose parameter names or shapes differ cannot be merged."""


def _safe(name: str) -> str:
    return name.replace(".", "__")


def check_compatible(
    reference: dict[str, Tensor],
    sources: Sequence[dict[str, Tensor]],
    names: Sequence[str],
    keys: Sequence[str],
    known: Collection[str] | None = None,
) -> None:
    """Stop at the first parameter whose name or shape differs between the sources and the skeleton.

    With ``known`` (every state-dict key of the architecture, head included) a source key outside it is an
    error too: a deeper or differently built source would otherwise lose its extra tensors silently.
    """
    for source_name, state in zip(names, sources, strict=True):
        for key in keys:
            if key not in state:
                raise SourceMismatchError(
                    f"source '{source_name}' has no parameter '{key}' (expected by the architecture); "
                    "sources must share one architecture"
                )
            if tuple(state[key].shape) != tuple(reference[key].shape):
                raise SourceMismatchError(
                    f"source '{source_name}' parameter '{key}' has shape {tuple(state[key].shape)}, "
                    f"expected {tuple(reference[key].shape)}"
                )
        extra = [key for key in state if key not in known] if known is not None else []
        if extra:
            raise SourceMismatchError(
                f"source '{source_name}' has parameter '{extra[0]}' that the architecture lacks "
                f"({len(extra)} such key(s)); sources must share one architecture"
            )


class SourceTensors(Mapping):
    """One source's merged tensors by safe name (``conv1__weight``), as views of its flat storage."""

    def __init__(self, store: SourceStore, index: int) -> None:
        self._store, self._index = store, index

    def _flat(self) -> Tensor:
        return self._store.flat(self._index)

    def __getitem__(self, safe: str) -> Tensor:
        return self._store.layout.placement[self._store.keys[safe]].view(self._flat())

    def __iter__(self) -> Iterator[str]:
        return iter(self._store.keys)

    def __len__(self) -> int:
        return len(self._store.keys)

    def parameters(self) -> list[nn.Parameter]:
        """The flat parameter(s) this source's tensors live in."""
        return self._store.parameters_of(self._index)


class SourceStore(nn.Module):
    """The sources' merged tensors, one flat vector each, in a :class:`FlatLayout`.

    Two frozen sources are kept as ``base`` (the first) and ``difference`` (the second minus the first), so the
    blend is one fused ``base + w * difference``; otherwise every source is its own flat vector, frozen or
    trainable. Indexing gives a source's tensors by safe name (:class:`SourceTensors`).
    """

    def __init__(self, layout: FlatLayout, sources: Sequence[dict[str, Tensor]], trainable: Sequence[bool],
                 canonical: FlatLayout | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.canonical = canonical or layout  # the order a state dict holds (without channels_last)
        self.keys = {_safe(key): key for key in layout.group_of}  # network order
        self.count = len(sources)
        self.uses_difference = len(sources) == 2 and not any(trainable)
        self.pack(sources, trainable)
        self.register_state_dict_post_hook(SourceStore._to_canonical)
        self.register_load_state_dict_pre_hook(SourceStore._from_canonical)

    def _relayout(self, state: dict[str, Tensor], prefix: str, source: FlatLayout, target: FlatLayout) -> None:
        if source is target:
            return
        for name, _ in self.named_parameters():
            if prefix + name in state:
                state[prefix + name] = target.pack(source.views(state[prefix + name]))

    @staticmethod
    def _to_canonical(module: SourceStore, state: dict, prefix: str, *_) -> None:
        """Saved flat vectors are in the canonical order, so a merge without channels_last loads them."""
        module._relayout(state, prefix, module.layout, module.canonical)

    @staticmethod
    def _from_canonical(module: SourceStore, state: dict, prefix: str, *_) -> None:
        module._relayout(state, prefix, module.canonical, module.layout)

    def pack(self, sources: Sequence[dict[str, Tensor]], trainable: Sequence[bool]) -> None:
        flats = [self.layout.pack(state) for state in sources]
        if self.uses_difference:
            self.base = nn.Parameter(flats[0], requires_grad=False)
            self.difference = nn.Parameter(flats[1] - flats[0], requires_grad=False)
        else:
            self.flats = nn.ParameterList(
                nn.Parameter(flat, requires_grad=learn) for flat, learn in zip(flats, trainable, strict=True)
            )

    def flat(self, index: int) -> Tensor:
        if self.uses_difference:
            return self.base if index == 0 else self.base + self.difference
        return self.flats[index]

    def parameters_of(self, index: int) -> list[nn.Parameter]:
        if self.uses_difference:
            return [self.base] if index == 0 else [self.base, self.difference]
        return [self.flats[index]]

    def __getitem__(self, index: int) -> SourceTensors:
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return SourceTensors(self, index % self.count)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[SourceTensors]:
        return (self[i] for i in range(self.count))

    def state_dicts(self) -> list[dict[str, Tensor]]:
        """Every source's tensors by parameter name (views)."""
        return [{key: source[safe] for safe, key in self.keys.items()} for source in self]

    def trainable(self) -> list[nn.Parameter]:
        return [] if self.uses_difference else [p for p in self.flats if p.requires_grad]

    def blend(self, rows: Tensor, buffers: BlendBuffers | None) -> tuple[Tensor, ...]:
        """The merged tensors for per-row weights ``rows`` ``(N, R)``, in the layout's order."""
        if self.uses_difference:
            plan = BlendPlan(self.layout, self.base, self.difference, buffers)
            return FlatBlend.apply(plan, rows[1:])
        return FlatBlend.apply(BlendPlan(self.layout, buffers=buffers), rows, *self.flats)


class CoefficientLogits(Mapping):
    """The coefficient logits per group (safe name -> ``(L, *group shape)``), as views of the one logits
    matrix. A view's ``.grad`` is the matching part of the matrix's gradient at the time it is looked up."""

    def __init__(self, merge: KernelMerge) -> None:
        self._merge = merge

    def _matrix(self) -> nn.Parameter:
        return self._merge.coefficient_logits

    def __getitem__(self, safe: str) -> nn.Parameter:
        group = self._merge._groups_by_safe[safe]
        layout, matrix = self._merge.layout, self._matrix()
        start, size = layout.group_columns[group]
        shape = (matrix.shape[0], *layout.group_shapes[group])
        view = nn.Parameter(matrix.detach()[:, start:start + size].view(shape), requires_grad=matrix.requires_grad)
        if matrix.grad is not None:
            view.grad = matrix.grad[:, start:start + size].view(shape)
        return view

    def __iter__(self) -> Iterator[str]:
        return iter(self._merge._groups_by_safe)

    def __len__(self) -> int:
        return len(self._merge._groups_by_safe)

    def requires_grad_(self, requires_grad: bool = True) -> CoefficientLogits:
        self._matrix().requires_grad_(requires_grad)
        return self


def _drop_parameters(module: nn.Module, keys: Collection[str]) -> None:
    """Unregister ``keys`` from ``module`` (their values come from ``functional_call``), freeing their memory."""
    for key in keys:
        owner, _, name = key.rpartition(".")
        module.get_submodule(owner)._parameters[name] = None


class KernelMerge(nn.Module):
    """Learnable per-kernel blend of N source models of one architecture.

    Args:
        skeleton: a model of the shared architecture whose head is sized for the target task; its backbone
            parameters are dropped (the merged ones replace them in every forward).
        sources: the sources' state dicts (heads may be present; they are ignored).
        source_names: one name per source, in the order of ``sources``.
        head_keys: the skeleton's head parameters, learned directly and not merged.
        granularity: a key of ``GRANULARITIES``, or of ``MODEL_GRANULARITIES`` (``head``: built from the
            skeleton's attention blocks; see :func:`medmerge.merge.coefficients.head_granularity`).
        normalizer: maps logits to weights that sum to one across sources.
        init_weights: the initial weight of each source, shape ``(N,)``.
        trainable_sources: per source, whether its weights learn jointly (the anchor stays frozen).
    """

    def __init__(
        self,
        skeleton: nn.Module,
        sources: Sequence[dict[str, Tensor]],
        source_names: Sequence[str],
        head_keys: Sequence[str],
        granularity: str,
        normalizer: Normalizer,
        init_weights: Tensor,
        trainable_sources: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        self._grouping = resolve_granularity(granularity, skeleton)
        if len(sources) != len(source_names) or len(sources) != len(init_weights):
            raise ValueError("sources, source_names and init_weights must have one entry per source")
        self.source_names = list(source_names)
        self.granularity = granularity
        self.normalizer = normalizer
        head = set(head_keys)
        reference = dict(skeleton.named_parameters())
        self.merged_keys = [key for key in reference if key not in head]
        self.head_keys = [key for key in reference if key in head]
        check_compatible(reference, sources, self.source_names, self.merged_keys, known=set(skeleton.state_dict()))
        self._shapes = [tuple(reference[key].shape) for key in self.merged_keys]
        self._dtypes = {key: reference[key].dtype for key in self.merged_keys}  # of the collapsed model
        self.layout = FlatLayout(self.merged_keys, self._shapes, self._grouping)
        self.group_of = self.layout.group_of
        self._groups_by_safe = {_safe(group): group for group in self.layout.group_columns}
        self._trainable = list(trainable_sources or [False] * len(sources))
        self.sources = SourceStore(self.layout, sources, self._trainable)
        self.coefficient_logits = nn.Parameter(normalizer.init_logits(init_weights, (self.layout.num_columns,)))
        self.logits = CoefficientLogits(self)
        self._buffers_between_steps = BlendBuffers()
        del reference
        _drop_parameters(skeleton, self.merged_keys)  # no third copy of the backbone
        self.skeleton = skeleton
        self._init_buffers(sources, init_weights)

    def extra_repr(self) -> str:
        """What ``repr`` shows besides the modules (and what a resume fingerprint tells merges apart by)."""
        return f"sources={self.source_names}, granularity={self.granularity!r}, normalization={self.normalizer.name!r}"

    def use_channels_last(self) -> None:
        """Store 4-D kernels in channels_last order, so the merged kernels come out in that layout."""
        if self.layout.channels_last:
            return
        states = [{k: v.detach().clone() for k, v in state.items()} for state in self.sources.state_dicts()]
        device = self.coefficient_logits.device
        canonical = self.layout
        self.layout = FlatLayout(self.merged_keys, self._shapes, self._grouping, channels_last=True)
        store = SourceStore(self.layout, states, self._trainable, canonical)
        self.sources = store.to(device)
        self._buffers_between_steps.clear()

    @torch.no_grad()
    def _init_buffers(self, sources: Sequence[dict[str, Tensor]], init_weights: Tensor) -> None:
        """Keep the sources' own (small) float buffers (BN statistics) for :meth:`blended_buffers` and start
        the skeleton's at their blend by the initial weights; other buffers come from the first source."""
        self.init_weights = init_weights.detach().float().cpu()
        self.source_buffers: dict[str, Tensor] = {}  # key -> (N, *shape), on the CPU
        buffers = dict(self.skeleton.named_buffers())
        for key, buffer in buffers.items():
            present = [state[key] for state in sources if key in state]
            if len(present) != len(sources):
                continue
            if buffer.is_floating_point():
                self.source_buffers[key] = torch.stack([t.detach().float().cpu() for t in present])
            else:
                buffer.copy_(present[0])
        for key, blended in self.blended_buffers(self.init_weights).items():
            buffers[key].copy_(blended.to(buffers[key].dtype))

    @torch.no_grad()
    def blended_buffers(self, weights: Tensor | None = None) -> dict[str, Tensor]:
        """The sources' float buffers (BatchNorm running statistics) blended with the coefficients of their
        layer's ``weight``, per channel where the granularity has one: the statistics a merged model has when
        nobody recalibrates them. A layer without a merged ``weight`` uses the initial weights; with
        ``weights`` (one per source) every buffer is blended by those (the merge's starting statistics)."""
        groups = self.group_weights() if weights is None else None
        blended = {}
        for key, stacked in self.source_buffers.items():
            flat = stacked.reshape(len(self.sources), -1)
            if weights is None:
                w = self.channel_weights(key.rsplit(".", 1)[0], flat.shape[1], groups)
            else:
                w = weights.reshape(-1, 1)
            blended[key] = (w * flat).sum(dim=0).reshape(stacked.shape[1:])
        return blended

    @torch.no_grad()
    def channel_weights(self, layer: str, channels: int, weights: dict[str, Tensor] | None = None) -> Tensor:
        """Each source's weight per output channel of ``layer``, shape ``(N, channels)``: the coefficients
        of its ``weight`` (averaged per channel where the granularity is finer or, at ``head``, over the heads a
        channel reads; the initial weights for a layer without a merged weight)."""
        owner = f"{layer}.weight"
        count = len(self.sources)
        if owner in self.layout.maps:
            weights = self.group_weights() if weights is None else weights
            w = self.layout.tensor_weights(owner, weights[self.group_of[owner]].detach().float().cpu())
            return w.expand(count, *self.layout.placement[owner].shape).reshape(count, channels, -1).mean(dim=2)
        if owner in self.group_of:
            weights = self.group_weights() if weights is None else weights
            w = weights[self.group_of[owner]].detach().float().cpu().reshape(count, -1)
        else:
            w = self.init_weights.reshape(-1, 1)
        if w.shape[1] not in (1, channels):  # finer than per channel (slice): one weight per channel
            w = w.reshape(count, channels, -1).mean(dim=2)
        return w.expand(count, channels)

    @torch.no_grad()
    def source_state(self, index: int) -> dict[str, Tensor]:
        """Source ``index`` as a state dict of the skeleton: its merged tensors and float buffers, the
        skeleton's head (what REPAIR measures the sources with)."""
        state = {key: value.detach().clone() for key, value in self.skeleton.state_dict().items()}
        tensors = self.sources[index]
        for key in self.merged_keys:  # the skeleton holds no backbone parameters: take the source's own
            state[key] = tensors[_safe(key)].detach().contiguous().clone()
        for key, stacked in self.source_buffers.items():
            state[key] = stacked[index].to(state[key])
        return state

    def group_weights(self) -> dict[str, Tensor]:
        """Normalised weights per coefficient group, each of shape ``(N, *group_shape)``."""
        return self.layout.group_views(self.normalizer.weights(self.coefficient_logits))

    def merged_parameters(self, reuse_buffers: bool = False) -> dict[str, Tensor]:
        """``W = sum_i w_i * W_i`` for every backbone parameter, differentiable in the coefficients.

        With ``reuse_buffers`` the tensors are views of a buffer that the next call overwrites (the forward's
        choice: no fresh memory per step); without, they are new tensors.
        """
        rows = self.layout.expand(self.normalizer.weights(self.coefficient_logits))
        merged = self.sources.blend(rows, self._buffers_between_steps if reuse_buffers else None)
        return dict(zip((p.key for p in self.layout.placements), merged, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.skeleton, self.merged_parameters(reuse_buffers=True), (x,), strict=False)

    def learnable_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters that learn, by role, so each role can get its own learning rate."""
        head = dict(self.skeleton.named_parameters())
        return {
            "coefficients": [self.coefficient_logits],
            "head": [head[key] for key in self.head_keys],
            "sources": self.sources.trainable(),
        }

    @torch.no_grad()
    def collapsed_state_dict(self, blend_buffers: bool = False) -> dict[str, Tensor]:
        """One ordinary state dict for the skeleton's architecture: the coefficients applied once.

        Buffers are the skeleton's (the statistics tracked, and recalibrated, while learning), or with
        ``blend_buffers`` the sources' statistics blended by the coefficients (:meth:`blended_buffers`).
        """
        state = {key: value.detach().clone() for key, value in self.skeleton.state_dict().items()}
        for key, value in self.merged_parameters().items():
            state[key] = value.detach().to(self._dtypes[key]).clone()
        if blend_buffers:
            for key, value in self.blended_buffers().items():
                state[key] = value.to(device=state[key].device, dtype=state[key].dtype)
        return state

    @torch.no_grad()
    def coefficient_tensors(self) -> dict[str, Tensor]:
        """Normalised per-source weights for every coefficient group, ready for safetensors."""
        return {group: w.detach().float().cpu().contiguous() for group, w in sorted(self.group_weights().items())}

    @torch.no_grad()
    def layer_summary(self) -> pd.DataFrame:
        """Mean coefficient of each source for every merged parameter tensor, in network order, and its
        standard deviation across the tensor's kernels (``<source>_std``; at ``head`` an attention tensor's
        coefficients are its block's heads)."""
        weights = self.group_weights()
        rows = []
        for order, key in enumerate(self.merged_keys):
            w = weights[self.group_of[key]]
            row = {"order": order, "parameter": key, "layer": key.rsplit(".", 1)[0], "numel": w[0].numel()}
            for index, name in enumerate(self.source_names):
                values = w[index].float()
                row[name] = float(values.mean())
                row[f"{name}_std"] = float(values.std()) if values.numel() > 1 else 0.0  # spread across kernels
            rows.append(row)
        return pd.DataFrame(rows)

    def source_means(self) -> dict[str, float]:
        """Mean coefficient of each source over all coefficients (a summary metric)."""
        with torch.no_grad():
            weights = self.group_weights()
            totals = torch.zeros(len(self.source_names))
            count = 0
            for w in weights.values():
                flat = w.detach().float().cpu().reshape(len(self.source_names), -1)
                totals += flat.sum(dim=1)
                count += flat.shape[1]
        return {name: float(totals[i] / count) for i, name in enumerate(self.source_names)}
