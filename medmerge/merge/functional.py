"""The functional merged model: N frozen source weight sets blended by learned coefficients.

``KernelMerge`` holds the source tensors once, the coefficient logits and a *skeleton*: an ordinary timm
model with the target's head. Its forward computes ``W = sum_i w_i * W_i`` for every backbone parameter
and runs the skeleton with ``torch.func.functional_call``: no model copy per step, gradients flow to the
coefficients (and, if asked, to the non-anchor sources). The skeleton's own head is learned directly and
its BatchNorm buffers track the merged network's statistics during learning.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call

from medmerge.merge.coefficients import GRANULARITIES, Normalizer


class SourceMismatchError(ValueError):
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


class KernelMerge(nn.Module):
    """Learnable per-kernel blend of N source models of one architecture.

    Args:
        skeleton: a model of the shared architecture whose head is sized for the target task.
        sources: the sources' state dicts (heads may be present; they are ignored).
        source_names: one name per source, in the order of ``sources``.
        head_keys: the skeleton's head parameters, learned directly and not merged.
        granularity: a key of ``GRANULARITIES``.
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
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown merge.granularity '{granularity}'; expected one of {sorted(GRANULARITIES)}")
        if len(sources) != len(source_names) or len(sources) != len(init_weights):
            raise ValueError("sources, source_names and init_weights must have one entry per source")
        self.skeleton = skeleton
        self.source_names = list(source_names)
        self.granularity = granularity
        self.normalizer = normalizer
        head = set(head_keys)
        reference = dict(skeleton.named_parameters())
        self.merged_keys = [key for key in reference if key not in head]
        self.head_keys = [key for key in reference if key in head]
        check_compatible(reference, sources, self.source_names, self.merged_keys, known=set(skeleton.state_dict()))
        for key in self.merged_keys:
            reference[key].requires_grad_(False)

        trainable = list(trainable_sources or [False] * len(sources))
        self.sources = nn.ModuleList()
        for state, learn in zip(sources, trainable, strict=True):
            holder = nn.ParameterDict(
                {
                    _safe(key): nn.Parameter(state[key].detach().clone().float(), requires_grad=learn)
                    for key in self.merged_keys
                }
            )
            self.sources.append(holder)

        grouping = GRANULARITIES[granularity]
        self.group_of: dict[str, str] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for key in self.merged_keys:
            group, shape = grouping(key, tuple(reference[key].shape))
            self.group_of[key] = group
            shapes.setdefault(group, shape)
        self.logits = nn.ParameterDict(
            {_safe(group): nn.Parameter(normalizer.init_logits(init_weights, shape)) for group, shape in shapes.items()}
        )
        self._init_buffers(sources, init_weights)

    @torch.no_grad()
    def _init_buffers(self, sources: Sequence[dict[str, Tensor]], init_weights: Tensor) -> None:
        """Start the skeleton's float buffers (BN statistics) at the initial blend of the sources', and keep
        the sources' own (small) statistics for :meth:`blended_buffers`."""
        self.init_weights = init_weights.detach().float().cpu()
        self.source_buffers: dict[str, Tensor] = {}  # key -> (N, *shape), on the CPU
        for key, buffer in self.skeleton.named_buffers():
            present = [state[key] for state in sources if key in state]
            if len(present) != len(sources):
                continue
            if buffer.is_floating_point():
                self.source_buffers[key] = torch.stack([t.detach().float().cpu() for t in present])
                blended = sum(w * t.float() for w, t in zip(init_weights.tolist(), present, strict=True))
                buffer.copy_(blended.to(buffer.dtype))
            else:
                buffer.copy_(present[0])

    @torch.no_grad()
    def blended_buffers(self) -> dict[str, Tensor]:
        """The sources' float buffers (BatchNorm running statistics) blended with the coefficients of their
        layer's ``weight``, per channel where the granularity has one: the statistics a merged model has when
        nobody recalibrates them. A layer without a merged ``weight`` uses the initial weights."""
        weights = self.group_weights()
        blended = {}
        for key, stacked in self.source_buffers.items():
            flat = stacked.reshape(len(self.sources), -1)
            w = self.channel_weights(key.rsplit(".", 1)[0], flat.shape[1], weights)
            blended[key] = (w * flat).sum(dim=0).reshape(stacked.shape[1:])
        return blended

    @torch.no_grad()
    def channel_weights(self, layer: str, channels: int, weights: dict[str, Tensor] | None = None) -> Tensor:
        """Each source's weight per output channel of ``layer``, shape ``(N, channels)``: the coefficients
        of its ``weight`` (averaged per channel where the granularity is finer; the initial weights for a
        layer without a merged weight)."""
        owner = f"{layer}.weight"
        count = len(self.sources)
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
        for key in self.merged_keys:
            state[key] = self.sources[index][_safe(key)].detach().to(state[key])
        for key, stacked in self.source_buffers.items():
            state[key] = stacked[index].to(state[key])
        return state

    def group_weights(self) -> dict[str, Tensor]:
        """Normalised weights per coefficient group, each of shape ``(N, *group_shape)``."""
        return {group: self.normalizer.weights(self.logits[_safe(group)]) for group in set(self.group_of.values())}

    def merged_parameters(self) -> dict[str, Tensor]:
        """``W = sum_i w_i * W_i`` for every backbone parameter, differentiable in the coefficients."""
        weights = self.group_weights()
        merged = {}
        for key in self.merged_keys:
            w = weights[self.group_of[key]]
            safe = _safe(key)
            total = w[0] * self.sources[0][safe]
            for index in range(1, len(self.sources)):
                total = total + w[index] * self.sources[index][safe]
            merged[key] = total
        return merged

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.skeleton, self.merged_parameters(), (x,), strict=False)

    def learnable_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters that learn, by role, so each role can get its own learning rate."""
        head = dict(self.skeleton.named_parameters())
        return {
            "coefficients": list(self.logits.parameters()),
            "head": [head[key] for key in self.head_keys],
            "sources": [p for holder in self.sources for p in holder.parameters() if p.requires_grad],
        }

    @torch.no_grad()
    def collapsed_state_dict(self, blend_buffers: bool = False) -> dict[str, Tensor]:
        """One ordinary state dict for the skeleton's architecture: the coefficients applied once.

        Buffers are the skeleton's (the statistics tracked, and recalibrated, while learning), or with
        ``blend_buffers`` the sources' statistics blended by the coefficients (:meth:`blended_buffers`).
        """
        state = {key: value.detach().clone() for key, value in self.skeleton.state_dict().items()}
        for key, value in self.merged_parameters().items():
            state[key] = value.detach().to(state[key].dtype).clone()
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
        standard deviation across the tensor's kernels (``<source>_std``)."""
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
