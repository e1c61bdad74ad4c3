"""From a merge to one ordinary model: collapsing its coefficients (with BatchNorm recalibration and REPAIR),
and the merge state saved beside the sources so that a later process can collapse it again."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

from torch import Tensor, nn

from medmerge.data.loader import ArrayBatches, DeviceTransform
from medmerge.device import Runtime
from medmerge.merge.functional import KernelMerge
from medmerge.merge.repair import activation_statistics, interpolated_statistics, repair, repairable_layers
from medmerge.models import create_model
from medmerge.train import make_transform, recalibrate_batchnorm

if TYPE_CHECKING:
    from medmerge.data.target import TargetData

log = logging.getLogger("medmerge.merge.collapse")


def merge_state_to_save(merge: KernelMerge) -> dict[str, Tensor]:
    """What collapse needs besides the sources: logits, head, BN buffers and any trained source weights."""
    frozen = {name for name, p in merge.named_parameters() if name.startswith("sources.") and not p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in merge.state_dict().items() if k not in frozen}


def restore_merge_state(merge: KernelMerge, state: dict[str, Tensor]) -> None:
    """Load ``merge_state_to_save`` output; anything else missing or unexpected is an error."""
    result = merge.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("sources.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"merge state does not fit the sources: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def collapse(
    merge: KernelMerge, arch: str, num_classes: int, data: TargetData | None, runtime: Runtime, seed: int = 0,
    repair_data: TargetData | None = None,
) -> nn.Module:
    """Apply the coefficients once: an ordinary timm model.

    With ``repair_data``, REPAIR (``medmerge.merge.repair``) first gives every merged conv/linear layer with
    a bias the per-channel output statistics of the sources, interpolated by the layer's coefficients, on
    ``repair_data.train``. BatchNorm statistics are then recalibrated on ``data.train`` if given; without
    ``data`` they are the sources' statistics blended by the same coefficients as their layer's weights
    (what a merge without recalibration has).
    """
    model = create_model(arch, num_classes=num_classes)
    model.load_state_dict(merge.collapsed_state_dict(blend_buffers=data is None), strict=True)
    model = runtime.prepare(model)
    if repair_data is not None:
        count = repair_merged(model, merge, repair_data.train, make_transform(arch, runtime, seed))
        log.info("REPAIR corrected %d layers on %d target training images", count, len(repair_data.train.images))
    if data is not None:
        recalibrate_on_target(model, arch, data, runtime, seed)
    return model.eval()


def recalibrate_on_target(model: nn.Module, arch: str, data: TargetData, runtime: Runtime, seed: int = 0) -> None:
    """Recompute ``model``'s BatchNorm statistics on ``data.train`` (a merged model's last step)."""
    count = recalibrate_batchnorm(model, data.train, make_transform(arch, runtime, seed))
    log.info("recalibrated %d BatchNorm layers on %d target training images", count, len(data.train.images))


def repair_merged(model: nn.Module, merge: KernelMerge, batches: ArrayBatches, transform: DeviceTransform) -> int:
    """REPAIR ``model`` (the collapse of ``merge``): measure each source under the same skeleton, interpolate
    their statistics with the merge's per-channel weights, fold the correction into ``model``'s layers."""
    layers = repairable_layers(model, merge.merged_keys)
    if not layers:
        return 0

    def inputs():
        return (transform(images) for images, _ in batches)

    per_source = []
    probe = copy.deepcopy(model)
    for index in range(len(merge.sources)):
        probe.load_state_dict(merge.source_state(index), strict=True)
        per_source.append(activation_statistics(probe, layers, inputs))
    del probe
    weights = merge.group_weights()
    targets = interpolated_statistics(per_source, lambda name, channels: merge.channel_weights(name, channels, weights))
    return repair(model, targets, inputs)
