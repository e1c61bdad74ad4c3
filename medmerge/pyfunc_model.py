"""The MLflow pyfunc model of an exported model dir, logged as code (MLflow's "models from code").

MLflow runs this file when the model is loaded, so nothing is pickled: :class:`ExportedClassifier` loads
the dir (``model.safetensors`` + ``card.json``, sha256-checked) through :func:`medmerge.predict.load_classifier`.
Input: uint8 images (N, H, W, 3) of any size, resized and normalised as in training. Output: one row per
image, the predicted class and one ``prob_<class>`` column per class. See :mod:`medmerge.model_registry`.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from medmerge.model_registry import MODEL_ARTIFACT
from medmerge.predict import load_classifier, predictions_table


class ExportedClassifier(PythonModel):
    """Class probabilities of a MedMerge model dir (the ``model_dir`` artifact)."""

    def load_context(self, context) -> None:
        self.classifier = load_classifier(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = self.classifier.prepare(np.asarray(model_input))
        return predictions_table(self.classifier.probabilities(images), self.classifier.classes)


mlflow.models.set_model(ExportedClassifier())
