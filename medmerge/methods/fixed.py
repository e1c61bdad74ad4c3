"""What the fixed-weight methods share: a plain weighted average of the sources with a linear-probe head.

Such a method has no learned head, so its head is a linear probe fitted on the collapsed model's frozen
features (after BatchNorm recalibration, when that is on); its score is that model's validation macro F1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from medmerge.methods.base import MergeInputs, MergeMethod, MergeResult

if TYPE_CHECKING:
    from torch import Tensor

    from medmerge.config import MergeSettings
    from medmerge.merge.functional import KernelMerge


class FixedWeightMethod(MergeMethod):
    """A method whose merge is one frozen weight per source (:func:`fixed_weight_merge`); ``run`` picks them."""

    learns_coefficients = False
    collapses_while_learning = True  # its head is a linear probe on the collapsed model

    def rebuild(self, arch: str, sources: Sequence[dict[str, Tensor]], source_names: Sequence[str],
                num_classes: int, settings: MergeSettings) -> KernelMerge:
        count = len(sources)  # the saved merge state holds the weights; any valid ones rebuild the shape
        return build_fixed_merge(arch, sources, source_names, num_classes, [1.0 / count] * count)


def build_fixed_merge(arch: str, sources: Sequence[dict[str, Tensor]], source_names: Sequence[str],
                      num_classes: int, weights: Sequence[float], seed: int = 0) -> KernelMerge:
    """A plain weighted average of ``sources``: one frozen coefficient per source (``weights``, non-negative,
    summing to one), and a new head for ``num_classes``."""
    import torch

    from medmerge.merge.coefficients import NORMALIZERS
    from medmerge.merge.functional import KernelMerge
    from medmerge.models import create_model, head_keys

    torch.manual_seed(seed)
    skeleton = create_model(arch, num_classes=num_classes)
    frozen = torch.tensor(list(weights), dtype=torch.float32)
    if len(frozen) != len(sources) or abs(float(frozen.sum()) - 1.0) > 1e-6 or bool((frozen < 0).any()):
        raise ValueError(f"fixed merge weights must be one non-negative weight per source summing to 1, "
                         f"got {list(weights)}")
    merge = KernelMerge(skeleton, sources, source_names, head_keys(skeleton), "model", NORMALIZERS["softmax"],
                        frozen)
    merge.logits.requires_grad_(False)
    return merge


def fixed_weight_merge(inputs: MergeInputs, weights: Sequence[float]) -> MergeResult:
    """A plain weighted average of the sources with a linear-probe head; scored on the validation split."""
    from medmerge.merge.collapse import collapse
    from medmerge.scoring import validation_f1
    from medmerge.train import fit_linear_probe, make_transform

    settings, data = inputs.settings, inputs.data
    merge = build_fixed_merge(inputs.arch, inputs.sources, inputs.source_names, data.num_classes, weights,
                              seed=inputs.seed)
    model = collapse(merge, inputs.arch, data.num_classes, data if settings.bn_recalibration else None,
                     inputs.runtime, seed=inputs.seed, repair_data=data if settings.repair else None)
    fit_linear_probe(model, data.train, make_transform(inputs.arch, inputs.runtime, inputs.seed), data.num_classes,
                     settings.class_weighted)
    adopt_head_and_buffers(merge, model.state_dict())
    return MergeResult(merge, validation_f1(model, inputs.arch, data, inputs.runtime))


def adopt_head_and_buffers(merge: KernelMerge, state: dict[str, Tensor]) -> None:
    """Give the merge's skeleton the head and the (recalibrated) buffers of its collapsed model."""
    import torch

    with torch.no_grad():
        parameters = dict(merge.skeleton.named_parameters())
        for key in merge.head_keys:
            parameters[key].copy_(state[key].to(parameters[key]))
        for key, buffer in merge.skeleton.named_buffers():
            buffer.copy_(state[key].to(buffer))
