"""Classification metrics: top-1 / top-5 accuracy (% of images) and mean cross-entropy."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from .base import SumEvaluator

METRIC_UNITS = {"top1": "% of images", "top5": "% of images", "eval_loss": "cross-entropy per image (nats)",
                "eval_count": "images"}


def classification_sums(model: nn.Module, batch: Any) -> dict[str, float]:
    """Sums over one ``(images, labels)`` batch: top-1 / top-5 hits, count, summed cross-entropy."""
    x, y = batch[0], batch[1]
    logits = model(x).float()
    k = min(5, logits.shape[-1])
    hit = logits.topk(k, dim=-1).indices == y[:, None]
    return {"correct1": hit[:, 0].sum().item(), "correct5": hit.any(dim=1).sum().item(), "count": len(y),
            "loss_sum": F.cross_entropy(logits, y, reduction="sum").item()}


def classification_metrics(s: dict[str, float]) -> dict[str, float]:
    n = max(s.get("count", 0.0), 1.0)
    return {"top1": 100.0 * s.get("correct1", 0.0) / n, "top5": 100.0 * s.get("correct5", 0.0) / n,
            "eval_loss": s.get("loss_sum", 0.0) / n, "eval_count": int(s.get("count", 0))}


class ClassificationEvaluator(SumEvaluator):
    """Top-1 / top-5 / loss of a classifier over ``(images, labels)`` batches."""

    def __init__(self):
        super().__init__(classification_sums, classification_metrics)

