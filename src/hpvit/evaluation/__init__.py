"""Metrics and drawing, one evaluator per task: ``reset()``, ``process(model, batch)``, ``evaluate()``.

The engine runs an evaluator over a (rank-sharded) dataset; evaluating a saved model needs only the model,
a dataset and the task's evaluator (no training task). Evaluators reduce over ranks themselves, so a
multi-process evaluation scores every image exactly once.
"""

from .base import Evaluator, SumEvaluator
from .classification import ClassificationEvaluator, classification_metrics, classification_sums

__all__ = ["Evaluator", "SumEvaluator", "ClassificationEvaluator", "classification_sums", "classification_metrics"]
