"""``interpolate``: two sources, ``alpha * anchor + (1 - alpha) * other``, with the ``alpha`` of ``alphas``
whose collapsed, probed model has the best validation macro F1."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import field_validator

from medmerge.methods.base import MergeInputs, MergeResult, MethodSettings, register_method
from medmerge.methods.fixed import FixedWeightMethod, fixed_weight_merge

if TYPE_CHECKING:
    from medmerge.config import MergeSettings

log = logging.getLogger("medmerge.methods")


class InterpolateSettings(MethodSettings):
    alphas: list[float]  # the anchor's weights tried (merge.alphas)

    @field_validator("alphas")
    @classmethod
    def _alphas_in_unit_interval(cls, alphas: list[float]) -> list[float]:
        if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
            raise ValueError(f"expected a non-empty list of weights in [0, 1] for the anchor, got {alphas}")
        return alphas


@register_method
class Interpolate(FixedWeightMethod):
    name = "interpolate"
    settings = InterpolateSettings

    def check(self, settings: MergeSettings, source_names: Sequence[str]) -> None:
        if len(source_names) != 2:
            raise ValueError(f"needs exactly two sources, got {list(source_names)}; use 'average' or 'medmerge' "
                             "for more")

    def run(self, inputs: MergeInputs) -> MergeResult:
        """``alpha`` on the anchor, ``1 - alpha`` on the other source; the grid point with the best val F1."""
        anchor = list(inputs.source_names).index(inputs.settings.anchor)
        results = []
        for alpha in inputs.settings.alphas:
            weights = [1.0 - alpha, 1.0 - alpha]
            weights[anchor] = alpha
            result = fixed_weight_merge(inputs, weights)
            result.details["alpha"] = alpha
            log.info("interpolate: alpha %.3f on %s -> val macro F1 %.4f", alpha, inputs.settings.anchor,
                     result.val_f1)
            results.append(result)
        best = max(results, key=lambda r: r.val_f1)  # the first of equals: the grid's order breaks ties
        best.details["val_f1_by_alpha"] = {str(r.details["alpha"]): r.val_f1 for r in results}
        return best
