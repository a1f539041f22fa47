"""The evaluator protocol and the common case: metrics computed from per-batch sums."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..engine import distributed as D


class Evaluator:
    """One evaluation pass: :meth:`reset`, then :meth:`process` for every batch this rank sees, then
    :meth:`evaluate` (called on every rank; it reduces over ranks and returns the metrics)."""

    def reset(self) -> None:
        raise NotImplementedError

    def process(self, model: nn.Module, batch: Any) -> None:
        raise NotImplementedError

    def evaluate(self, dist: "D.DistInfo | None" = None) -> dict[str, Any]:
        raise NotImplementedError


class SumEvaluator(Evaluator):
    """Metrics that are a function of sums over images (correct counts, confusion sums...).

    ``batch_sums(model, batch) -> {name: value}`` per batch; ``finalize(sums) -> metrics`` after the sums are
    added up over batches and ranks (float64, so counts stay exact)."""

    def __init__(self, batch_sums: Callable[[nn.Module, Any], dict[str, float]],
                 finalize: Callable[[dict[str, float]], dict[str, Any]] = dict):
        self.batch_sums, self.finalize = batch_sums, finalize
        self.sums: dict[str, float] = {}

    def reset(self) -> None:
        self.sums = {}

    def process(self, model: nn.Module, batch: Any) -> None:
        for k, v in self.batch_sums(model, batch).items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def evaluate(self, dist: "D.DistInfo | None" = None) -> dict[str, Any]:
        dist = dist or D.DistInfo()
        keys = sorted(set().union(*D.all_gather_objects(sorted(self.sums), dist)))
        t = torch.tensor([self.sums.get(k, 0.0) for k in keys], dtype=torch.float64)
        t = D.all_reduce_sum(t, dist)
        return self.finalize(dict(zip(keys, t.tolist())))
