"""``medmerge``: MedMerge, a convex blend of the sources learned per coefficient group at ``granularity``
(model / layer / kernel / slice / head), with a new head learned on the target task at the same time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field

from medmerge.merge.coefficients import check_granularity, check_normalization, resolve_normalizer
from medmerge.methods.base import MergeInputs, MergeMethod, MergeResult, MethodSettings, register_method

if TYPE_CHECKING:
    from torch import Tensor

    from medmerge.config import MergeSettings
    from medmerge.data.target import TargetData
    from medmerge.device import Runtime
    from medmerge.merge.functional import KernelMerge
    from medmerge.resume import ResumeDir
    from medmerge.train import EpochResult, History


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
        merge = build_learned_merge(inputs.arch, inputs.sources, inputs.source_names, inputs.data.num_classes,
                                    inputs.settings, seed=inputs.seed)
        history = learn_kernel_weights(merge, inputs.arch, inputs.data, inputs.settings, inputs.runtime,
                                       seed=inputs.seed, on_epoch=inputs.on_epoch, resume=inputs.resume)
        return MergeResult(merge, history.best_val_f1, {"best_epoch": history.best_epoch})

    def rebuild(self, arch: str, sources: Sequence[dict[str, Tensor]], source_names: Sequence[str],
                num_classes: int, settings: MergeSettings) -> KernelMerge:
        return build_learned_merge(arch, sources, source_names, num_classes, settings)


def build_learned_merge(arch: str, sources: Sequence[dict[str, Tensor]], source_names: Sequence[str],
                        num_classes: int, settings: MergeSettings, seed: int = 0) -> KernelMerge:
    """MedMerge's learnable blend of ``sources`` for ``settings`` (granularity, normalisation, anchor), starting
    with ``settings.init_coefficient`` on the anchor; a new head for ``num_classes``."""
    import torch

    from medmerge.merge.coefficients import initial_weights, resolve_normalizer
    from medmerge.merge.functional import KernelMerge
    from medmerge.models import create_model, head_keys

    torch.manual_seed(seed)
    skeleton = create_model(arch, num_classes=num_classes)
    anchor = list(source_names).index(settings.anchor)
    trainable = [settings.train_sources and i != anchor for i in range(len(sources))]
    return KernelMerge(
        skeleton,
        sources,
        source_names,
        head_keys(skeleton),
        settings.granularity,
        resolve_normalizer(settings.normalization, len(sources)),
        initial_weights(len(sources), anchor, settings.init_coefficient),
        trainable,
    )


def learn_kernel_weights(
    merge: KernelMerge,
    arch: str,
    data: TargetData,
    settings: MergeSettings,
    runtime: Runtime,
    *,
    seed: int = 0,
    on_epoch: Callable[[EpochResult], None] | None = None,
    resume: ResumeDir | None = None,
) -> History:
    """Learn the coefficients (and the new head; and non-anchor sources if ``train_sources``); ``resume`` as
    in :func:`medmerge.train.fit`."""
    from medmerge.train import build_optimizer, fit, make_transform, recalibrate_batchnorm

    merge = runtime.prepare(merge)
    groups = merge.learnable_groups()
    optimizer = build_optimizer(
        "adamw",
        [
            {"params": groups["coefficients"], "lr": settings.lr, "weight_decay": 0.0},
            {"params": groups["head"], "lr": settings.head_lr},
            {"params": groups["sources"], "lr": settings.source_lr},
        ],
        weight_decay=1e-4,
    )
    transform = make_transform(arch, runtime, seed)
    # The merged weights change every step, so BatchNorm running statistics lag behind them; validate
    # with statistics recomputed on the training split, exactly as collapse will.
    train_in_order = data.train.in_order(data.val.batch_size)
    return fit(
        merge, optimizer, data.train, data.val, transform,
        epochs=settings.epochs, num_classes=data.num_classes, augment=True, keep_best=True,
        before_validation=lambda: recalibrate_batchnorm(merge, train_in_order, transform),
        class_weights=data.class_weights() if settings.class_weighted else None,
        on_epoch=on_epoch, description="learn kernel weights", resume=resume,
    )
