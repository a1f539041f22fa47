"""TensorBoard event files in the run folder, when the optional ``tensorboard`` package is installed
(``pip install "hpvit[tensorboard]"``; then ``tensorboard --logdir runs/`` shows every run under ``runs/``).

``metrics.jsonl`` stays the source of truth: the event file holds exactly its records, with the optimizer
update as the step -- ``train/loss``, ``train/lr`` and ``train/images_per_s`` at each logged step, and
``eval/<metric>`` for each evaluation. Resume story: a resumed run cuts metrics.jsonl back to its checkpoint,
so the hook deletes the run's event files and replays the kept records into a new one before training goes on;
no step is ever in the event files twice, and an event file lost or cut short by a crash is rebuilt the same way.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .hooks import Hook
from .logging import log
from .rundir import EVENTS_GLOB

NOT_SCALARS = ("kind", "epoch", "step", "split", "images", "time")


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or None when tensorboard is not installed (or cannot load)."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:  # installed but unusable (e.g. a protobuf it does not support)
        log(f"note: tensorboard is installed but does not load ({type(e).__name__}: {str(e)[:200]}); "
            "no TensorBoard event files are written (metrics.jsonl has every record)")
        return None
    return SummaryWriter


def scalars(rec: dict[str, Any]) -> list[tuple[str, float]]:
    """``(tag, value)`` of every number in a metrics.jsonl record: ``train/loss``, ``eval/top1``..."""
    return [(f"{rec.get('kind', 'other')}/{k}", float(v)) for k, v in rec.items()
            if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)]


class TensorBoardHook(Hook):
    """Mirrors every metrics.jsonl record into ``OUT/events.out.tfevents.*`` (main process only)."""

    def __init__(self) -> None:
        self.writer = None

    def before_train(self, t) -> None:
        if not t.dist.is_main:
            return
        writer_class = summary_writer_class()
        if writer_class is None:
            return
        for p in t.out.glob(EVENTS_GLOB):  # rebuilt from metrics.jsonl (cut back to the checkpoint on resume)
            p.unlink()
        self.writer = writer_class(log_dir=str(t.out), flush_secs=30)
        for rec in t.metrics.read():
            self._add(rec)

    def after_record(self, t, rec: dict[str, Any]) -> None:
        if self.writer is not None:
            self._add(rec)

    def after_epoch(self, t) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self, t) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _add(self, rec: dict[str, Any]) -> None:
        for tag, value in scalars(rec):
            self.writer.add_scalar(tag, value, rec.get("step", 0), walltime=rec.get("time"))
