"""Merge methods behind one interface, chosen by name (``merge.method`` / ``methods.<name>.method``).

Every method takes the N sources (already aligned, if asked) and the target data and returns a
:class:`~medmerge.merge.functional.KernelMerge` whose coefficients and target head are set. What follows is
the same for all of them: collapse into one ordinary model, BatchNorm recalibration, the optional fine-tune
and evaluation (``stages/collapse.py``, ``stages/train.py finetune_merged``, ``stages/evaluate.py``).

- ``average``: the uniform parameter average, one frozen weight ``1/N`` per source.
- ``interpolate``: two sources, ``alpha * anchor + (1 - alpha) * other`` with ``alpha`` from ``merge.alphas``
  chosen by validation macro F1.
- ``medmerge``: the learned blend at ``merge.granularity`` (model / layer / kernel / slice / head).

The fixed-weight methods have no learned head, so theirs is a linear probe fitted on the collapsed model's
frozen features (after BatchNorm recalibration, when that is on); that is also what ``interpolate`` scores
each alpha with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from medmerge.config import MergeSettings
from medmerge.device import Runtime
from medmerge.merge.functional import KernelMerge
from medmerge.pipeline import (
    TargetData,
    build_kernel_merge,
    collapse,
    learn_kernel_weights,
    make_transform,
    validation_f1,
)
from medmerge.resume import ResumeDir
from medmerge.train import EpochResult, fit_linear_probe

log = logging.getLogger("medmerge.methods")


@dataclass
class MergeInputs:
    """What a merge method may use: the sources (in ``source_names`` order) and the target task; a method that
    trains keeps its per-epoch resume checkpoints in ``resume`` (see :func:`medmerge.train.fit`)."""

    arch: str
    sources: Sequence[dict[str, Tensor]]
    source_names: Sequence[str]
    data: TargetData
    settings: MergeSettings
    runtime: Runtime
    seed: int = 0
    on_epoch: Callable[[EpochResult], None] | None = None
    resume: ResumeDir | None = None


@dataclass
class MergeResult:
    """The merge with its coefficients and head set, its validation macro F1, and method-specific details
    (``alpha``, ``best_epoch``...) for ``merge.json`` and MLflow."""

    merge: KernelMerge
    val_f1: float
    details: dict = field(default_factory=dict)


MergeMethod = Callable[[MergeInputs], MergeResult]


def fixed_weight_merge(inputs: MergeInputs, weights: Sequence[float]) -> MergeResult:
    """A plain weighted average of the sources with a linear-probe head; scored on the validation split."""
    settings, data = inputs.settings, inputs.data
    merge = build_kernel_merge(inputs.arch, inputs.sources, inputs.source_names, data.num_classes, settings,
                               seed=inputs.seed, fixed_weights=weights)
    model = collapse(merge, inputs.arch, data.num_classes, data if settings.bn_recalibration else None,
                     inputs.runtime, seed=inputs.seed, repair_data=data if settings.repair else None)
    fit_linear_probe(model, data.train, make_transform(inputs.arch, inputs.runtime, inputs.seed), data.num_classes,
                     settings.class_weighted)
    adopt_head_and_buffers(merge, model.state_dict())
    return MergeResult(merge, validation_f1(model, inputs.arch, data, inputs.runtime))


@torch.no_grad()
def adopt_head_and_buffers(merge: KernelMerge, state: dict[str, Tensor]) -> None:
    """Give the merge's skeleton the head and the (recalibrated) buffers of its collapsed model."""
    parameters = dict(merge.skeleton.named_parameters())
    for key in merge.head_keys:
        parameters[key].copy_(state[key].to(parameters[key]))
    for key, buffer in merge.skeleton.named_buffers():
        buffer.copy_(state[key].to(buffer))


def average(inputs: MergeInputs) -> MergeResult:
    count = len(inputs.sources)
    return fixed_weight_merge(inputs, [1.0 / count] * count)


def interpolate(inputs: MergeInputs) -> MergeResult:
    """``alpha`` on the anchor, ``1 - alpha`` on the other source; the grid point with the best val F1."""
    if len(inputs.sources) != 2:
        raise ValueError(f"interpolate needs exactly two sources, got {list(inputs.source_names)}")
    anchor = list(inputs.source_names).index(inputs.settings.anchor)
    results = []
    for alpha in inputs.settings.alphas:
        weights = [1.0 - alpha, 1.0 - alpha]
        weights[anchor] = alpha
        result = fixed_weight_merge(inputs, weights)
        result.details["alpha"] = alpha
        log.info("interpolate: alpha %.3f on %s -> val macro F1 %.4f", alpha, inputs.settings.anchor, result.val_f1)
        results.append(result)
    best = max(results, key=lambda r: r.val_f1)  # the first of equals: the grid's order breaks ties
    best.details["val_f1_by_alpha"] = {str(r.details["alpha"]): r.val_f1 for r in results}
    return best


def medmerge(inputs: MergeInputs) -> MergeResult:
    """MedMerge: coefficients at ``merge.granularity`` and a new head learned on the target task."""
    merge = build_kernel_merge(inputs.arch, inputs.sources, inputs.source_names, inputs.data.num_classes,
                               inputs.settings, seed=inputs.seed)
    history = learn_kernel_weights(merge, inputs.arch, inputs.data, inputs.settings, inputs.runtime,
                                   seed=inputs.seed, on_epoch=inputs.on_epoch, resume=inputs.resume)
    return MergeResult(merge, history.best_val_f1, {"best_epoch": history.best_epoch})


MERGE_METHODS: dict[str, MergeMethod] = {"average": average, "interpolate": interpolate, "medmerge": medmerge}


def run_merge_method(inputs: MergeInputs) -> MergeResult:
    """Run the method that ``inputs.settings.method`` names."""
    name = inputs.settings.method
    if name not in MERGE_METHODS:
        raise ValueError(f"unknown merge method '{name}'; expected one of {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[name](inputs)


def rebuild_merge(arch: str, sources: Sequence[dict[str, Tensor]], source_names: Sequence[str], num_classes: int,
                  settings: MergeSettings) -> KernelMerge:
    """An empty merge of the shape ``settings.method`` produces, ready for ``restore_merge_state``."""
    if settings.method == "medmerge":
        return build_kernel_merge(arch, sources, source_names, num_classes, settings)
    count = len(sources)
    return build_kernel_merge(arch, sources, source_names, num_classes, settings, fixed_weights=[1.0 / count] * count)
