"""The extras of the training loop, as hooks (:class:`~hpvit.engine.loop.Trainer` calls them in list order):
the EMA of the weights, the NaN guard, checkpoints, the curves PNG, the process-wide ``update_hooks`` (where,
e.g., the kill-and-resume tests plug their fault injection in from tests/fault_seam) and the stop on
SIGINT/SIGTERM. TensorBoard's hook is in engine/tensorboard.py.

A hook sees the trainer ``t`` and its loop state (``t.epoch``, ``t.step_in_epoch``, ``t.gstep``, ``t.model``...).
The loop imports this module, never the other way round: ``t`` is typed as :data:`Trainer` (``Any``) here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import distributed as D
from .logging import log, plot_curves

Trainer = Any  # engine/loop.py's Trainer, which imports this module


class Hook:
    """Called by the trainer: ``before_train``; per micro-batch ``after_loss`` (before backward); per optimizer
    update ``after_step``; per metrics.jsonl record ``after_record`` (main process, right after it is written);
    per epoch ``after_epoch`` (after its evaluation); ``after_train`` (main process, after the model files and
    results.json are written); ``close`` when the loop ends, finished or not. Every method but ``after_train``
    and ``after_record`` runs on every rank."""

    def before_train(self, t: Trainer) -> None:
        pass

    def after_loss(self, t: Trainer, loss: torch.Tensor) -> None:
        pass

    def after_step(self, t: Trainer) -> None:
        pass

    def after_record(self, t: Trainer, rec: dict[str, Any]) -> None:
        pass

    def after_epoch(self, t: Trainer) -> None:
        pass

    def after_train(self, t: Trainer) -> None:
        pass

    def close(self, t: Trainer) -> None:
        pass


class EMAHook(Hook):
    """``t.ema`` (when the recipe turns EMA on) follows the weights after every update."""

    def after_step(self, t: Trainer) -> None:
        if t.ema is not None:
            t.ema.update(t.model)


class NaNGuard(Hook):
    """Stops the run (DivergenceError, the last good checkpoint kept) when the loss is NaN/inf before an update,
    when the weights are after one (checked before every checkpoint and at the end of each epoch), or when the
    evaluation loss is (the model outputs NaN/inf), before the epoch's checkpoint replaces the good one."""

    def after_loss(self, t: Trainer, loss: torch.Tensor) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
        if D.all_reduce_sum(bad, t.dist).item() > 0:
            t.prog.close()
            t._diverged(f"the loss is {loss.detach().float().cpu().flatten()[0].item()}", (t.epoch, t.step_in_epoch))

    def after_step(self, t: Trainer) -> None:
        if t.checkpoint_due() or t.step_in_epoch == t.steps_per_epoch:
            t.check_weights_finite()

    def after_epoch(self, t: Trainer) -> None:
        rec = t.last_eval if t.last_eval.get("epoch") == t.epoch else {}
        bad = {k: v for k, v in rec.items() if "loss" in k and isinstance(v, float) and not math.isfinite(v)}
        if bad:
            t._diverged(f"the evaluation gives {', '.join(f'{k} {v}' for k, v in bad.items())} (the model outputs NaN "
                        "or inf)", t.epoch_of_last_update(), after_update=True)


class CheckpointHook(Hook):
    """``checkpoint-last.pt`` at the end of every epoch and inside an epoch when :meth:`Trainer.checkpoint_due`
    (every ``ckpt_every_steps`` updates, ``ckpt_every_minutes`` after the last one, or on SIGINT/SIGTERM)."""

    def after_step(self, t: Trainer) -> None:
        if t.checkpoint_due():
            t.checkpoint()

    def after_epoch(self, t: Trainer) -> None:
        t.checkpoint()


class CurvesHook(Hook):
    """``curves.png`` redrawn after every epoch and when the run is done."""

    def after_epoch(self, t: Trainer) -> None:
        if t.dist.is_main:
            plot_curves(t.metrics.read(), t.out / "curves.png", t.task.primary_metric, units=t._units())

    def after_train(self, t: Trainer) -> None:
        plot_curves(t.metrics.read(), t.out / "curves.png", t.task.primary_metric,
                    "no evaluation set in this run" if t.eval_ds is None else "no evaluation yet", units=t._units())


class UpdateHooks(Hook):
    """The process-wide ``Trainer.update_hooks``: ``hook(trainer, update)`` after every update and its checkpoint."""

    def after_step(self, t: Trainer) -> None:
        for hook in t.update_hooks:
            hook(t, t.gstep)


class StopHook(Hook):
    """SIGINT / SIGTERM (:mod:`~hpvit.engine.interrupt`): stop after the update whose checkpoint was just written,
    or, at an epoch's last update, after that epoch's evaluation and checkpoint (not after the last epoch: the run
    finishes). Ends with the resume advice and :class:`KeyboardInterrupt` (``hpvit: interrupted``, exit 130)."""

    def after_step(self, t: Trainer) -> None:
        if t.stop_requested and t.step_in_epoch < t.steps_per_epoch:
            self._stop(t)

    def after_epoch(self, t: Trainer) -> None:
        if t.epoch < t.n_epochs and t.poll_stop():
            self._stop(t)

    @staticmethod
    def _stop(t: Trainer) -> None:
        t.prog.close()
        where = (f"epoch {t.epoch + 1}, step {t.step_in_epoch}/{t.steps_per_epoch}" if t.step_in_epoch
                 else f"the end of epoch {t.epoch}")
        log(f"stopped ({t.signals.requested or 'a signal to another process'}) after update {t.gstep} ({where}); "
            f"resumable checkpoint {t.ckpt_path}. Continue with the same command plus --resume", t.dist.is_main)
        raise KeyboardInterrupt
