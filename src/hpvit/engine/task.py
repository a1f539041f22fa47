"""The interface between the shared training engine and a task (classification, detection, segmentation).

The engine owns the loop, distribution, optimisation, checkpoints and logging; a task owns what is
specific to it: the model, the datasets, how a batch becomes a loss, and how to evaluate. A task
subclasses :class:`Task` and overrides the methods marked *required*.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils import atomic_write


class Task:
    """Base class of engine tasks. ``primary_metric`` names the headline number (``top1``, ``mAP``...)."""

    name: str = "task"
    primary_metric: str = "top1"
    # whether prepare_batch mixes images (mixup / cutmix): the recipe line names those keys only then
    batch_mixing: bool = False

    # ---------------------------------------------------------------- required
    def build_model(self) -> nn.Module:
        """*Required.* The model to train, on CPU. Called once per process, under the run's seed."""
        raise NotImplementedError

    def datasets(self) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
        """*Required.* ``(train, eval)`` map-style datasets (``eval`` may be None)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """*Required.* Scalar training loss of a prepared batch (see :meth:`prepare_batch`)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- optional
    def collate_fn(self, train: bool):
        """Collate function for the DataLoader (None = PyTorch's default)."""
        return None

    def prepare_batch(self, batch: Any, device: torch.device, train: bool) -> Any:
        """Move a collated batch to ``device`` and apply batch-level augmentation (mixup...)."""
        return [b.to(device, non_blocking=True) if isinstance(b, torch.Tensor) else b for b in batch]

    def batch_size_of(self, batch: Any) -> int:
        return len(batch[0])

    def evaluator(self):
        """*Required for evaluation.* A fresh :class:`hpvit.evaluation.Evaluator` for the evaluation set."""
        raise NotImplementedError

    def results(self, model: nn.Module) -> dict[str, Any]:
        """Extra entries for ``results.json`` (e.g. GFLOPs per image)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The task's part of the run's exact configuration (stored in checkpoints and results.json)."""
        return {}

    def save_model(self, model: nn.Module, out_dir: Path, ema: nn.Module | None = None) -> list[Path]:
        """Write the final model(s) into ``out_dir``; returns the paths written."""
        p = out_dir / "model.pt"
        atomic_write(p, lambda tmp: torch.save(model.state_dict(), tmp), force=True)
        return [p]
