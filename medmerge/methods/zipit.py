"""``zipit``: ZipIt! (Stoica et al., ICLR 2024), features merged by correlation within and across the N
sources in every permutation space, to one model of the anchor's width (full zipping), with a linear-probe
head. The algorithm is :mod:`medmerge.merge.zipit`; docs/methods.md says where this differs from the paper."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from medmerge.methods.base import MergeInputs, MergeMethod, MergeResult, MethodSettings, register_method

if TYPE_CHECKING:
    from medmerge.config import MergeSettings

log = logging.getLogger("medmerge.methods")


class ZipItSettings(MethodSettings):
    """``methods.<name>.options``: ``images``, ``alpha``, ``beta``, ``same_model_merges``, ``stop_at``."""

    # target training images (in order, no augmentation) whose features are correlated
    images: int = Field(256, ge=1)
    # repeated matching: 0 = a merged feature joins no further feature of a model it holds; > 0 scales its
    # correlations (the public code's default 0.3)
    alpha: float = Field(0.3, ge=0, le=1)
    # same-model budget: the fraction of each model's merges that may join two of its own features
    beta: float = Field(0.125, ge=0, le=1)
    # allow merges of two features of one model (False: across models only, a permutation-like merge)
    same_model_merges: bool = True
    # partial zipping: only 'none' (full zipping); a partial zip is a multi-head model, not one timm model
    stop_at: str = "none"

    @field_validator("stop_at")
    @classmethod
    def _full_zip_only(cls, value: str) -> str:
        if value != "none":
            raise ValueError("partial zipping leaves the later layers as N separate heads, not one ordinary "
                             "timm model: only 'none' (full zipping) is supported")
        return value


@register_method
class ZipIt(MergeMethod):
    name = "zipit"
    collapses_while_learning = True  # recalibrates the merged model before fitting its head
    settings = ZipItSettings

    def describe(self, settings: MergeSettings) -> str:
        own = self.own_settings(settings)
        return f"zipit (alpha {own.alpha}, beta {own.beta}{'' if own.same_model_merges else ', across only'})"

    def check(self, settings: MergeSettings, source_names: Sequence[str]) -> None:
        if len(source_names) < 2:
            raise ValueError(f"needs at least two sources, got {list(source_names)}")
        if settings.align != "none":
            raise ValueError(f"matches features itself: set align: none (got {settings.align!r})")

    def run(self, inputs: MergeInputs) -> MergeResult:
        import torch

        from medmerge.merge.alignment import alignment_skeleton
        from medmerge.merge.collapse import recalibrate_on_target
        from medmerge.merge.zipit import zip_sources
        from medmerge.models import backbone_state, create_model, load_backbone
        from medmerge.scoring import validation_f1
        from medmerge.train import fit_linear_probe, make_transform

        own = self.own_settings(inputs.settings)
        data, runtime, settings = inputs.data, inputs.runtime, inputs.settings
        skeleton, spec = alignment_skeleton(inputs.arch)
        names = list(inputs.source_names)
        order = [names.index(settings.anchor)] + [i for i in range(len(names)) if names[i] != settings.anchor]
        states = [backbone_state(inputs.sources[i], skeleton) for i in order]
        transform = make_transform(inputs.arch, runtime, inputs.seed)
        in_order = data.train.in_order(min(max(data.train.batch_size, 32), own.images))

        def batches():
            seen = 0
            for images, _ in in_order:
                if seen >= own.images:
                    return
                take = images[: own.images - seen]
                seen += len(take)
                yield transform(take).float()

        start = time.perf_counter()
        merged, report = zip_sources(skeleton, spec, states, batches(), own.alpha, own.beta, own.same_model_merges,
                                     device=runtime.device)
        seconds = time.perf_counter() - start
        torch.manual_seed(inputs.seed)
        model = create_model(inputs.arch, num_classes=data.num_classes)
        load_backbone(model, merged)
        model = runtime.prepare(model)
        if settings.bn_recalibration:
            recalibrate_on_target(model, inputs.arch, data, runtime, inputs.seed)
        fit_linear_probe(model, data.train, transform, data.num_classes, settings.class_weighted)
        model.eval()
        val_f1 = validation_f1(model, inputs.arch, data, runtime)
        log.info("zipit: val macro F1 %.4f (%.1f s to zip)", val_f1, seconds)
        return MergeResult(None, val_f1, {"zipit": {**report, "seconds": round(seconds, 3)}}, model=model.cpu())
