"""What a trained model scores on a target's splits: every reported metric on the test split, the logits that
``evaluate`` compares, and the validation macro F1 that picks a merge's best variant."""

from __future__ import annotations

from torch import nn

from medmerge.data.target import TargetData
from medmerge.device import Runtime
from medmerge.metrics import classification_metrics
from medmerge.predictions import SPLITS, SplitPredictions
from medmerge.train import evaluate_loss_f1, make_transform, predict, predict_logits


def score_test_split(model: nn.Module, arch: str, data: TargetData, runtime: Runtime) -> dict:
    """Every reported metric on the test split, plus the confusion matrix."""
    probabilities, labels = predict(runtime.prepare(model), data.test, make_transform(arch, runtime))
    return classification_metrics(labels, probabilities, data.classes)


def split_predictions(model: nn.Module, arch: str, data: TargetData, runtime: Runtime) -> dict[str, SplitPredictions]:
    """The model's logits on the validation and test splits (what ``evaluate`` compares)."""
    model, transform = runtime.prepare(model), make_transform(arch, runtime)
    return {split: SplitPredictions(*predict_logits(model, getattr(data, split), transform)) for split in SPLITS}


def validation_f1(model: nn.Module, arch: str, data: TargetData, runtime: Runtime) -> float:
    """Macro F1 on the validation split."""
    return evaluate_loss_f1(model, data.val, make_transform(arch, runtime), data.num_classes)[1]
