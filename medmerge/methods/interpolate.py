"""``interpolate``: two sources, ``alpha * anchor + (1 - alpha) * other``, with the ``alpha`` of ``alphas``
whose collapsed, probed model has the best validation macro F1."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from medmerge.methods.base import MergeInputs, MergeResult, MethodSettings, register_method
from medmerge.methods.fixed import FixedWeightMethod, fixed_weight_merge

if TYPE_CHECKING:
    from medmerge.config import MergeSettings

log = logging.getLogger("medmerge.methods")


class InterpolateSettings(MethodSettings):
    """``merge.alphas`` (the default is params.yaml's)."""

    keys_in_merge = True

    # the anchor's weights tried, each in [0, 1]
    alphas: list[Annotated[float, Field(ge=0, le=1)]] = Field([0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)


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
