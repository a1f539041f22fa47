"""Training recipes: every hyperparameter of a run in one flat, JSON-serialisable dataclass.

A recipe is a JSON file (``hpvit/recipes/<name>.json`` ships with the package, or any path). Unknown
keys are rejected with a :class:`~hpvit.errors.ConfigError` naming the valid ones, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources

from ..errors import ConfigError
from ..utils import DictIO, field_type_problems, name_or_json

# what timm's create_transform reads (timm.data.transforms / auto_augment); anything else is refused here, where
# timm would either fail deep inside a DataLoader worker or (auto_augment) silently fall back to its default
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random")
AUTO_AUGMENT_POLICIES = ("original", "originalr", "v0", "v0r", "3a")
_AUTO_AUGMENT_SECTIONS = {"rand": re.compile(r"^(mstd|mmax|inc|m|n|p)\d[\d.]*$|^t.+$"),
                          "augmix": re.compile(r"^(mstd|m|w|d|a|b)\d[\d.]*$")}
_AUTO_AUGMENT_FORMS = ("rand-m9-mstd0.5-inc1 (RandAugment: sections m<magnitude>, n<ops>, mstd<std>, mmax<max>, "
                       "inc<0|1>, p<prob>), augmix-m5-w3 (AugMix: m, w, d, a, b, mstd), "
                       + ", ".join(AUTO_AUGMENT_POLICIES) + " (AutoAugment policies) or null (none)")


def auto_augment_problem(value: "str | None") -> "str | None":
    """Why ``value`` is not an auto-augment policy timm reads, or None (``"rand-bogus"`` would silently run
    timm's default RandAugment: every ``-`` section must be one timm knows)."""
    if value is None:
        return None
    head, *sections = value.split("-")
    if head in AUTO_AUGMENT_POLICIES:
        bad = [s for s in sections if not re.fullmatch(r"mstd\d[\d.]*", s)]
    elif head in _AUTO_AUGMENT_SECTIONS:
        bad = [s for s in sections if not _AUTO_AUGMENT_SECTIONS[head].match(s)]
    else:
        return f"auto_augment {value!r}: unknown policy {head!r}; use {_AUTO_AUGMENT_FORMS}"
    if bad:
        return f"auto_augment {value!r}: unknown section(s) {bad}; use {_AUTO_AUGMENT_FORMS}"
    return None


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
    # det: Mask R-CNN settings (torchvision MaskRCNN arguments and hpvit's fpn_channels, box_head_dim,
    # mask_head_dim); ``--rcnn KEY=VALUE`` overrides single keys
    rcnn: dict | None = None
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
        need(self.min_lr >= 0, f"min_lr must be >= 0 (the lr the schedule ends at), got {self.min_lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0 (a negative decay pushes weights away from zero), "
                                     f"got {self.weight_decay}")
        need(self.clip_grad is None or self.clip_grad > 0,
             f"clip_grad must be a positive gradient norm or null (no clipping), got {self.clip_grad} (a negative "
             "value would flip the gradient's sign and train backwards)")
        need(all(0 <= b < 1 for b in self.betas), f"betas must both be in [0, 1) (AdamW's moment decays), got "
                                                    f"{list(self.betas)}; the usual value is [0.9, 0.999]")
        need(all(s > 0 for s in self.std), f"std must be three positive numbers (pixels are divided by it), got "
                                           f"{list(self.std)}; ImageNet's is [0.229, 0.224, 0.225]")
        need(self.interpolation in INTERPOLATIONS,
             f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        problem = auto_augment_problem(self.auto_augment)
        need(problem is None, str(problem))
        need(0 <= self.drop_path < 1, f"drop_path must be in [0, 1), got {self.drop_path}")
        for k in ("mixup", "cutmix"):
            need(getattr(self, k) >= 0, f"{k} must be >= 0 (a Beta distribution's alpha; 0 = off), got {getattr(self, k)}")
        for k in ("mixup_prob", "mixup_switch_prob", "reprob"):
            need(0 <= getattr(self, k) <= 1, f"{k} must be a probability in [0, 1], got {getattr(self, k)}")
        need(0 < self.crop_pct <= 1, f"crop_pct must be in (0, 1], got {self.crop_pct}")
        need(0 < self.scale[0] <= self.scale[1] <= 1, f"scale must be [min, max] with 0 < min <= max <= 1, got "
                                                     f"{list(self.scale)}")
        need(self.blr > 0, f"blr must be positive, got {self.blr}")
        need(self.new_param_lr_scale is None or self.new_param_lr_scale > 0,
             f"new_param_lr_scale must be positive or null, got {self.new_param_lr_scale}")
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(self.rcnn is None or isinstance(self.rcnn, dict),
             f"rcnn must be an object of Mask R-CNN settings or null, got {self.rcnn!r}")
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
