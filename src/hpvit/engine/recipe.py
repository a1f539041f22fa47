"""Training recipes: every hyperparameter of a run in one flat, JSON-serialisable dataclass.

A recipe is a JSON file (``hpvit/recipes/<name>.json`` ships with the package, or any path). Unknown
keys are rejected with a :class:`~hpvit.errors.ConfigError` naming the valid ones, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources

from ..errors import ConfigError
from ..utils import DictIO, field_type_problems, name_or_json


@dataclass
class Recipe(DictIO):
    """Hyperparameters of a fine-tuning run (defaults: MAE's ViT-B ImageNet fine-tuning recipe).

    Learning rate: ``lr`` if given, else ``blr * global_batch / 256`` (MAE's linear scaling rule),
    with ``global_batch = batch_size * accum_steps * world_size``.
    """

    name: str = "custom"
    source: str = ""
    # schedule (engine/schedule.py): length in epochs, or ``iterations`` updates (rounded up to whole epochs)
    epochs: int = 100
    iterations: int | None = None
    warmup_epochs: float = 5.0
    warmup_iters: int | None = None  # overrides warmup_epochs
    schedule: str = "cosine"  # cosine | step | poly
    lr_steps: tuple[float, ...] = ()  # step: epochs after which the lr is multiplied by lr_step_factor
    lr_step_factor: float = 0.1
    poly_power: float = 1.0
    batch_size: int = 32  # per process
    accum_steps: int = 1
    # the global batch (and so the lr, by linear scaling) the recipe was written for; None: not stated
    global_batch_assumed: int | None = None
    # training images of the dataset the recipe was written for (``--dry-run`` plans with it); None: not stated
    dataset_images: int | None = None
    # optimizer (AdamW)
    blr: float = 5e-4
    lr: float | None = None
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    # lr scale of the parameters the transform adds (pooling convs, relative-position tables): a number
    # = that fraction of the base lr, whatever their layer; None = the layer-decayed lr of the block they feed
    new_param_lr_scale: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None
    # regularisation
    drop_path: float = 0.1
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    ema: bool = False
    ema_decay: float = 0.9999
    # data / augmentation (timm create_transform)
    img_size: int = 224
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    color_jitter: float | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # dense prediction (det / seg); None = the task's own default
    train_short_sides: tuple[int, ...] | None = None  # det: multi-scale training, shorter side picked at random
    max_long_side: int | None = None  # det: longer side capped at this (train and test)
    test_short_side: int | None = None  # det: evaluation shorter side
    ratio_range: tuple[float, float] | None = None  # seg: random resize ratio of base_size before the crop
    base_size: int | None = None  # seg: longer side images are resized to before jitter / for evaluation
    eval_mode: str | None = None  # seg: whole | slide
    slide_stride: int | None = None  # seg: sliding-window stride (default: 2/3 of the crop)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    num_workers: int = 8
    # precision / memory
    amp: str = "none"  # none | bf16 | fp16
    grad_checkpointing: bool = False
    # bookkeeping
    seed: int = 0
    eval_every_epochs: int = 1
    ckpt_every_steps: int = 0  # 0: only at the end of each epoch
    ckpt_every_minutes: float = 10.0  # also a checkpoint this long after the last one (0: off); SIGINT saves one too
    log_every_steps: int = 20
    deterministic: bool = False

    _dict_what = "recipe key"

    def _check(self, where: str = "") -> None:
        self.validate(where or "recipe")

    def validate(self, where: str = "recipe") -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{where}: {msg}")

        wrong = field_type_problems(self)
        if wrong:  # checked first: the range checks below compare numbers
            raise ConfigError(f"{where}: wrong value type for " + "; ".join(wrong) + "; --set KEY=VALUE reads VALUE as JSON "
                              "(epochs=3, lr=0.001, auto_augment=null; other text stays a string)")

        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.accum_steps >= 1, f"accum_steps must be >= 1, got {self.accum_steps}")
        need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        need(self.iterations is None or self.iterations >= 1, f"iterations must be >= 1 or null, got {self.iterations}")
        need(self.warmup_iters is None or self.warmup_iters >= 0, f"warmup_iters must be >= 0, got {self.warmup_iters}")
        need(self.schedule in ("cosine", "step", "poly"),
             f"schedule must be 'cosine', 'step' or 'poly', got {self.schedule!r}")
        need(all(s > 0 for s in self.lr_steps), f"lr_steps are epochs > 0, got {self.lr_steps}")
        need(0 < self.lr_step_factor <= 1, f"lr_step_factor must be in (0, 1], got {self.lr_step_factor}")
        need(self.eval_mode in (None, "whole", "slide"), f"eval_mode must be 'whole', 'slide' or null, got {self.eval_mode!r}")
        need(0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}")
        need(self.amp in ("none", "bf16", "fp16"), f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        need(self.img_size >= 8, f"img_size must be >= 8, got {self.img_size}")
        need(0 <= self.smoothing < 1, f"smoothing must be in [0, 1), got {self.smoothing}")
        need(self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.blr > 0, f"blr must be positive, got {self.blr}")
        need(self.new_param_lr_scale is None or self.new_param_lr_scale > 0,
             f"new_param_lr_scale must be positive or null, got {self.new_param_lr_scale}")
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(self.ckpt_every_minutes >= 0, f"ckpt_every_minutes must be >= 0 (0: off), got {self.ckpt_every_minutes}")
        for k in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, k)
            need(v is None or v >= 1, f"{k} must be >= 1, got {v}")

    def absolute_lr(self, world_size: int) -> float:
        if self.lr is not None:
            return float(self.lr)
        return self.blr * self.global_batch(world_size) / 256

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.accum_steps * world_size


def list_recipes() -> list[str]:
    d = resources.files("hpvit") / "recipes"
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".json"))


def load_recipe(name_or_path: "str | os.PathLike") -> Recipe:
    """A packaged recipe by name (``imagenet-paper``, ``coco-maskrcnn-1x``...) or a JSON file path."""
    where, d = name_or_json(name_or_path, list_recipes(), "recipe")
    if d is None:
        f = resources.files("hpvit") / "recipes" / f"{where}.json"
        d, where = json.loads(f.read_text()), f"recipe {where!r}"
    return Recipe.from_dict(d, where)
