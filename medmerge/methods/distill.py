"""``distill``: no merge at all, the 1× inference competitor: one student trained to match the ensemble of
the FT baselines (``ensemble_ft``, the mean of their logits) on the target training images, Hinton et al.'s
knowledge distillation (docs/methods.md).

The student starts from the anchor source (its backbone, a new head; ``student_init: source``) or from
another method's merge of the same inputs, collapsed (``student_init: medmerge``, ``average``...). Its own
keys are ``methods.<name>.options.<key>``; the distillation trains as the FT baselines do (AdamW, weight
decay 1e-4, augmentation, one-cycle schedule, best validation epoch kept) for ``distill_epochs`` epochs at
``distill_lr`` (their defaults are params.yaml's ``finetune.epochs`` and ``finetune.lr``; ``epochs`` and
``lr`` are ``merge``'s keys of MedMerge, which a ``student_init: medmerge`` uses), on ``merge.batch_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field

from medmerge.methods.base import (
    MERGE_METHODS,
    MergeInputs,
    MergeMethod,
    MergeResult,
    MethodSettings,
    MethodSettingsError,
    register_method,
)

if TYPE_CHECKING:
    from torch import Tensor

    from medmerge.config import MergeSettings

SOURCE = "source"


def starting_merges() -> list[str]:
    """The methods a student may start from: every registered merge of the sources alone."""
    return [name for name, method in MERGE_METHODS.items() if not method.needs_teachers]


def check_student_init(name: str) -> str:
    if name != SOURCE and name not in starting_merges():
        raise ValueError(f"'{name}' is neither '{SOURCE}' (the anchor source, a new head) nor a merge method to "
                         f"start from: {starting_merges()}")
    return name


class DistillSettings(MethodSettings):
    """``methods.<name>.options.<key>``."""

    temperature: float = Field(4.0, gt=0)  # T of the soft targets; the KL term is scaled by T²
    hard_label_weight: float = Field(0.1, ge=0, le=1)  # alpha: alpha·CE(labels) + (1 - alpha)·T²·KL(teacher)
    distill_epochs: int = Field(8, ge=0)  # = params.yaml finetune.epochs, the baselines' budget
    distill_lr: float = Field(1e-3, gt=0)  # = params.yaml finetune.lr
    # source: the anchor source's backbone with a new head; or a merge method run first on the same inputs
    student_init: Annotated[str, AfterValidator(check_student_init)] = SOURCE


@register_method
class Distill(MergeMethod):
    name = "distill"
    settings = DistillSettings
    needs_teachers = True
    collapses_while_learning = True  # a student started from a merge is that merge collapsed

    def learn_keys(self, settings: MergeSettings) -> set[str]:
        """Its own keys, and those of the merge its student starts from (``student_init``)."""
        keys = super().learn_keys(settings)
        student_init = self.own_settings(settings).student_init
        if student_init == SOURCE:
            return keys
        return keys | MERGE_METHODS.get(student_init).learn_keys(student_settings(settings, student_init))

    def describe(self, settings: MergeSettings) -> str:
        own = self.own_settings(settings)
        start = "anchor source" if own.student_init == SOURCE else own.student_init
        return f"{self.name} (from {start}, T={own.temperature:g}, alpha={own.hard_label_weight:g})"

    def check(self, settings: MergeSettings, source_names: Sequence[str]) -> None:
        own = self.own_settings(settings)
        if own.student_init == SOURCE:
            return
        method = MERGE_METHODS.get(own.student_init)
        try:
            method.validate(student_settings(settings, own.student_init), source_names)
        except MethodSettingsError as error:
            raise ValueError(f"student_init '{own.student_init}': {error}") from None
        except ValueError as error:
            raise ValueError(f"student_init '{own.student_init}' {error}") from None

    def run(self, inputs: MergeInputs) -> MergeResult:
        from medmerge.config import TrainSettings
        from medmerge.merge.distillation import DistillationLoss, agreement, load_teacher
        from medmerge.scoring import validation_f1
        from medmerge.train import make_transform, train_classifier

        own = self.own_settings(inputs.settings)
        if inputs.teachers is None:
            raise ValueError("distill needs the FT baselines as teachers (MergeInputs.teachers), none were given")
        settings, data, runtime = inputs.settings, inputs.data, inputs.runtime
        teacher = load_teacher(inputs.arch, inputs.teachers, inputs.source_names, data.num_classes, runtime)
        init_state, keep_head, details = start_student(inputs, own.student_init)
        criterion = DistillationLoss(teacher, own.temperature, own.hard_label_weight,
                                     DistillationLoss.teacher_key(inputs.teachers))
        recipe = TrainSettings(epochs=own.distill_epochs, lr=own.distill_lr, batch_size=settings.batch_size,
                               class_weighted=settings.class_weighted)
        student, history = train_classifier(
            inputs.arch, init_state, data, recipe, runtime, seed=inputs.seed, keep_head=keep_head,
            on_epoch=inputs.on_epoch, description="distill from the FT ensemble", resume=inputs.resume,
            criterion=criterion)
        val_f1 = history.best_val_f1 if history.epochs else validation_f1(student, inputs.arch, data, runtime)
        transform = make_transform(inputs.arch, runtime, inputs.seed)
        details |= {"best_epoch": history.best_epoch, "student_init": own.student_init,
                    "teacher_agreement_train": agreement(student, teacher, data.train.in_order(data.val.batch_size),
                                                         transform)}
        return MergeResult(None, val_f1, details, model=student)


def student_settings(settings: MergeSettings, method: str) -> MergeSettings:
    """``settings`` for the merge a student starts from: the same entry with ``method``, without distill's
    options (that method runs with its own options' defaults)."""
    return settings.model_copy(update={"method": method, "options": {}})


def start_student(inputs: MergeInputs, student_init: str) -> tuple[dict[str, Tensor], bool, dict]:
    """The student's initial state, whether it has its head already, and what to report of its start."""
    if student_init == SOURCE:
        anchor = list(inputs.source_names).index(inputs.settings.anchor)
        return inputs.sources[anchor], False, {}
    from medmerge.merge.collapse import collapse
    from medmerge.methods.base import run_merge_method

    settings, data = inputs.settings, inputs.data
    # the starting merge logs no epochs: the run's per-epoch metrics are the distillation's
    result = run_merge_method(replace(inputs, settings=student_settings(settings, student_init), on_epoch=None))
    details = {"student_init_val_f1": result.val_f1}
    if result.merge is None:
        model = result.model
    else:
        details["student_init_mean_coefficient"] = result.merge.source_means()
        model = collapse(result.merge, inputs.arch, data.num_classes, data if settings.bn_recalibration else None,
                         inputs.runtime, seed=inputs.seed, repair_data=data if settings.repair else None)
    return {key: value.detach().cpu() for key, value in model.state_dict().items()}, True, details
