"""Image classification: fine-tune a transformed model (or the plain baseline) and evaluate it.

``hpvit train cls --model SRC --config paper-cls --data PATH --out DIR [--recipe NAME|FILE] ...``
``hpvit eval cls --model DIR_OR_FILE --data PATH``

``--config identity`` trains the plain ViT itself (class-token head; ``--head avg`` for a global
average pooling head), so the paper's comparison is one flag apart. See docs/classification.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.native import is_hpvit_file
from ..data import ImageFolderDataset, ImageFolderSource, build_mixup, build_transform
from ..config import RECOMMENDED
from ..engine.recipe import Recipe
from ..engine.task import Task
from ..errors import ConfigError, DataError
from ..evaluation.classification import METRIC_UNITS, ClassificationEvaluator
from ..export import PREPROC_FILE, load, save
from ..models.build import from_plain, stored_config_conflict
from ..utils import count_flops, write_text_atomic

TASK = "cls"
MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
DEFAULT_CONFIG = RECOMMENDED["cls"]  # the config a plain checkpoint is transformed with when none is given


def gflops_per_image(model: nn.Module, img_size: int, in_chans: int = 3) -> float:
    """Forward GFLOPs of one image (2 FLOPs per multiply-accumulate)."""
    dev = next(model.parameters()).device
    return count_flops(model, torch.zeros(1, in_chans, img_size, img_size, device=dev)) / 1e9


class ClassificationTask(Task):
    name = "cls"
    primary_metric = "top1"
    batch_mixing = True
    summary_metrics = ("top1", "top5", "eval_loss")  # the per-epoch log line; metrics.jsonl has every metric
    metric_units = METRIC_UNITS

    def __init__(self, init: str, data: str, recipe: Recipe, *, config: "str | None" = DEFAULT_CONFIG,
                 num_classes: int | None = None, head: str | None = None, fmt: str | None = None):
        self.init, self.data, self.recipe = init, data, recipe
        self.config, self.num_classes_arg, self.head, self.fmt = config, num_classes, head, fmt
        self._source = None
        self.model_config: dict[str, Any] = {}

    # ---------------------------------------------------------------- data
    @property
    def source(self):
        if self._source is None:
            src = ImageFolderSource(self.data)
            src.samples("train")  # a clear error now if the train split is missing
            src.eval_split()
            if len(src.classes) < 2:  # one class: every prediction is right, and "top1 100%" means nothing
                raise DataError(f"{self.data}: the training split has only {len(src.classes)} class "
                                f"({', '.join(map(repr, src.classes))}); classification needs at least 2 classes, one "
                                "sub-folder of images per class (ROOT/train/<class>/*.jpg)", str(self.data))
            self._source = src
        return self._source

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def eval_split(self) -> str:
        """The split scored after each epoch (named in metrics.jsonl and results.json)."""
        return self.source.eval_split()

    def datasets(self):
        r, src = self.recipe, self.source
        train = ImageFolderDataset(src, "train", build_transform(r, True), r.max_train_samples, r.seed)
        ev = ImageFolderDataset(src, src.eval_split(), build_transform(r, False), r.max_eval_samples, r.seed)
        return train, ev

    # ---------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        n = len(self.classes)
        if self.num_classes_arg is not None and self.num_classes_arg != n:
            raise ConfigError(f"--num-classes {self.num_classes_arg} but {self.data} has {n} classes; drop --num-classes")
        r = self.recipe
        if is_hpvit_file(self.init):
            model = load(self.init)
            conflict = stored_config_conflict(self.init, self.config, model.config.name)
            if conflict:
                raise ConfigError(f"--config {self.config} does not apply: {conflict}; drop --config to go on training the {model.config.name} model, or "
                                  f"start from the plain checkpoint it came from to train {self.config}")
            model.set_drop_path_rate(r.drop_path)  # the recipe's, as for a model built from a plain checkpoint
            if model.num_classes != n:
                model.reset_classifier(n)
        else:
            overrides: dict[str, Any] = {"drop_path_rate": r.drop_path, "img_size": r.img_size}
            if self.head is not None:
                overrides["head"] = self.head
            model = from_plain(self.init, self.config or DEFAULT_CONFIG, num_classes=n, format=self.fmt, **overrides)
        if r.img_size < model.min_input_size:
            raise ConfigError(
                f"img_size {r.img_size} is below the minimum {model.min_input_size} of config {model.config.name!r}; "
                f"use --img-size {model.min_input_size} or more"
            )
        self.model_config = model.config.to_dict()
        self.mixup = build_mixup(r, n)
        if self.mixup is not None and r.batch_size % 2:
            raise ConfigError(f"mixup/cutmix need an even batch size, got {r.batch_size}")
        return model

    # ---------------------------------------------------------------- steps
    def prepare_batch(self, batch, device, train):
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if train and getattr(self, "mixup", None) is not None:
            x, y = self.mixup(x, y)
        return x, y

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)
        if y.ndim == 2:  # soft targets from mixup/cutmix (label smoothing included)
            return torch.sum(-y * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.float(), y, label_smoothing=self.recipe.smoothing)

    def evaluator(self) -> ClassificationEvaluator:
        return ClassificationEvaluator()

    # ---------------------------------------------------------------- reporting
    def results(self, model):
        return {
            "gflops_per_image": round(gflops_per_image(model, self.recipe.img_size), 4),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "num_classes": len(self.classes),
        }

    def describe(self):
        # the count of training images found: a resume after images were added (or removed) is refused, since the
        # sample order and the epoch length depend on it (engine/identity.py)
        return {"init": str(self.init), "data": str(self.data), "config": self.model_config,
                "classes": self.classes, "head": self.head,
                "train_images_in_data": len(self.source.samples("train"))}

    def save_model(self, model, out_dir, ema=None):
        paths = [Path(save(model, out_dir / MODEL_FILE))]
        if ema is not None:
            paths.append(Path(save(ema, out_dir / EMA_FILE)))
        r = self.recipe
        pre = {"img_size": r.img_size, "interpolation": r.interpolation, "crop_pct": r.crop_pct,
               "mean": list(r.mean), "std": list(r.std), "classes": self.classes}
        write_text_atomic(out_dir / PREPROC_FILE, json.dumps(pre, indent=2))
        return paths

