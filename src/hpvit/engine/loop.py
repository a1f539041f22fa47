"""The training loop shared by every task: single process or DDP, checkpoint/resume, divergence stop."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils import write_text_atomic
from ..data.check import SkipBadImages, describe_bad, find_bad_items, unwrap_worker_error, write_skipped
from ..data.seeded import ResumableSampler, SeededDataset
from ..errors import CheckpointError, ConfigError, DataError, HPViTError, RunDirError
from . import distributed as D
from .checkpoint import LAST, check_complete, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .rundir import EVENTS_GLOB, LOCK_NAME, SKIPPED_NAME, claim_run_dir
from .ema import ModelEMA
from .hooks import CheckpointHook, CurvesHook, EMAHook, NaNGuard, StopHook, UpdateHooks
from .identity import check_identity, check_out_outside_data, run_identity
from .interrupt import StopSignals, ignore_sigint
from .logging import MetricsFile, Progress, finite_json, format_summary, log, recipe_summary
from .optim import build_optimizer
from .recipe import Recipe
from .schedule import LRSchedule, Plan
from .task import Task
from .tensorboard import TensorBoardHook

# keys a resumed run may change (what the divergence advice tells the user to change); each change is noted
ADJUSTABLE_ON_RESUME = ("lr", "blr", "min_lr", "clip_grad", "amp")
# keys that change neither what is trained nor how: logging, loading, memory, the recipe's name and notes
FREE_ON_RESUME = ("name", "source", "num_workers", "log_every_steps", "ckpt_every_steps", "ckpt_every_minutes",
                  "grad_checkpointing", "global_batch_assumed", "dataset_images")


class DivergenceError(HPViTError):
    """The training loss became NaN or infinite; the last good checkpoint was kept."""


RECIPE_FILE = "recipe.json"  # the resolved recipe of the run, written once the run has started (checks passed)
# what a run that fails at its first step leaves (and TensorBoard's empty event file); removed with the folder it made
OWN_START_FILES = (RECIPE_FILE,)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def usable_workers(requested: int, world_size: int = 1, verbose: bool = True) -> int:
    """``requested`` DataLoader workers, capped at this process's share of the cores (a note says so when capped)."""
    cap = max(usable_cores() // max(world_size, 1), 1)
    if requested > cap:
        log(f"data loading: {requested} workers requested but {usable_cores()} core(s) are shared by {world_size} "
            f"process(es); using {cap}", verbose)
        return cap
    return requested


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names and bytes): equal digests mean identical weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


class Trainer:
    """Fine-tunes ``task``'s model with ``recipe``, writing everything into ``out_dir``.

    Files: ``checkpoint-last.pt`` (atomic; resume point; deleted at the end unless ``keep_checkpoint``),
    ``recipe.json``, ``metrics.jsonl``, ``results.json``, ``curves.png``, TensorBoard event files (when
    tensorboard is installed), the task's final model files and, with ``skip_bad_images``,
    ``skipped-images.txt``. The folder is claimed with :func:`~hpvit.engine.rundir.claim_run_dir` for the whole
    run (one run per folder; a finished run is replaced only with ``overwrite``). Before the first step every
    evaluation image is decoded and every training image's header is read (:func:`~hpvit.data.check.check_datasets`).
    Nothing in the folder is written or deleted before the run has started: the model is built, the data
    checked and a resume accepted (:meth:`_begin`). SIGINT / SIGTERM stop it after a resumable checkpoint.
    """

    # callables ``hook(trainer, update)`` run on every rank after each optimizer update (and the checkpoint it
    # may write); shared by every Trainer in the process. Extras plug in here instead of into the loop (the
    # kill-and-resume tests register their fault injection this way, from tests/fault_seam).
    update_hooks: list = []

    def __init__(self, task: Task, recipe: Recipe, out_dir: "str | os.PathLike", resume: bool = False,
                 device: str | None = None, run_config: dict[str, Any] | None = None, overwrite: bool = False,
                 skip_bad_images: bool = False, check_data: bool = True, keep_checkpoint: bool = True):
        self.task, self.recipe, self.out = task, recipe, Path(out_dir)
        self.resume, self.device_arg, self.overwrite = resume, device, overwrite
        self.skip_bad_images, self.check_data, self.keep_checkpoint = skip_bad_images, check_data, keep_checkpoint
        self.run_config = run_config or {}
        self.skipped: list[tuple[str, str]] = []  # unreadable training images found by the data check
        self.stop_requested, self.save_due, self.signals = False, False, StopSignals(verbose=False)

    # ---------------------------------------------------------------- setup
    def _autocast(self):
        amp = self.recipe.amp
        if amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def _loader(self, ds, sampler, batch_size: int, train: bool, seed: int):
        g = torch.Generator().manual_seed(seed)  # the loader's base seed never touches the global RNG
        return torch.utils.data.DataLoader(
            ds, batch_size=batch_size, sampler=sampler, num_workers=self.workers, drop_last=train,
            collate_fn=self.task.collate_fn(train), pin_memory=self.dist.device.type == "cuda", generator=g,
            persistent_workers=False, worker_init_fn=ignore_sigint if self.workers else None,
        )

    def run(self) -> dict[str, Any]:
        self.dist = D.init_distributed(self.device_arg)
        self.workers = usable_workers(self.recipe.num_workers, self.dist.world_size, self.dist.is_main)
        run_dir = None
        created = not self.out.exists()
        ok = False
        try:
            run_dir = self.run_dir = self._claim()
            self._announce()
            results = self._run()
            ok = True
            return results
        finally:
            if run_dir is not None:
                if not ok and created:
                    self._remove_unstarted()
                run_dir.release()
            D.cleanup(self.dist)

    def _announce(self) -> None:
        """Print the resolved recipe before anything else happens (``OUT/recipe.json`` is written by :meth:`_begin`)."""
        if not self.dist.is_main:
            return
        extra = f", {self.workers} loader worker(s)" if self.workers != self.recipe.num_workers else ""
        log(recipe_summary(self.recipe, self.task.batch_mixing) + extra)

    def _remove_unstarted(self) -> None:
        """A run that failed before writing anything but its start files leaves no folder behind (it made it)."""
        if not self.dist.is_main:
            return
        names = {p.name for p in self.out.iterdir()} if self.out.is_dir() else set()
        if all(n in (LOCK_NAME, *OWN_START_FILES) or fnmatch.fnmatch(n, EVENTS_GLOB) for n in names):
            for n in names - {LOCK_NAME}:
                (self.out / n).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (self.out / LOCK_NAME).unlink()
                self.out.rmdir()

    def _claim(self):
        """The main process claims the output folder; every process fails together when it cannot."""
        run_dir, err = None, None
        if self.dist.is_main:
            try:
                run_dir = claim_run_dir(self.out, resume=self.resume, overwrite=self.overwrite)
            except HPViTError as e:
                err = e
        errs = D.all_gather_objects(None if err is None else str(err), self.dist)
        if err is not None:
            raise err
        if errs[0] is not None:
            raise RunDirError(errs[0])
        return run_dir

    # ---------------------------------------------------------------- the run, step by step
    def _run(self) -> dict[str, Any]:
        self._set_up()
        self._resume_or_start()
        self._begin()
        self._log_plan()
        self.t_saved = time.time()
        try:
            with StopSignals(self.dist.is_main) as self.signals:
                for h in self.hooks:
                    h.before_train(self)
                while self.epoch < self.n_epochs:
                    self._train_epoch()
                    self._evaluate_epoch()
                    for h in self.hooks:
                        h.after_epoch(self)
        finally:
            for h in self.hooks:
                h.close(self)
        return self._finish()

    def _set_up(self) -> None:
        """Checkpoint (with ``resume``) and its recipe check, then the model, the data and the optimizer."""
        r, dist = self.recipe, self.dist
        self.t_start = time.time()
        if r.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if dist.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
        self.ckpt_path = self.out / LAST
        self.ckpt = None
        if self.resume:
            if self.ckpt_path.exists():
                self.ckpt = load_checkpoint(self.ckpt_path)
                if {"recipe", "world_size"} <= self.ckpt.keys():  # the recipe first: the common reason to refuse
                    self._check_resume(self.ckpt)
                check_complete(self.ckpt, self.ckpt_path)
            else:
                log(f"--resume: no checkpoint in {self.out}, starting a new run", dist.is_main)
        self._build_model()
        self.identity = run_identity(self.task, self.model)
        check_out_outside_data(self.task, self.out)
        if self.ckpt is not None:
            check_identity(self.ckpt, self.identity, self.out)
        self._build_data()
        self._build_optimizer()
        self.hooks = [EMAHook(), NaNGuard(), CheckpointHook(), CurvesHook(), UpdateHooks(), TensorBoardHook(), StopHook()]

    def _build_model(self) -> None:
        """Identical on every rank (built under the run seed), then per-rank RNG streams."""
        r, dist = self.recipe, self.dist
        _seed_all(r.seed)
        model = self.task.build_model()
        if r.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ConfigError(f"{type(model).__name__} has no set_grad_checkpointing(); set grad_checkpointing false")
            model.set_grad_checkpointing(True)
        self.model = model.to(dist.device)
        _seed_all(r.seed + dist.rank)

    def _build_data(self) -> None:
        r, dist = self.recipe, self.dist
        train_ds, self.eval_ds = self.task.datasets()
        skipped_file = self.out / SKIPPED_NAME
        bad = self._check_data(train_ds, self.eval_ds, skipped_file) if self.check_data else []
        if self.skip_bad_images:
            train_ds = SkipBadImages(train_ds, skipped_file, exclude=bad)
        self.train_ds = SeededDataset(train_ds, seed=r.seed)
        self.sampler = ResumableSampler(len(self.train_ds), dist.rank, dist.world_size, shuffle=True, seed=r.seed)
        self.steps_per_epoch = self.sampler.per_rank() // r.batch_size // r.accum_steps
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{len(self.train_ds)} training images over {dist.world_size} process(es) do not fill one optimizer "
                f"step of batch_size {r.batch_size} x accum_steps {r.accum_steps}; lower --batch-size or use more data"
            )
        self.plan = Plan.of(r, self.steps_per_epoch)
        self.n_epochs = self.plan.epochs

    def _build_optimizer(self) -> None:
        r, dist, model = self.recipe, self.dist, self.model
        self.lr = r.absolute_lr(dist.world_size)
        self.optimizer = build_optimizer(model, r, self.lr)
        self.sched = LRSchedule.for_plan(self.optimizer, r, self.plan, self.lr)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=r.amp == "fp16")
        self.ema = ModelEMA(model, r.ema_decay) if r.ema else None
        self.net: nn.Module = model
        if dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
        self.metrics = MetricsFile(self.out / "metrics.jsonl", enabled=dist.is_main)

    def _begin(self) -> None:
        """The run has started (model built, data checked, resume accepted): only now is the folder written.
        A new run deletes the run it replaces (``overwrite``; results.json last) or what a run that failed before
        its first checkpoint left; a resumed run cuts metrics.jsonl back to its checkpoint. Then ``recipe.json``
        and the list of training images the data check left out."""
        if not self.dist.is_main:
            return
        skipped_file = self.out / SKIPPED_NAME
        if self.ckpt is None:
            if self.overwrite:
                self.run_dir.clear_previous_run()
            self.metrics.reset()
            for p in [skipped_file, *self.out.glob(EVENTS_GLOB)]:
                p.unlink(missing_ok=True)  # a new run lists its own skipped images and curves
        else:
            self.metrics.truncate_after(self.gstep)
        write_text_atomic(self.out / RECIPE_FILE, json.dumps(self.recipe.to_dict(), indent=2))
        if self.skipped:
            write_skipped(skipped_file, self.skipped)
            log(f"--skip-bad-images: {len(self.skipped)} unreadable training image(s) left out, listed in "
                f"{skipped_file}", True)

    def _resume_or_start(self) -> None:
        """The loop state: zero for a new run, the checkpoint's (every state dict, RNG, loss window) on resume."""
        self.epoch, self.step_in_epoch, self.gstep = 0, 0, 0
        self.train_time, self.images_seen, self.prior_wall = 0.0, 0, 0.0
        self.history: list[dict[str, Any]] = []
        self.loss_acc, self.n_acc = 0.0, 0
        self.prog: "Progress | None" = None
        ckpt, main = self.ckpt, self.dist.is_main
        if ckpt is None:
            self.last_eval: dict[str, Any] = {}
            return
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if json.loads(ckpt["recipe"]).get("amp") == self.recipe.amp:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.sched.base_lr, self.sched.min_lr = self.lr, self.recipe.min_lr  # a resumed run may lower the lr
        if self.ema is not None and ckpt["ema"] is not None:
            self.ema.load_state_dict(ckpt["ema"])
        elif self.ema is not None:
            log("the checkpoint has no EMA weights (EMA was off): the EMA starts from the resumed weights", main)
        self.epoch, self.step_in_epoch, self.gstep = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        self._check_position()
        self.train_time, self.images_seen, self.prior_wall = ckpt["train_time"], ckpt["images_seen"], ckpt["wall_time"]
        self.history = json.loads(ckpt["history"])
        rank = self.dist.rank if self.dist.rank < len(ckpt["rng"]) else 0
        set_rng_state(ckpt["rng"][rank])
        windows = ckpt.get("loss_window") or []  # the logging window the checkpoint cut (older files: none)
        self.loss_acc, self.n_acc = windows[rank] if rank < len(windows) else (0.0, 0)
        self.last_eval = self.history[-1] if self.history else {}
        log(f"resumed from {self.ckpt_path} at epoch {self.epoch}, step {self.step_in_epoch}/{self.steps_per_epoch} "
            f"(update {self.gstep})", main)

    def _check_position(self) -> None:
        """The checkpoint's position must be one this run's plan reaches (an edited or foreign file may not be)."""
        spe = self.steps_per_epoch
        if not (self.epoch <= self.n_epochs and self.step_in_epoch < spe and self.gstep == self.epoch * spe
                + self.step_in_epoch and (self.epoch < self.n_epochs or self.step_in_epoch == 0)):
            raise CheckpointError(
                f"{self.ckpt_path}: its position (epoch {self.epoch}, step {self.step_in_epoch}, update {self.gstep}) is "
                f"not one of this run ({self.n_epochs} epoch(s) x {spe} steps); the checkpoint was edited or comes from "
                "another run. Delete it and start over (--overwrite), or resume with the original settings")

    def _log_plan(self) -> None:
        r, dist, ev = self.recipe, self.dist, self.eval_ds
        log(
            f"task {self.task.name}: {len(self.train_ds)} train / {len(ev) if ev is not None else 0} eval images, "
            f"{dist.world_size} process(es) on {dist.device.type}" + (f" ({dist.backend})" if dist.backend else "")
            + f"; per-process batch {r.batch_size} x accum {r.accum_steps}, global batch {self.global_batch}; lr "
            f"{self.lr:.3g} (layer decay {r.layer_decay}, {r.schedule} schedule); {self.steps_per_epoch} steps/epoch x "
            f"{self.n_epochs} epochs" + (f" ({r.iterations} iterations rounded up to whole epochs: "
                                          f"{self.plan.total_steps} updates)" if r.iterations else "")
            + f"; full recipe in {self.out / RECIPE_FILE}",
            dist.is_main,
        )

    @property
    def global_batch(self) -> int:
        return self.recipe.global_batch(self.dist.world_size)

    def _train_epoch(self) -> None:
        """The optimizer updates left in epoch ``self.epoch`` (all of them, or those after a resume point)."""
        r, main = self.recipe, self.dist.is_main
        self.sampler.set_epoch(self.epoch, start=self.step_in_epoch * r.accum_steps * r.batch_size)
        self.train_ds.set_epoch(self.epoch)
        loader = self._loader(self.train_ds, self.sampler, r.batch_size, True, r.seed * 7 + self.epoch)
        it = iter(loader)
        self.net.train()
        self.prog = Progress(self.steps_per_epoch, f"epoch {self.epoch + 1}/{self.n_epochs}", main, r.log_every_steps,
                             self.step_in_epoch, unit_scale=self.global_batch)
        self.t_epoch = time.time()
        while self.step_in_epoch < self.steps_per_epoch:
            self._train_step(it)
            for h in self.hooks:
                h.after_step(self)
        self.prog.close()
        del it, loader
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_time = time.time() - self.t_epoch

    def _train_step(self, it) -> None:
        """One optimizer update over ``accum_steps`` micro-batches (every loss passes the hooks' ``after_loss``)."""
        r, dist, net = self.recipe, self.dist, self.net
        t0 = time.time()
        self.cur_lr = self.sched.apply(self.gstep)
        step_loss = 0.0
        for micro in range(r.accum_steps):
            batch = self.task.prepare_batch(self._next(it), dist.device, train=True)
            sync = micro == r.accum_steps - 1
            with net.no_sync() if (dist.enabled and not sync) else contextlib.nullcontext():
                with self._autocast():
                    loss = self.task.loss(net, batch)
                for h in self.hooks:
                    h.after_loss(self, loss)
                self.scaler.scale(loss / r.accum_steps).backward()
            step_loss += loss.item() / r.accum_steps
        if r.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), r.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.sched.advance()
        self.gstep += 1
        self.step_in_epoch += 1
        self.images_seen += self.global_batch
        self.train_time += time.time() - t0
        self.prog.update(loss=self._log_loss(step_loss), lr=self.cur_lr)
        self._poll()

    def _log_loss(self, step_loss: float) -> float:
        """Average the loss over ``log_every_steps`` updates (and the epoch's end) into metrics.jsonl. Returns the
        loss the console shows: the mean over the logging window so far, which at a logged step is the value
        metrics.jsonl records (averaged over the processes)."""
        r = self.recipe
        self.loss_acc += step_loss
        self.n_acc += 1
        shown = self.loss_acc / self.n_acc
        if self.n_acc >= r.log_every_steps or self.step_in_epoch == self.steps_per_epoch:
            shown = D.all_reduce_sum(torch.tensor([shown]), self.dist).item() / self.dist.world_size
            self.record({"kind": "train", "epoch": self.epoch + 1, "step": self.gstep, "loss": shown,
                         "lr": self.cur_lr, "images_per_s": self.images_seen / max(self.train_time, 1e-9)})
            self.loss_acc, self.n_acc = 0.0, 0
        return shown

    def record(self, rec: dict[str, Any]) -> None:
        """Append ``rec`` (stamped with the time) to metrics.jsonl and hand it to the hooks (TensorBoard)."""
        rec["time"] = round(time.time(), 3)
        self.metrics.write(rec)
        if self.dist.is_main:
            for h in self.hooks:
                h.after_record(self, rec)

    def _agree(self, *flags: bool) -> list[bool]:
        """Each flag, true on every process when it is true on any (one all-reduce): the ranks decide together."""
        t = torch.tensor([float(f) for f in flags], device=self.dist.device)  # NCCL reduces only GPU tensors
        return [v > 0 for v in D.all_reduce_sum(t, self.dist).tolist()]

    def poll_stop(self) -> bool:
        """Whether any process got SIGINT / SIGTERM (the same answer on every rank: they stop together)."""
        self.stop_requested = self._agree(self.signals.requested is not None)[0]
        return self.stop_requested

    def _poll(self) -> None:
        """After every update, the same decisions on every rank: stop, and whether the update gets a checkpoint
        (:meth:`checkpoint_due`); the main process's clock decides ``ckpt_every_minutes``."""
        r, minutes = self.recipe, self.recipe.ckpt_every_minutes
        timed = self.dist.is_main and bool(minutes) and time.time() - self.t_saved >= 60 * minutes
        self.stop_requested, timed = self._agree(self.signals.requested is not None, timed)
        every = r.ckpt_every_steps
        self.save_due = self.step_in_epoch < self.steps_per_epoch and (
            self.stop_requested or timed or (bool(every) and self.gstep % every == 0))

    def checkpoint_due(self) -> bool:
        """Whether the update just made gets a checkpoint inside its epoch (the epoch's end always does): every
        ``ckpt_every_steps`` updates, ``ckpt_every_minutes`` after the last checkpoint, or to stop on a signal."""
        return self.save_due

    def _evaluate_epoch(self) -> None:
        """Score the model (and its EMA) on the evaluation split after every ``eval_every_epochs`` and the last."""
        r, ev, epoch, n = self.recipe, self.eval_ds, self.epoch, self.n_epochs
        if ev is None or not (epoch % max(r.eval_every_epochs, 1) == 0 or epoch == n):
            return
        t_eval = time.time()
        rec = {"kind": "eval", "epoch": epoch, "step": self.gstep, "split": self._split_name(), "images": len(ev),
               **self.evaluate(self.model, ev, f"epoch {epoch}/{n}: evaluating {self._split_name()}")}
        if self.ema is not None:
            rec.update({f"ema_{k}": v for k, v in
                        self.evaluate(self.ema.module, ev, f"epoch {epoch}/{n}: evaluating EMA").items()})
        self.history.append(rec)
        self.last_eval = rec
        self.record(rec)
        log(format_summary(epoch, n, rec, self._summary_keys(), self._units(), self.epoch_time,
                           time.time() - t_eval, self.out / "metrics.jsonl"), self.dist.is_main)

    def state(self) -> dict[str, Any]:
        """Everything a resume needs (every rank takes part: the RNG states and loss windows are gathered)."""
        rngs = D.all_gather_objects(rng_state(), self.dist)
        windows = D.all_gather_objects((self.loss_acc, self.n_acc), self.dist)
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.gstep, "rng": rngs,
            "loss_window": windows, "world_size": self.dist.world_size, "recipe": json.dumps(self.recipe.to_dict()),
            "identity": json.dumps(self.identity, sort_keys=True, default=str),
            "train_time": self.train_time, "images_seen": self.images_seen,
            "wall_time": self.prior_wall + time.time() - self.t_start,
            "history": json.dumps(finite_json(self.history)), "run_config": json.dumps(self.run_config, default=str),
        }

    def checkpoint(self) -> None:
        st = self.state()
        if self.dist.is_main:
            save_checkpoint(self.ckpt_path, st)
        D.barrier(self.dist)
        self.t_saved = time.time()

    def _finish(self) -> dict[str, Any]:
        """Verify (finite weights, ranks in sync), then write the model files, results.json and the final curves."""
        dist, model = self.dist, self.model
        self.check_weights_finite()
        digests = D.all_gather_objects(param_digest(model), dist)
        in_sync = len(set(digests)) == 1
        if not in_sync:
            log(f"ERROR: ranks ended with different weights: {digests}", dist.is_main)
        results: dict[str, Any] = {}
        if dist.is_main:
            files = self.task.save_model(model, self.out, self.ema.module if self.ema is not None else None)
            results = self._results(digests, in_sync, files)
            write_text_atomic(self.out / "results.json", json.dumps(finite_json(results), indent=2, default=str,
                                                                      allow_nan=False))
            for h in self.hooks:
                h.after_train(self)
            score = self.task.primary_metric in results and results[self.task.primary_metric] is not None
            pct = "%" if self._units().get(self.task.primary_metric, "").startswith("%") else ""
            log("done: " + (f"{self.task.primary_metric} {results[self.task.primary_metric]:.4g}{pct}, " if score else "")
                + f"wall {results['wall_time_s']:.0f}s, {results['images_per_s']:.1f} img/s; results in "
                f"{self.out / 'results.json'}; " + self._settle_checkpoint(), True)
        D.barrier(dist)
        return results

    def _settle_checkpoint(self) -> str:
        """Keep or delete the finished run's checkpoint-last.pt (``keep_checkpoint``); says which, and its size."""
        if not self.ckpt_path.is_file():
            return f"no {self.ckpt_path.name}"
        mb = self.ckpt_path.stat().st_size / 2**20
        if not self.keep_checkpoint:
            self.ckpt_path.unlink()
            return f"{self.ckpt_path.name} ({mb:.0f} MB) deleted (--no-keep-checkpoint)"
        return (f"{self.ckpt_path.name} ({mb:.0f} MB: optimizer state, not needed to use the model) kept; delete it "
                "or pass --no-keep-checkpoint")

    def _results(self, digests: list[str], in_sync: bool, files) -> dict[str, Any]:
        r, ev = self.recipe, self.eval_ds
        return {
            **{k: v for k, v in self.last_eval.items() if k not in ("kind", "step", "split", "images", "time")},
            "eval_split": self._split_name() if ev is not None else None,
            "metric_units": self._units(),
            "epochs": self.n_epochs,
            "steps": self.gstep,
            "wall_time_s": round(self.prior_wall + time.time() - self.t_start, 2),
            "train_time_s": round(self.train_time, 2),
            "images_per_s": round(self.images_seen / max(self.train_time, 1e-9), 2),
            "train_images": len(self.train_ds),
            "eval_images": len(ev) if ev is not None else 0,
            "world_size": self.dist.world_size,
            "global_batch": self.global_batch,
            "lr": self.lr,
            "ranks_in_sync": in_sync,
            "rank_param_digests": digests,
            "model_files": [str(f) for f in files],
            **self.task.results(self.model),
            "config": {"recipe": r.to_dict(), "task": self.task.describe(), "run": self.run_config},
        }

    def check_weights_finite(self) -> None:
        """DivergenceError when any rank's weights hold NaN or inf (an update that blew up after a finite loss)."""
        bad = [k for k, v in self.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if D.all_reduce_sum(torch.tensor([float(len(bad))]), self.dist).item() > 0:
            if self.prog is not None:
                self.prog.close()
            self._diverged(f"the weights hold NaN or inf values after the update ({len(bad)} tensor(s) on this "
                           f"process, e.g. {bad[:3]})", self.epoch_of_last_update(), after_update=True)

    def epoch_of_last_update(self) -> tuple[int, int]:
        """(epoch, step) of the update just made, counted from 0, as the divergence message names them."""
        if self.step_in_epoch == 0 and self.epoch > 0:
            return self.epoch - 1, self.steps_per_epoch - 1
        return self.epoch, self.step_in_epoch - 1

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _next(it):
        """The next batch; a data error raised in a DataLoader worker is re-raised with its own message."""
        try:
            return next(it)
        except DataError as e:
            raise unwrap_worker_error(e) from None

    def _check_data(self, train_ds, eval_ds, skipped_file: Path) -> list[int]:
        """Before the first step: decode every evaluation sample and open every training image's header (main
        process; every process raises the same :class:`DataError` naming the files on failure). Returns the
        training indices to leave out (only with ``skip_bad_images``; :meth:`_begin` lists them in ``skipped_file``)."""
        result: tuple[str, Any] = ("ok", [])
        if self.dist.is_main:
            try:
                result = ("ok", self._find_bad(train_ds, eval_ds, skipped_file))
            except DataError as e:
                result = ("error", str(e))
        result = D.broadcast_object(result, self.dist)
        if result[0] == "error":
            raise DataError(result[1])
        return result[1]

    def _find_bad(self, train_ds, eval_ds, skipped_file: Path) -> list[int]:
        workers = self.workers
        if eval_ds is not None:
            bad = find_bad_items(eval_ds, True, "checking the evaluation images", workers)
            if bad:
                raise DataError(describe_bad(bad, "evaluation", len(eval_ds),
                                             "Fix or remove these files (evaluation images are never skipped)"))
        bad = find_bad_items(train_ds, False, "checking the training images", workers)
        if not bad:
            return []
        fatal = [b for b in bad if not b.unreadable]
        if fatal or not self.skip_bad_images:
            hint = "Fix or remove these files" + ("" if fatal else ", or pass --skip-bad-images to train without "
                                                  f"them (they are then listed in {skipped_file})")
            raise DataError(describe_bad(fatal or bad, "training", len(train_ds), hint))
        self.skipped = [(b.path, b.message) for b in bad]  # listed in skipped_file once the run starts
        return [b.index for b in bad]

    def _check_resume(self, ckpt: dict[str, Any]) -> None:
        old = {**Recipe().to_dict(), **json.loads(ckpt["recipe"])}  # keys added since the checkpoint: defaults
        new = self.recipe.to_dict()
        changed = [k for k in ADJUSTABLE_ON_RESUME if json.dumps(old.get(k)) != json.dumps(new.get(k))]
        if changed:
            log("resuming with changed " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
                + ": the run continues from the checkpoint with the new value(s) (no longer bit-identical to an "
                "uninterrupted run)", self.dist.is_main)
        diff = {k: (old.get(k), new.get(k)) for k in new if k not in ADJUSTABLE_ON_RESUME + FREE_ON_RESUME
                and json.dumps(old.get(k)) != json.dumps(new.get(k))}  # everything else fixes the trajectory
        ws = int(os.environ.get("WORLD_SIZE", "1"))
        if ckpt["world_size"] != ws:
            diff["world_size"] = (ckpt["world_size"], ws)
        if diff:
            raise ConfigError(
                f"cannot resume {self.out}: the run was started with different settings "
                + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                + "; resume with the original flags (only " + ", ".join(ADJUSTABLE_ON_RESUME) + " may change on "
                "--resume), or start over with --overwrite or in another --out"
            )

    def _diverged(self, what: str, at: tuple[int, int], after_update: bool = False) -> None:
        """Raise DivergenceError: ``what`` went non-finite at ``(epoch, step)`` (from 0); the last good checkpoint
        (written before any non-finite value reached it) is kept."""
        ckpt_path = self.ckpt_path
        if ckpt_path.exists():
            st = load_checkpoint(ckpt_path)
            where = (f"the last good checkpoint {ckpt_path} (epoch {st['epoch']}, step {st['step_in_epoch']}, "
                     f"update {st['global_step']}) was kept")
            advice = ("Continue from it with a lower learning rate: the same command plus --resume --lr <smaller> "
                      "(or --set blr=<smaller>); --set clip_grad=1.0 and --amp bf16 instead of fp16 may also be "
                      "changed on --resume")
        else:
            where = "no checkpoint had been written yet"
            advice = ("Run the same command again with a lower learning rate (--lr <smaller> or --set blr=<smaller>), "
                      "--set clip_grad=1.0, or --amp bf16 instead of fp16")
        epoch, step = at
        update = self.gstep if after_update else self.gstep + 1
        stopped = "stopped after that update" if after_update else "stopped before the optimizer step"
        raise DivergenceError(
            f"training diverged: {what} at epoch {epoch + 1}, step {step + 1} (update {update}); {stopped}, {where}; "
            f"no model or results.json was written. {advice}"
        )

    def evaluate(self, model: nn.Module, eval_ds, desc: str = "evaluating") -> dict[str, float]:
        task = self.task
        return evaluate(task.evaluator(), model, eval_ds, self.recipe.batch_size, self.workers, self.dist,
                        self._autocast, desc=desc, collate_fn=task.collate_fn(False),
                        prepare=lambda b, dev: task.prepare_batch(b, dev, train=False))

    def _split_name(self) -> str:
        """The evaluation split as the task names it (e.g. ``val``, ``test``, ``images 100:128 of ann.json``)."""
        return str(getattr(self.task, "eval_split", None) or "eval")

    def _summary_keys(self) -> tuple[str, ...]:
        return tuple(getattr(self.task, "summary_metrics", None) or (self.task.primary_metric,))

    def _units(self) -> dict[str, str]:
        return dict(getattr(self.task, "metric_units", None) or {})


@torch.no_grad()
def evaluate(evaluator, model: nn.Module, eval_ds, batch_size: int, num_workers: int = 0,
             dist: "D.DistInfo | None" = None, autocast=contextlib.nullcontext, desc: str = "evaluating",
             collate_fn=None, prepare=None) -> dict[str, float]:
    """Run ``evaluator`` (:class:`hpvit.evaluation.Evaluator`) over ``eval_ds``, sharded over ranks (each image
    exactly once), and return its metrics (reduced over ranks). ``collate_fn`` / ``prepare(batch, device)``: how
    a batch is collated and moved to the device (default: PyTorch's collation, tensors moved). The main process
    shows a progress bar (a log line every ~10% when stderr is not a terminal)."""
    dist = dist or D.DistInfo()
    sampler = ResumableSampler(len(eval_ds), dist.rank, dist.world_size, shuffle=False, pad=False)
    loader = torch.utils.data.DataLoader(
        eval_ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
        pin_memory=dist.device.type == "cuda", generator=torch.Generator().manual_seed(0),
        worker_init_fn=ignore_sigint if num_workers else None)
    prepare = prepare or (lambda b, dev: [t.to(dev, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in b])
    was = model.training
    model.eval()
    evaluator.reset()
    it = iter(loader)
    n_batches = len(loader)
    prog = Progress(n_batches, f"{desc} ({len(eval_ds)} images)", dist.is_main, max(n_batches // 10, 1),
                    unit_scale=batch_size, unit="batch")
    while True:
        try:
            batch = next(it)
        except StopIteration:
            break
        except DataError as e:  # from a worker: drop the worker's traceback, keep the message naming the file
            prog.close()
            raise unwrap_worker_error(e) from None
        with autocast():
            evaluator.process(model, prepare(batch, dist.device))
        prog.update()
    prog.close()
    model.train(was)
    return evaluator.evaluate(dist)
