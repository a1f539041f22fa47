"""The training engine shared by classification, detection and segmentation.

A task (:class:`Task`) supplies model, datasets, loss and evaluation; :class:`Trainer` runs the loop
(single process or torchrun DDP), AdamW with layer-wise lr decay, warmup + cosine schedule, EMA,
AMP, gradient accumulation and checkpointing, atomic checkpoints with exact resume, divergence
stop, progress/metrics/results/curves files. :func:`claim_run_dir` gives a command one output folder
(lock + overwrite policy); :class:`Trainer` uses it, other commands that write a run folder should too.
"""

from .loop import DivergenceError, Trainer, param_digest
from .optim import build_optimizer, layer_id, param_groups
from .recipe import Recipe, list_recipes, load_recipe
from .rundir import RunDir, claim_run_dir
from .schedule import LRSchedule, Plan
from .task import Task

__all__ = [
    "Trainer", "Task", "Recipe", "load_recipe", "list_recipes", "param_groups", "layer_id", "build_optimizer",
    "LRSchedule", "Plan", "DivergenceError", "param_digest", "claim_run_dir", "RunDir",
]
