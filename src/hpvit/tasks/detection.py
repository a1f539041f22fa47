"""Object detection and instance segmentation as an engine task: torchvision's Mask R-CNN on a transformed
backbone (``paper-det``) or on the paper's plain baseline (``plain-det``), COCO-format data, COCO AP
(:mod:`hpvit.evaluation.detection`). The model is :mod:`hpvit.models.detector`; the command line is
:mod:`hpvit.cli.det`. See docs/dense.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints.native import is_hpvit_file
from ..data.coco import CocoInstances, CocoSource, collate_detection, parse_range
from ..engine.logging import log
from ..engine.recipe import Recipe
from ..engine.task import Task
from ..errors import ConfigError
from ..evaluation.detection import METRIC_UNITS, DetectionEvaluator, draw_predictions
from ..export import dense_backbone_meta, load, save_dense
from ..models.detector import MaskRCNNModel, build_detector

MODEL_FILE = "model.safetensors"


def coco_dataset(source: CocoSource, indices, train: bool, recipe: Recipe, lsj: bool = False) -> CocoInstances:
    """The recipe's resizing: the shorter side drawn from ``train_short_sides`` (test: ``test_short_side``) with
    the longer side capped at ``max_long_side`` when the recipe sets them (the paper's 1x protocol), else the
    longer side ``img_size`` with 0.75..1.25 jitter (or ``lsj``)."""
    r = recipe
    short = (r.train_short_sides if train else ((r.test_short_side,) if r.test_short_side else None))
    return CocoInstances(source, indices, train, r.img_size, lsj=lsj, short_sides=short, max_long_side=r.max_long_side)


def detector_meta(model: MaskRCNNModel, config_name: str, source: CocoSource, img_size: int) -> dict[str, Any]:
    """The description stored in a detector file (what :func:`hpvit.export.load` rebuilds it from)."""
    return {"task": "det", "config_name": config_name, **dense_backbone_meta(model.body),
            "num_classes": model.num_classes, "cat_ids": source.cat_ids, "cat_names": source.cat_names,
            "img_size": img_size, "fpn_channels": model.detector.backbone.out_channels, "rcnn": model.rcnn}


def resolve_init(init):
    """A plain checkpoint as given, or the model in an hpvit file (e.g. ``hpvit adapt``'s output)."""
    return load(init) if isinstance(init, (str, Path)) and is_hpvit_file(init) else init


class DetectionTask(Task):
    """Mask R-CNN fine-tuning. ``train_range`` / ``val_range``: ``START:STOP`` slices of the image lists;
    evaluation on ``val_ann`` (or a slice of ``ann``) when given."""

    name = "det"
    primary_metric = "bbox_AP"
    summary_metrics = ("bbox_AP", "bbox_AP50", "segm_AP", "bbox_AR100")
    metric_units = METRIC_UNITS

    def __init__(self, init: str, recipe: Recipe, *, config: str, ann: str, images: str, out: "str | Path",
                 train_range: "str | None" = None, val_ann: "str | None" = None, val_images: "str | None" = None,
                 val_range: "str | None" = None, lsj: bool = False, fmt: "str | None" = None, vis_images: int = 4,
                 rcnn: "dict[str, Any] | None" = None):
        self.init, self.config, self.recipe, self.out, self.fmt = init, config, recipe, Path(out), fmt
        self.rcnn = {**(recipe.rcnn or {}), **(rcnn or {})}  # the recipe's RCNN settings, --rcnn keys win
        self.lsj, self.vis_images = lsj, vis_images
        self.source = CocoSource(ann, images)
        self.train_idx = parse_range(train_range, len(self.source.images), "--train-images")
        self.val_range = val_range
        if val_ann is not None:
            self.val_source = CocoSource(val_ann, val_images or images)
            self.val_idx = parse_range(val_range, len(self.val_source.images), "--eval-images")
        elif val_range is not None:
            self.val_source = self.source
            self.val_idx = parse_range(val_range, len(self.source.images), "--eval-images")
            overlap = set(self.val_idx) & set(self.train_idx)
            if overlap:
                raise ConfigError(f"--train-images and --eval-images overlap in {len(overlap)} image(s); choose disjoint "
                                  "ranges (e.g. --train-images 0:100 --eval-images 100:128)")
        else:
            self.val_source, self.val_idx = None, []
        if self.val_source is not None and self.val_source.cat_ids != self.source.cat_ids:
            raise ConfigError("the validation json's categories differ from the training json's; use the same category list")

    @property
    def eval_split(self) -> str:
        """Which images are scored: the validation json and the slice of it."""
        if self.val_source is None:
            return "none"
        return f"{Path(self.val_source.ann_file).name}" + (f" images {self.val_range}" if self.val_range else "")

    def datasets(self):
        train = coco_dataset(self.source, self.train_idx, True, self.recipe, self.lsj)
        ev = coco_dataset(self.val_source, self.val_idx, False, self.recipe) if self.val_source is not None else None
        log("train: " + self.source.summary(self.train_idx))
        if ev is not None:
            log("eval: " + self.val_source.summary(self.val_idx))
        return train, ev

    def build_model(self) -> nn.Module:
        r = self.recipe
        return build_detector(resolve_init(self.init), self.config, len(self.source.cat_ids), r.img_size, r.drop_path,
                              self.fmt, rcnn=self.rcnn)

    def collate_fn(self, train):
        return collate_detection

    def prepare_batch(self, batch, device, train):
        return prepare_detection(batch, device)

    def loss(self, model, batch):
        images, targets = batch
        losses = model(images, [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets])
        self.last_losses = {k: float(v.detach()) for k, v in losses.items()}
        return sum(v.float() for v in losses.values())

    def evaluator(self) -> DetectionEvaluator:
        return DetectionEvaluator(self.val_source, self.val_idx, self.out)

    def results(self, model):
        res = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
               "backbone": model.body.kind, "num_classes": model.num_classes}
        if self.val_source is not None:
            ds = coco_dataset(self.val_source, self.val_idx[: self.vis_images], False, self.recipe)
            res["predictions_png"] = str(visualize(model, ds, self.val_source.cat_names, self.out / "predictions.png"))
            res["predictions_json"] = str(self.out / "predictions.json")
        return res

    def describe(self):
        return {"init": str(self.init), "config": self.config, "ann": str(self.source.ann_file),
                "images": str(self.source.images_dir), "train_images": len(self.train_idx),
                "val_ann": str(self.val_source.ann_file) if self.val_source else None, "val_images": len(self.val_idx),
                "lsj": self.lsj, "categories": len(self.source.cat_ids), "rcnn": self.rcnn}

    def save_model(self, model, out_dir, ema=None):
        meta = detector_meta(model, self.config, self.source, self.recipe.img_size)
        paths = [save_dense(model, out_dir / MODEL_FILE, meta)]
        if ema is not None:
            paths.append(save_dense(ema, out_dir / "model_ema.safetensors", meta))
        return paths


def prepare_detection(batch, device):
    """A collated ``(images, targets)`` batch moved to ``device``."""
    images, targets = batch
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]
    return images, targets


@torch.no_grad()
def visualize(model: MaskRCNNModel, ds: CocoInstances, names: list[str], path: Path) -> Path:
    """``predictions.png``: ground truth beside predictions for every image of ``ds``."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    items = [ds[i] for i in range(len(ds))]
    images = [im for im, _ in items]
    outputs = model([im.to(dev) for im in images])
    model.train(was)
    titles = [str(ds.image_info(i)["file_name"]) for i in range(len(ds))]
    path.parent.mkdir(parents=True, exist_ok=True)
    return draw_predictions(images, outputs, names, path, targets=[t for _, t in items], titles=titles)
