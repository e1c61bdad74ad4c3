"""``medmerge``: MedMerge, a convex blend of the sources learned per coefficient group at ``granularity``
(model / layer / kernel / slice / head), with a new head learned on the target task at the same time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from medmerge.methods.base import MergeInputs, MergeMethod, MergeResult, MethodSettings, register_method

if TYPE_CHECKING:
    from torch import Tensor

    from medmerge.config import MergeSettings
    from medmerge.merge.functional import KernelMerge


class MedMergeSettings(MethodSettings):
    granularity: Literal["kernel", "layer", "slice", "model", "head"]  # head: attention blocks only (ViTs)
    normalization: Literal["auto", "softmax", "sigmoid"]
    init_coefficient: float = Field(gt=0, lt=1)  # the anchor's initial weight
    lr: float = Field(gt=0)  # of the coefficient logits
    head_lr: float = Field(gt=0)
    epochs: int = Field(ge=0)
    train_sources: bool  # the non-anchor sources learn too, at source_lr
    source_lr: float = Field(gt=0)


@register_method
class MedMerge(MergeMethod):
    name = "medmerge"
    settings = MedMergeSettings
    learns_coefficients = True

    def describe(self, settings: MergeSettings) -> str:
        return f"{self.name} ({settings.granularity})"

    def check(self, settings: MergeSettings, source_names: Sequence[str]) -> None:
        if settings.normalization == "sigmoid" and len(source_names) != 2:
            raise ValueError(f"with normalization 'sigmoid' needs exactly two sources, got {len(source_names)}")

    def run(self, inputs: MergeInputs) -> MergeResult:
        from medmerge.pipeline import build_kernel_merge, learn_kernel_weights

        merge = build_kernel_merge(inputs.arch, inputs.sources, inputs.source_names, inputs.data.num_classes,
                                   inputs.settings, seed=inputs.seed)
        history = learn_kernel_weights(merge, inputs.arch, inputs.data, inputs.settings, inputs.runtime,
                                       seed=inputs.seed, on_epoch=inputs.on_epoch, resume=inputs.resume)
        return MergeResult(merge, history.best_val_f1, {"best_epoch": history.best_epoch})

    def rebuild(self, arch: str, sources: Sequence[dict[str, Tensor]], source_names: Sequence[str],
                num_classes: int, settings: MergeSettings) -> KernelMerge:
        from medmerge.pipeline import build_kernel_merge

        return build_kernel_merge(arch, sources, source_names, num_classes, settings)
