"""Knowledge distillation from an ensemble (Hinton et al. 2015): the teacher, the loss, and agreement.

The teacher is the report's ``ensemble_ft``: the FT baselines of every source, whose logits it averages
(``stages/evaluate.py`` averages the same logits). :class:`DistillationLoss` is a
:class:`~medmerge.train.Criterion` for :func:`medmerge.train.fit`: on every training batch the teacher runs
on the same augmented images as the student ("online": a consistent view, Beyer et al. 2022), and the loss is
``alpha · CE(student, labels) + (1 - alpha) · T² · KL(softmax(teacher / T) ‖ softmax(student / T))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from medmerge.data.loader import ArrayBatches, DeviceTransform
from medmerge.device import Runtime
from medmerge.models import create_model
from medmerge.resume import state_digest
from medmerge.train import predict_logits


class EnsembleTeacher(nn.Module):
    """Models whose logits are averaged (eval mode, no gradient): the FT ensemble as one module."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EnsembleTeacher:  # a teacher never leaves eval mode
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([member(x).float() for member in self.members]).mean(dim=0)


def load_teacher(arch: str, states: Sequence[dict[str, Tensor]], names: Sequence[str], num_classes: int,
                 runtime: Runtime) -> EnsembleTeacher:
    """The ensemble of ``states`` (timm ``arch`` models with a ``num_classes`` head), on the runtime's device;
    a state that does not fit is named in one line with its first bad key."""
    members = []
    for name, state in zip(names, states, strict=True):
        model = create_model(arch, num_classes=num_classes)
        expected = model.state_dict()
        bad = [key for key, value in expected.items() if key not in state or state[key].shape != value.shape]
        bad += [key for key in state if key not in expected]
        if bad:
            raise ValueError(f"distill: teacher '{name}' does not fit {arch} with {num_classes} classes at "
                             f"layer {bad[0]} (is it the FT baseline of this target task?)")
        model.load_state_dict(state, strict=True)
        members.append(model)
    return runtime.prepare(EnsembleTeacher(members))


class DistillationLoss:
    """Hinton et al.'s loss against ``teacher`` on the batch the student sees (see the module docstring)."""

    def __init__(self, teacher: nn.Module, temperature: float, hard_label_weight: float, teacher_key: str) -> None:
        self.teacher, self.temperature, self.alpha, self.teacher_key = teacher, temperature, hard_label_weight, teacher_key

    def __call__(self, logits: Tensor, labels: Tensor, images: Tensor, class_weights: Tensor | None) -> Tensor:
        t = self.temperature
        with torch.no_grad():
            soft = torch.softmax(self.teacher(images).float() / t, dim=1)
        kl = nn.functional.kl_div(torch.log_softmax(logits / t, dim=1), soft, reduction="batchmean")
        loss = (1.0 - self.alpha) * t * t * kl
        if self.alpha > 0:
            loss = loss + self.alpha * nn.functional.cross_entropy(logits, labels, weight=class_weights)
        return loss

    def fingerprint(self) -> dict:
        return {"distill": {"temperature": self.temperature, "hard_label_weight": self.alpha,
                            "teacher": self.teacher_key}}

    @staticmethod
    def teacher_key(states: Sequence[dict[str, Tensor]]) -> str:
        return state_digest(states)


def agreement(model: nn.Module, teacher: nn.Module, batches: ArrayBatches, transform: DeviceTransform) -> float:
    """The fraction of ``batches``' images (un-augmented) where ``model`` and ``teacher`` predict one class."""
    mine, _ = predict_logits(model, batches, transform)
    theirs, _ = predict_logits(teacher, batches, transform)
    return float(np.mean(mine.argmax(axis=1) == theirs.argmax(axis=1)))
