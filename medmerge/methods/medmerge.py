"""``medmerge``: MedMerge, a convex blend of the sources learned per coefficient group at ``granularity``
(model / layer / kernel / slice / head), with a new head learned on the target task at the same time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field

from medmerge.merge.coefficients import check_granularity, check_normalization, resolve_normalizer
from medmerge.methods.base import MergeInputs, MergeMethod, MergeResult, MethodSettings, register_method

if TYPE_CHECKING:
    from torch import Tensor

    from medmerge.config import MergeSettings
    from medmerge.merge.functional import KernelMerge


class MedMergeSettings(MethodSettings):
    """``merge.<key>`` (the defaults are params.yaml's)."""

    keys_in_merge = True

    lr: float = Field(0.1, gt=0)  # of the coefficient logits
    head_lr: float = Field(1e-3, gt=0)  # of the new target head
    epochs: int = Field(10, ge=0)
    # a key of GRANULARITIES or MODEL_GRANULARITIES (medmerge.merge.coefficients); head: ViTs only
    granularity: Annotated[str, AfterValidator(check_granularity)] = "kernel"
    # auto (sigmoid for two sources, softmax for more) or a key of NORMALIZERS
    normalization: Annotated[str, AfterValidator(check_normalization)] = "auto"
    train_sources: bool = False  # the non-anchor sources learn too, at source_lr
    source_lr: float = Field(1e-4, gt=0)
    init_coefficient: float = Field(0.8, gt=0, lt=1)  # the anchor's initial weight


@register_method
class MedMerge(MergeMethod):
    name = "medmerge"
    settings = MedMergeSettings
    learns_coefficients = True

    def describe(self, settings: MergeSettings) -> str:
        return f"{self.name} ({settings.granularity})"

    def check(self, settings: MergeSettings, source_names: Sequence[str]) -> None:
        resolve_normalizer(settings.normalization, len(source_names)).check(len(source_names))

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
