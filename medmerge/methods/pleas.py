"""``pleas``: PLeaS (Nasery et al., "PLeaS: Merging Models with Permutations and Least Squares", CVPR 2025)
at the sources' width: the sources aligned onto the anchor by activation matching on target training images,
then every conv/linear layer of the merged model solved by least squares so that, on the merged model's own
inputs, it reproduces the ``ratio``-weighted features of the aligned sources (``medmerge.merge.least_squares``),
and a linear-probe head (docs/methods.md, ``## pleas``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from medmerge.methods.base import MergeInputs, MergeMethod, MergeResult, MethodSettings, register_method

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from torch import Tensor

    from medmerge.config import MergeSettings


class PleasSettings(MethodSettings):
    """``methods.<name>.options`` of ``pleas``."""

    budget: float = 1.0  # merged width / sources' width; PLeaS' partial merging (> 1) is not implemented
    ratio: list[float] | None = None  # weight of each source's features in the target (None: equal)
    images: int = Field(256, ge=1)  # target training images the matching and the least squares use (first N)
    ridge: float = Field(1e-4, ge=0)  # ridge, relative to the mean diagonal of each layer's X X^T

    @field_validator("budget")
    @classmethod
    def _only_full_width(cls, value: float) -> float:
        if value != 1.0:
            raise ValueError("pleas supports only budget 1.0 (the sources' width): partial merging to a wider "
                             "model is not implemented")
        return value


@register_method
class Pleas(MergeMethod):
    name = "pleas"
    collapses_while_learning = True  # recalibrates the merged model before fitting its head
    settings = PleasSettings

    def describe(self, settings: MergeSettings) -> str:
        return "PLeaS (activation matching + layer-wise least squares)"

    def check(self, settings: MergeSettings, source_names: list[str]) -> None:
        ratio = self.own_settings(settings).ratio
        if ratio is not None and (len(ratio) != len(source_names) or min(ratio) < 0 or sum(ratio) <= 0):
            raise ValueError(f"options.ratio must be one non-negative weight per source {source_names} with a "
                             f"positive sum, got {ratio}")

    def run(self, inputs: MergeInputs) -> MergeResult:
        import time

        import torch

        from medmerge.merge.alignment import align_sources_by_activations
        from medmerge.merge.alignment.sources import source_models
        from medmerge.merge.collapse import recalibrate_on_target
        from medmerge.merge.least_squares import least_squares_merge
        from medmerge.models import create_model, load_backbone
        from medmerge.models.factory import head_prefixes
        from medmerge.scoring import validation_f1
        from medmerge.train import fit_linear_probe, make_transform

        own = self.own_settings(inputs.settings)
        settings, data, runtime = inputs.settings, inputs.data, inputs.runtime
        count = len(inputs.sources)
        ratio = [r / sum(own.ratio) for r in own.ratio] if own.ratio else [1.0 / count] * count
        images = target_images(data, make_transform(inputs.arch, runtime, inputs.seed), own.images,
                               settings.batch_size)
        start = time.perf_counter()
        aligned, _, alignment = align_sources_by_activations(inputs.arch, inputs.sources, inputs.source_names,
                                                             settings.anchor, images, runtime.device)
        matched = time.perf_counter()
        torch.manual_seed(inputs.seed)
        merged = create_model(inputs.arch, num_classes=data.num_classes)
        anchor = list(inputs.source_names).index(settings.anchor)
        load_backbone(merged, {key: sum(r * s[key] for r, s in zip(ratio, aligned, strict=True))
                               if value.is_floating_point() else value for key, value in aligned[anchor].items()})
        merged = merged.to(runtime.device)
        fits = least_squares_merge(merged, source_models(inputs.arch, aligned, runtime.device), images, ratio,
                                   own.ridge, skip=head_prefixes(merged))
        solved = time.perf_counter()
        if settings.bn_recalibration:
            recalibrate_on_target(merged, inputs.arch, data, runtime, inputs.seed)
        fit_linear_probe(merged, data.train, make_transform(inputs.arch, runtime, inputs.seed), data.num_classes,
                         settings.class_weighted)
        details = {
            "pleas": {"layers": len(fits), "ratio": ratio, "images": min(own.images, len(data.train.labels)),
                      "error_mean": sum(f.error for f in fits) / len(fits),
                      "start_error_mean": sum(f.start_error for f in fits) / len(fits),
                      "matching_seconds": matched - start, "least_squares_seconds": solved - matched},
            "pleas_alignment": alignment,
        }
        return MergeResult(None, validation_f1(merged, inputs.arch, data, runtime), details, model=merged.eval())


def target_images(data, transform, limit: int, batch_size: int) -> Callable[[], Iterable[Tensor]]:
    """A fresh iterator over the first ``limit`` target training images, in order, normalised, unaugmented."""

    def batches():
        left = limit
        for images, _ in data.train.in_order(batch_size):
            if left <= 0:
                return
            yield transform(images[:left])
            left -= len(images)

    return batches
