"""Per-update learning rate: linear warmup, then one of three decays to the end of training.

* ``cosine``: half-cycle cosine from the base lr to ``min_lr`` (MAE's ``lr_sched``; classification);
* ``step``: the base lr, multiplied by ``factor`` at each milestone (Mask R-CNN's 1x: x0.1 after epochs 8
  and 11 of 12);
* ``poly``: ``(base - min_lr) * (1 - t) ** power + min_lr`` (mmseg's poly, the BEiT/MAE UperNet schedule).

:class:`Plan` turns a recipe and the number of updates per epoch into the run's length in updates, its
warmup and its milestones, so the training loop and ``--dry-run`` agree on one schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

KINDS = ("cosine", "step", "poly")


@dataclass(frozen=True)
class Plan:
    """A run's schedule in updates. ``epochs``: epochs run; ``total_steps`` = ``epochs x steps_per_epoch``
    (an iteration budget is rounded up to whole epochs); ``milestones``: updates at which a ``step``
    schedule multiplies the lr by its factor."""

    steps_per_epoch: int
    epochs: int
    total_steps: int
    warmup_steps: int
    milestones: tuple[int, ...]
    requested_iterations: int | None = None

    @classmethod
    def of(cls, recipe, steps_per_epoch: int) -> "Plan":
        spe = max(int(steps_per_epoch), 1)
        iters = recipe.iterations
        epochs = math.ceil(iters / spe) if iters else int(recipe.epochs)
        warm = recipe.warmup_iters
        warmup = int(warm) if warm is not None else round(recipe.warmup_epochs * spe)
        milestones = tuple(round(e * spe) for e in recipe.lr_steps)
        return cls(spe, epochs, epochs * spe, warmup, milestones, iters)


class LRSchedule:
    """Sets ``group["lr"] = lr_scale * lr(step)`` for every optimizer group; ``step`` counts updates."""

    def __init__(self, optimizer, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                 kind: str = "cosine", milestones: tuple[int, ...] = (), factor: float = 0.1, power: float = 1.0):
        if kind not in KINDS:
            raise ConfigError(f"schedule must be one of {KINDS}, got {kind!r}")
        self.optimizer, self.base_lr, self.min_lr = optimizer, base_lr, min_lr
        self.warmup_steps, self.total_steps = int(warmup_steps), max(int(total_steps), 1)
        self.kind, self.milestones, self.factor, self.power = kind, tuple(int(m) for m in milestones), factor, power
        self.step_num = 0

    def lr_at(self, step: float) -> float:
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        if self.kind == "step":
            return self.base_lr * self.factor ** sum(step >= m for m in self.milestones)
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min((step - self.warmup_steps) / span, 1.0)
        if self.kind == "poly":
            return (self.base_lr - self.min_lr) * (1.0 - t) ** self.power + self.min_lr
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def apply(self, step: int | None = None) -> float:
        """Set the learning rate for update ``step`` (default: the current one) and return it."""
        s = self.step_num if step is None else step
        lr = self.lr_at(s)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def advance(self) -> None:
        self.step_num += 1

    def state_dict(self) -> dict:
        return {"step_num": self.step_num, "base_lr": self.base_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps, "kind": self.kind,
                "milestones": list(self.milestones), "factor": self.factor, "power": self.power}

    def load_state_dict(self, d: dict) -> None:
        self.step_num = int(d["step_num"])
        self.base_lr, self.min_lr = float(d["base_lr"]), float(d["min_lr"])
        self.warmup_steps, self.total_steps = int(d["warmup_steps"]), int(d["total_steps"])
        self.kind = d.get("kind", "cosine")  # checkpoints of hpvit 0.1 hold a cosine schedule
        self.milestones = tuple(int(m) for m in d.get("milestones", ()))
        self.factor, self.power = float(d.get("factor", 0.1)), float(d.get("power", 1.0))

    @classmethod
    def for_plan(cls, optimizer, recipe, plan: Plan, base_lr: float) -> "LRSchedule":
        return cls(optimizer, base_lr, recipe.min_lr, plan.warmup_steps, plan.total_steps, recipe.schedule,
                   plan.milestones, recipe.lr_step_factor, recipe.poly_power)



def describe_plan(recipe, world_size: int, train_images: int | None) -> list[str]:
    """The resolved schedule of ``recipe`` on ``world_size`` processes as text lines (``--dry-run``):
    batch per process and global batch, the lr after linear scaling, updates per epoch, length, warmup, the
    lr at every milestone, and the input sizes. Touches no data and no weights: ``train_images`` (None: the
    recipe's ``dataset_images``) is the training-set size the plan is computed for."""
    r = recipe
    gb = r.global_batch(world_size)
    lines = [f"recipe {r.name}" + (f" ({r.source})" if r.source else "")]
    assumed = r.global_batch_assumed
    lines.append(f"processes {world_size}, per-process batch {r.batch_size} x accum {r.accum_steps} -> global batch {gb}"
                 + (f" (the recipe assumes {assumed}" + ("" if assumed == gb else
                    f"; --accum-steps {max(1, round(assumed / (r.batch_size * world_size)))} keeps it") + ")"
                    if assumed else ""))
    lr = r.absolute_lr(world_size)
    if r.lr is not None:
        lines.append(f"lr {lr:.3g} (absolute: the recipe's lr, not scaled with the batch)")
    else:
        lines.append(f"lr {lr:.3g} = blr {r.blr:.3g} x global batch {gb} / 256 (linear scaling)"
                     + (f"; at the assumed global batch {assumed}: {r.blr * assumed / 256:.3g}" if assumed and assumed != gb else ""))
    n = train_images if train_images is not None else r.dataset_images
    if n is None:
        lines.append("training images unknown: give --dry-run-images N to plan the epochs")
        return lines
    per_rank = math.ceil(n / world_size)
    spe = per_rank // r.batch_size // r.accum_steps
    if spe < 1:
        lines.append(f"{n} training images do not fill one update of global batch {gb}")
        return lines
    plan = Plan.of(r, spe)
    src = "given" if train_images is not None else "the recipe's dataset_images"
    lines.append(f"data: {n:,} training images ({src}) -> {spe:,} updates per epoch")
    length = f"{plan.epochs} epochs = {plan.total_steps:,} updates"
    if plan.requested_iterations:
        length = (f"{plan.requested_iterations:,} iterations -> rounded up to whole epochs: " + length)
    lines.append(f"schedule: {length}; warmup {plan.warmup_steps:,} updates; {r.schedule}"
                 + (f" (x{r.lr_step_factor} after epochs {', '.join(f'{e:g}' for e in r.lr_steps)})" if r.schedule == "step" else "")
                 + (f" (power {r.poly_power:g})" if r.schedule == "poly" else ""))
    sched = LRSchedule(None, lr, r.min_lr, plan.warmup_steps, plan.total_steps, r.schedule, plan.milestones,
                       r.lr_step_factor, r.poly_power)
    points = sorted({0, plan.warmup_steps, *plan.milestones, plan.total_steps // 2, plan.total_steps - 1})
    lines.append("lr at update: " + ", ".join(f"{p:,} -> {sched.lr_at(p):.3g}" for p in points if 0 <= p < plan.total_steps))
    if r.train_short_sides:
        sides = r.train_short_sides
        lines.append(f"input: training shorter side {min(sides)}..{max(sides)} ({len(sides)} sizes)"
                     + (f", longer side <= {r.max_long_side}" if r.max_long_side else "")
                     + (f"; evaluation shorter side {r.test_short_side}" if r.test_short_side else ""))
    elif r.base_size or r.ratio_range or r.eval_mode:
        lines.append(f"input: {r.img_size}x{r.img_size} crops"
                     + (f" of images resized to longer side {r.base_size}" if r.base_size else "")
                     + (f" x {r.ratio_range[0]:g}..{r.ratio_range[1]:g}" if r.ratio_range else "")
                     + (f"; evaluation {r.eval_mode}" if r.eval_mode else "")
                     + (f" ({r.img_size} windows, stride {r.slide_stride})" if r.eval_mode == "slide" else ""))
    else:
        lines.append(f"input: img_size {r.img_size}")
    return lines
