"""The extras of the training loop, as hooks (:class:`~hpvit.engine.loop.Trainer` calls them in list order):
the EMA of the weights, the NaN guard, checkpoints, the curves PNG and the process-wide ``update_hooks``
(where, e.g., the kill-and-resume tests plug their fault injection in from tests/fault_seam).

A hook sees the trainer ``t`` and its loop state (``t.epoch``, ``t.step_in_epoch``, ``t.gstep``, ``t.model``...).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from . import distributed as D
from .logging import plot_curves

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer


class Hook:
    """Called by the trainer: ``before_train``; per micro-batch ``after_loss`` (before backward); per optimizer
    update ``after_step``; per epoch ``after_epoch`` (after its evaluation); ``after_train`` (main process, after
    the model files and results.json are written). Every method but ``after_train`` runs on every rank."""

    def before_train(self, t: "Trainer") -> None:
        pass

    def after_loss(self, t: "Trainer", loss: torch.Tensor) -> None:
        pass

    def after_step(self, t: "Trainer") -> None:
        pass

    def after_epoch(self, t: "Trainer") -> None:
        pass

    def after_train(self, t: "Trainer") -> None:
        pass


class EMAHook(Hook):
    """``t.ema`` (when the recipe turns EMA on) follows the weights after every update."""

    def after_step(self, t: "Trainer") -> None:
        if t.ema is not None:
            t.ema.update(t.model)


class NaNGuard(Hook):
    """Stops the run (DivergenceError, the last good checkpoint kept) when the loss is NaN/inf before an update,
    when the weights are after one (checked before every checkpoint and at the end of each epoch), or when the
    evaluation loss is (the model outputs NaN/inf), before the epoch's checkpoint replaces the good one."""

    def after_loss(self, t: "Trainer", loss: torch.Tensor) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
        if D.all_reduce_sum(bad, t.dist).item() > 0:
            t.prog.close()
            t._diverged(f"the loss is {loss.detach().float().cpu().flatten()[0].item()}", (t.epoch, t.step_in_epoch))

    def after_step(self, t: "Trainer") -> None:
        if t.checkpoint_due() or t.step_in_epoch == t.steps_per_epoch:
            t.check_weights_finite()

    def after_epoch(self, t: "Trainer") -> None:
        rec = t.last_eval if t.last_eval.get("epoch") == t.epoch else {}
        bad = {k: v for k, v in rec.items() if "loss" in k and isinstance(v, float) and not math.isfinite(v)}
        if bad:
            t._diverged(f"the evaluation gives {', '.join(f'{k} {v}' for k, v in bad.items())} (the model outputs NaN "
                        "or inf)", t.epoch_of_last_update(), after_update=True)


class CheckpointHook(Hook):
    """``checkpoint-last.pt`` every ``ckpt_every_steps`` updates inside an epoch and at the end of every epoch."""

    def after_step(self, t: "Trainer") -> None:
        if t.checkpoint_due():
            t.checkpoint()

    def after_epoch(self, t: "Trainer") -> None:
        t.checkpoint()


class CurvesHook(Hook):
    """``curves.png`` redrawn after every epoch and when the run is done."""

    def after_epoch(self, t: "Trainer") -> None:
        if t.dist.is_main:
            plot_curves(t.metrics.read(), t.out / "curves.png", t.task.primary_metric, units=t._units())

    def after_train(self, t: "Trainer") -> None:
        plot_curves(t.metrics.read(), t.out / "curves.png", t.task.primary_metric,
                    "no evaluation set in this run" if t.eval_ds is None else "no evaluation yet", units=t._units())


class UpdateHooks(Hook):
    """The process-wide ``Trainer.update_hooks``: ``hook(trainer, update)`` after every update, last of all."""

    def after_step(self, t: "Trainer") -> None:
        for hook in t.update_hooks:
            hook(t, t.gstep)
