"""``average``: the uniform parameter average, one frozen weight ``1/N`` per source, and a linear-probe head."""

from __future__ import annotations

from medmerge.methods.base import MergeInputs, MergeResult, register_method
from medmerge.methods.fixed import FixedWeightMethod, fixed_weight_merge


@register_method
class Average(FixedWeightMethod):
    name = "average"

    def run(self, inputs: MergeInputs) -> MergeResult:
        count = len(inputs.sources)
        return fixed_weight_merge(inputs, [1.0 / count] * count)
