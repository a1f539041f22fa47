"""Per-step learning rate: linear warmup, then half-cycle cosine to ``min_lr`` (as MAE's ``lr_sched``)."""

from __future__ import annotations

import math


class WarmupCosine:
    """Sets ``group["lr"] = lr_scale * lr(step)`` for every optimizer group; ``step`` counts updates."""

    def __init__(self, optimizer, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int):
        self.optimizer, self.base_lr, self.min_lr = optimizer, base_lr, min_lr
        self.warmup_steps, self.total_steps = int(warmup_steps), max(int(total_steps), 1)
        self.step_num = 0

    def lr_at(self, step: float) -> float:
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min((step - self.warmup_steps) / span, 1.0)
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
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def load_state_dict(self, d: dict) -> None:
        self.step_num = int(d["step_num"])
        self.base_lr, self.min_lr = float(d["base_lr"]), float(d["min_lr"])
        self.warmup_steps, self.total_steps = int(d["warmup_steps"]), int(d["total_steps"])
