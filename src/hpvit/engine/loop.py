"""The training loop shared by every task: single process or DDP, checkpoint/resume, divergence stop."""

from __future__ import annotations

import contextlib
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
from ..errors import ConfigError, DataError, HPViTError, RunDirError
from . import distributed as D
from .checkpoint import LAST, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .rundir import LOCK_NAME, SKIPPED_NAME, claim_run_dir
from .ema import ModelEMA
from .logging import MetricsFile, Progress, format_summary, log, plot_curves, recipe_summary
from .optim import build_optimizer
from .recipe import Recipe
from .schedule import LRSchedule, Plan
from .task import Task

# recipe keys that fix the data order / optimisation trajectory: a resumed run must match them
RESUME_KEYS = ("seed", "batch_size", "accum_steps", "max_train_samples", "epochs", "iterations", "warmup_epochs",
               "warmup_iters", "schedule", "lr_steps", "layer_decay", "weight_decay", "img_size")
# keys a resumed run may change (what the divergence advice tells the user to change); each change is noted
ADJUSTABLE_ON_RESUME = ("lr", "blr", "min_lr", "clip_grad", "amp")


class DivergenceError(HPViTError):
    """The training loss became NaN or infinite; the last good checkpoint was kept."""


RECIPE_FILE = "recipe.json"  # the resolved recipe of the run, written when the run starts
OWN_START_FILES = (RECIPE_FILE,)  # what a run that fails before training leaves; removed with the folder it created


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

    Files: ``checkpoint-last.pt`` (atomic; resume point), ``metrics.jsonl``, ``results.json``,
    ``curves.png``, the task's final model files and, with ``skip_bad_images``, ``skipped-images.txt``.
    The folder is claimed with :func:`~hpvit.engine.rundir.claim_run_dir` for the whole run (one run per
    folder; a finished run is replaced only with ``overwrite``). Before the first step every evaluation
    image is decoded and every training image's header is read (:func:`~hpvit.data.check.check_datasets`).
    """

    # callables ``hook(trainer, update)`` run on every rank after each optimizer update (and the checkpoint it
    # may write); shared by every Trainer in the process. Extras plug in here instead of into the loop (the
    # kill-and-resume tests register their fault injection this way, from tests/fault_seam).
    update_hooks: list = []

    def __init__(self, task: Task, recipe: Recipe, out_dir: "str | os.PathLike", resume: bool = False,
                 device: str | None = None, run_config: dict[str, Any] | None = None, overwrite: bool = False,
                 skip_bad_images: bool = False, check_data: bool = True):
        self.task, self.recipe, self.out = task, recipe, Path(out_dir)
        self.resume, self.device_arg, self.overwrite = resume, device, overwrite
        self.skip_bad_images, self.check_data = skip_bad_images, check_data
        self.run_config = run_config or {}

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
            persistent_workers=False,
        )

    def run(self) -> dict[str, Any]:
        self.dist = D.init_distributed(self.device_arg)
        self.workers = usable_workers(self.recipe.num_workers, self.dist.world_size, self.dist.is_main)
        run_dir = None
        created = not self.out.exists()
        ok = False
        try:
            run_dir = self._claim()
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
        """Print the resolved recipe and write it to ``OUT/recipe.json`` before anything else happens."""
        if not self.dist.is_main:
            return
        write_text_atomic(self.out / RECIPE_FILE, json.dumps(self.recipe.to_dict(), indent=2))
        extra = f", {self.workers} loader worker(s)" if self.workers != self.recipe.num_workers else ""
        log(recipe_summary(self.recipe) + extra + f"; full recipe in {self.out / RECIPE_FILE}")

    def _remove_unstarted(self) -> None:
        """A run that failed before writing anything but its start files leaves no folder behind (it made it)."""
        if not self.dist.is_main:
            return
        names = {p.name for p in self.out.iterdir()} if self.out.is_dir() else set()
        if names <= {LOCK_NAME, *OWN_START_FILES}:
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

    def _run(self) -> dict[str, Any]:
        r, dist = self.recipe, self.dist
        main = dist.is_main
        t_start = time.time()
        if r.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if dist.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
        ckpt_path = self.out / LAST
        ckpt = None
        if self.resume:
            if ckpt_path.exists():
                ckpt = load_checkpoint(ckpt_path)
                self._check_resume(ckpt)
            else:
                log(f"--resume: no checkpoint in {self.out}, starting a new run", main)

        # model: identical on every rank (built under the run seed), then per-rank RNG streams
        _seed_all(r.seed)
        model = self.task.build_model()
        if r.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ConfigError(f"{type(model).__name__} has no set_grad_checkpointing(); set grad_checkpointing false")
            model.set_grad_checkpointing(True)
        model.to(dist.device)
        _seed_all(r.seed + dist.rank)

        train_ds, eval_ds = self.task.datasets()
        skipped_file = self.out / SKIPPED_NAME
        if main and ckpt is None and skipped_file.exists():
            skipped_file.unlink()  # a new run lists its own skipped images
        bad = self._check_data(train_ds, eval_ds, skipped_file) if self.check_data else []
        if self.skip_bad_images:
            train_ds = SkipBadImages(train_ds, skipped_file, exclude=bad)
        train_ds = SeededDataset(train_ds, seed=r.seed)
        sampler = ResumableSampler(len(train_ds), dist.rank, dist.world_size, shuffle=True, seed=r.seed)
        batches = sampler.per_rank() // r.batch_size
        steps_per_epoch = batches // r.accum_steps
        if steps_per_epoch < 1:
            raise ConfigError(
                f"{len(train_ds)} training images over {dist.world_size} process(es) do not fill one optimizer step of "
                f"batch_size {r.batch_size} x accum_steps {r.accum_steps}; lower --batch-size or use more data"
            )
        plan = Plan.of(r, steps_per_epoch)
        n_epochs = plan.epochs
        lr = r.absolute_lr(dist.world_size)
        optimizer = build_optimizer(model, r, lr)
        sched = LRSchedule.for_plan(optimizer, r, plan, lr)
        scaler = torch.amp.GradScaler(dist.device.type, enabled=r.amp == "fp16")
        ema = ModelEMA(model, r.ema_decay) if r.ema else None
        net: nn.Module = model
        if dist.enabled:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)

        metrics = MetricsFile(self.out / "metrics.jsonl", enabled=main)
        epoch, step_in_epoch, gstep = 0, 0, 0
        train_time, images_seen, prior_wall = 0.0, 0, 0.0
        history: list[dict[str, Any]] = []
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            if json.loads(ckpt["recipe"]).get("amp") == r.amp:
                scaler.load_state_dict(ckpt["scaler"])
            sched.base_lr, sched.min_lr = lr, r.min_lr  # a resumed run may lower the lr (divergence advice)
            if ema is not None and ckpt["ema"] is not None:
                ema.load_state_dict(ckpt["ema"])
            elif ema is not None:
                log("the checkpoint has no EMA weights (EMA was off): the EMA starts from the resumed weights", main)
            epoch, step_in_epoch, gstep = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
            train_time, images_seen, prior_wall = ckpt["train_time"], ckpt["images_seen"], ckpt["wall_time"]
            history = json.loads(ckpt["history"])
            set_rng_state(ckpt["rng"][dist.rank] if dist.rank < len(ckpt["rng"]) else ckpt["rng"][0])
            metrics.truncate_after(gstep)
            log(f"resumed from {ckpt_path} at epoch {epoch}, step {step_in_epoch}/{steps_per_epoch} (update {gstep})", main)
        else:
            metrics.reset()

        gb = r.global_batch(dist.world_size)
        log(
            f"task {self.task.name}: {len(train_ds)} train / {len(eval_ds) if eval_ds is not None else 0} eval images, "
            f"{dist.world_size} process(es) on {dist.device.type}"
            + (f" ({dist.backend})" if dist.backend else "")
            + f"; per-process batch {r.batch_size} x accum {r.accum_steps}, global batch {gb}; lr {lr:.3g} "
            f"(layer decay {r.layer_decay}, {r.schedule} schedule); {steps_per_epoch} steps/epoch x {n_epochs} epochs"
            + (f" ({r.iterations} iterations rounded up to whole epochs: {plan.total_steps} updates)"
               if r.iterations else ""),
            main,
        )

        def state(ep: int, sie: int) -> dict[str, Any]:
            rngs = D.all_gather_objects(rng_state(), dist)
            return {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "epoch": ep, "step_in_epoch": sie, "global_step": gstep, "rng": rngs,
                "world_size": dist.world_size, "recipe": json.dumps(r.to_dict()),
                "train_time": train_time, "images_seen": images_seen, "wall_time": prior_wall + time.time() - t_start,
                "history": json.dumps(history), "run_config": json.dumps(self.run_config, default=str),
            }

        def checkpoint(ep: int, sie: int) -> None:
            st = state(ep, sie)  # every rank takes part in gathering the RNG states
            if main:
                save_checkpoint(ckpt_path, st)
            D.barrier(dist)

        last_eval: dict[str, float] = history[-1] if history else {}
        while epoch < n_epochs:
            sampler.set_epoch(epoch, start=step_in_epoch * r.accum_steps * r.batch_size)
            train_ds.set_epoch(epoch)
            loader = self._loader(train_ds, sampler, r.batch_size, True, r.seed * 7 + epoch)
            it = iter(loader)
            net.train()
            prog = Progress(steps_per_epoch, f"epoch {epoch + 1}/{n_epochs}", main, r.log_every_steps, step_in_epoch,
                            unit_scale=gb)
            t_epoch = time.time()
            loss_acc, n_acc = 0.0, 0
            while step_in_epoch < steps_per_epoch:
                t0 = time.time()
                cur_lr = sched.apply(gstep)
                step_loss = 0.0
                for micro in range(r.accum_steps):
                    batch = self.task.prepare_batch(self._next(it), dist.device, train=True)
                    sync = micro == r.accum_steps - 1
                    ctx = net.no_sync() if (dist.enabled and not sync) else contextlib.nullcontext()
                    with ctx:
                        with self._autocast():
                            loss = self.task.loss(net, batch)
                        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
                        if D.all_reduce_sum(bad, dist).item() > 0:
                            prog.close()
                            self._diverged(loss, epoch, step_in_epoch, gstep, ckpt_path)
                        scaler.scale(loss / r.accum_steps).backward()
                    step_loss += loss.item() / r.accum_steps
                if r.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), r.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
                sched.advance()
                gstep += 1
                step_in_epoch += 1
                images_seen += gb
                train_time += time.time() - t0
                loss_acc += step_loss
                n_acc += 1
                prog.update(loss=step_loss, lr=cur_lr)
                if n_acc >= r.log_every_steps or step_in_epoch == steps_per_epoch:
                    avg = torch.tensor([loss_acc / n_acc])
                    avg = D.all_reduce_sum(avg, dist).item() / dist.world_size
                    metrics.write({"kind": "train", "epoch": epoch + 1, "step": gstep, "loss": avg, "lr": cur_lr,
                                   "images_per_s": images_seen / max(train_time, 1e-9)})
                    loss_acc, n_acc = 0.0, 0
                if r.ckpt_every_steps and gstep % r.ckpt_every_steps == 0 and step_in_epoch < steps_per_epoch:
                    checkpoint(epoch, step_in_epoch)
                for hook in self.update_hooks:
                    hook(self, gstep)
            prog.close()
            del it, loader
            epoch += 1
            step_in_epoch = 0
            epoch_time = time.time() - t_epoch
            if eval_ds is not None and (epoch % max(r.eval_every_epochs, 1) == 0 or epoch == n_epochs):
                t_eval = time.time()
                ev = self.evaluate(model, eval_ds, f"epoch {epoch}/{n_epochs}: evaluating {self._split_name()}")
                rec = {"kind": "eval", "epoch": epoch, "step": gstep, "split": self._split_name(),
                       "images": len(eval_ds), **ev}
                if ema is not None:
                    rec.update({f"ema_{k}": v for k, v in
                                self.evaluate(ema.module, eval_ds, f"epoch {epoch}/{n_epochs}: evaluating EMA").items()})
                history.append(rec)
                last_eval = rec
                metrics.write(rec)
                log(format_summary(epoch, n_epochs, rec, self._summary_keys(), self._units(),
                                   epoch_time, time.time() - t_eval, self.out / "metrics.jsonl"), main)
            checkpoint(epoch, 0)
            if main:
                plot_curves(metrics.read(), self.out / "curves.png", self.task.primary_metric, units=self._units())

        # ------------------------------------------------------------ finish
        digests = D.all_gather_objects(param_digest(model), dist)
        in_sync = len(set(digests)) == 1
        if not in_sync:
            log(f"ERROR: ranks ended with different weights: {digests}", main)
        results: dict[str, Any] = {}
        if main:
            files = self.task.save_model(model, self.out, ema.module if ema is not None else None)
            wall = prior_wall + time.time() - t_start
            results = {
                **{k: v for k, v in last_eval.items() if k not in ("kind", "step", "split", "images")},
                "eval_split": self._split_name() if eval_ds is not None else None,
                "metric_units": self._units(),
                "epochs": n_epochs,
                "steps": gstep,
                "wall_time_s": round(wall, 2),
                "train_time_s": round(train_time, 2),
                "images_per_s": round(images_seen / max(train_time, 1e-9), 2),
                "train_images": len(train_ds),
                "eval_images": len(eval_ds) if eval_ds is not None else 0,
                "world_size": dist.world_size,
                "global_batch": gb,
                "lr": lr,
                "ranks_in_sync": in_sync,
                "rank_param_digests": digests,
                "model_files": [str(f) for f in files],
                **self.task.results(model),
                "config": {"recipe": r.to_dict(), "task": self.task.describe(), "run": self.run_config},
            }
            write_text_atomic(self.out / "results.json", json.dumps(results, indent=2, default=str))
            plot_curves(metrics.read(), self.out / "curves.png", self.task.primary_metric,
                        "no evaluation set in this run" if eval_ds is None else "no evaluation yet", units=self._units())
            score = self.task.primary_metric in results
            log("done: " + (f"{self.task.primary_metric} {results[self.task.primary_metric]:.4g}, " if score else "")
                + f"wall {wall:.0f}s, {results['images_per_s']:.1f} img/s; results in {self.out / 'results.json'}", main)
        D.barrier(dist)
        return results

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
        training indices to leave out (only with ``skip_bad_images``; they are listed in ``skipped_file``)."""
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
        write_skipped(skipped_file, [(b.path, b.message) for b in bad])
        log(f"--skip-bad-images: {len(bad)} unreadable training image(s) left out, listed in {skipped_file}", True)
        return [b.index for b in bad]

    def _check_resume(self, ckpt: dict[str, Any]) -> None:
        old = {**Recipe().to_dict(), **json.loads(ckpt["recipe"])}  # keys added since the checkpoint: defaults
        new = self.recipe.to_dict()
        changed = [k for k in ADJUSTABLE_ON_RESUME if json.dumps(old.get(k)) != json.dumps(new.get(k))]
        if changed:
            log("resuming with changed " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
                + ": the run continues from the checkpoint with the new value(s) (no longer bit-identical to an "
                "uninterrupted run)", self.dist.is_main)
        diff = {k: (old.get(k), new.get(k)) for k in RESUME_KEYS if json.dumps(old.get(k)) != json.dumps(new.get(k))}
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

    def _diverged(self, loss: torch.Tensor, epoch: int, step: int, gstep: int, ckpt_path: Path) -> None:
        val = loss.detach().float().cpu().flatten()[0].item()
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
        raise DivergenceError(
            f"training diverged: the loss is {val} at epoch {epoch + 1}, step {step + 1} (update {gstep + 1}); "
            f"stopped before the optimizer step, {where}. {advice}"
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
        pin_memory=dist.device.type == "cuda", generator=torch.Generator().manual_seed(0))
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
