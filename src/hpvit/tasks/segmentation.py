"""Semantic segmentation as an engine task: UperNet on a transformed backbone (``paper-seg``) or on the
paper's plain baseline (``plain-seg``: transposed-conv pyramid from blocks 4/6/8/12), scored by
:mod:`hpvit.evaluation.segmentation`. The model is :mod:`hpvit.models.segmenter`; the command line is
:mod:`hpvit.cli.seg`. See docs/dense.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.segmentation import IGNORE, SegDataset, collate_seg, get_layout
from ..data.subset import subset_indices
from ..engine.recipe import Recipe
from ..engine.task import Task
from ..evaluation.segmentation import METRIC_UNITS, SegmentationEvaluator, draw_segmentation, predict_logits, spread_indices
from ..export import dense_backbone_meta, save_dense
from ..models.segmenter import build_segmenter
from .detection import resolve_init

MODEL_FILE = "model.safetensors"


@dataclass
class SegData:
    """Where the images come from and how they are read: dataset ``root`` in ``layout``, the splits, the
    image subsets (``N`` or ``START:STOP``), the size images are resized to before jitter / evaluation
    (``base_size``, longer side; None: the recipe's, else the original) and the raw ignore value."""

    root: str
    layout: str = "camvid"
    train_split: str = "train"
    val_split: "str | None" = "val"
    train_images: "str | int | None" = None
    eval_images: "str | int | None" = None
    base_size: "int | None" = None
    ignore_value: "int | None" = None


def seg_subset(spec: "str | int | None", flag: str, *args: Any, **kwargs: Any) -> SegDataset:
    """``SegDataset(*args, **kwargs)`` restricted to the subset ``spec`` (``N`` first images or ``START:STOP``)."""
    full = SegDataset(*args, **kwargs)
    idx = subset_indices(None if spec is None else str(spec), len(full), flag)
    return full if idx is None else SegDataset(*args, indices=idx, **kwargs)


class SegmentationTask(Task):
    """UperNet fine-tuning on ``data`` (:class:`SegData`). Inference for evaluation: ``mode`` (``whole`` /
    ``slide``; None: the recipe's ``eval_mode``, else whole)."""

    name = "seg"
    primary_metric = "mIoU"
    summary_metrics = ("mIoU", "mAcc", "aAcc")
    metric_units = METRIC_UNITS

    def __init__(self, init: str, recipe: Recipe, data: SegData, *, config: str, out: "str | Path",
                 mode: "str | None" = None, head_channels: int = 128, fmt: "str | None" = None, vis_images: int = 3):
        self.init, self.config, self.data, self.recipe = init, config, data, recipe
        self.layout = get_layout(data.layout)
        self.out, self.fmt = Path(out), fmt
        self.mode = mode or recipe.eval_mode or "whole"
        self.base_size = data.base_size if data.base_size is not None else recipe.base_size
        self.head_channels, self.vis_images = head_channels, vis_images
        r = recipe
        scale = tuple(r.ratio_range) if r.ratio_range else (0.5, 2.0)
        self.train_ds = seg_subset(data.train_images, "--train-images", data.root, data.layout, data.train_split, True,
                                   r.img_size, self.base_size, scale_range=scale, ignore_value=data.ignore_value)
        self.val_ds = None
        if data.val_split:
            self.val_ds = seg_subset(data.eval_images, "--eval-images", data.root, data.layout, data.val_split, False,
                                     r.img_size, self.base_size, ignore_value=data.ignore_value)

    @property
    def eval_split(self) -> str:
        return str(self.data.val_split or "none")

    @property
    def classes(self):
        return self.layout.classes

    def datasets(self):
        return self.train_ds, self.val_ds

    def build_model(self):
        r = self.recipe
        return build_segmenter(resolve_init(self.init), self.config, len(self.classes), r.img_size, r.drop_path,
                               self.fmt, self.head_channels)

    def collate_fn(self, train):
        return collate_seg

    def prepare_batch(self, batch, device, train):
        return prepare_segmentation(batch, device)

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x).float(), y, ignore_index=IGNORE)

    def evaluator(self) -> SegmentationEvaluator:
        return SegmentationEvaluator(self.classes, self.mode, self.recipe.img_size, self.recipe.slide_stride)

    def results(self, model):
        res = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3), "backbone": model.body.kind,
               "inference": self.mode, "classes": list(self.classes)}
        if self.val_ds is not None:
            res["predictions_png"] = str(visualize(model, self.val_ds, self.vis_images, self.mode, self.recipe.img_size,
                                                   self.layout.palette, self.out / "predictions.png",
                                                   self.recipe.slide_stride))
        return res

    def describe(self):
        d = self.data
        return {"init": str(self.init), "config": self.config, "data": str(d.root), "layout": d.layout,
                "train_split": d.train_split, "val_split": d.val_split, "base_size": self.base_size,
                "inference": self.mode, "head_channels": self.head_channels, "train_images": len(self.train_ds),
                "val_images": len(self.val_ds) if self.val_ds is not None else 0}

    def meta(self, model):
        return segmenter_meta(model, self.config, self.data.layout, self.recipe.img_size, self.base_size,
                              self.head_channels, self.data.ignore_value)

    def save_model(self, model, out_dir, ema=None):
        paths = [save_dense(model, out_dir / MODEL_FILE, self.meta(model))]
        if ema is not None:
            paths.append(save_dense(ema, out_dir / "model_ema.safetensors", self.meta(ema)))
        return paths


def segmenter_meta(model, config_name: str, layout: str, crop: int, base_size: "int | None", head_channels: int,
                   ignore_value: "int | None" = None) -> dict[str, Any]:
    """The description stored in a segmenter file (what :func:`hpvit.export.load` rebuilds it from)."""
    return {"task": "seg", "config_name": config_name, **dense_backbone_meta(model.body),
            "num_classes": model.num_classes, "classes": list(get_layout(layout).classes), "layout": layout,
            "crop": crop, "base_size": base_size, "head_channels": head_channels, "ignore_value": ignore_value}


def prepare_segmentation(batch, device):
    """A collated ``(images, labels)`` batch (stacked crops, or lists of whole images) moved to ``device``."""
    imgs, labs = batch
    if isinstance(imgs, torch.Tensor):
        return imgs.to(device, non_blocking=True), labs.to(device, non_blocking=True)
    return [i.to(device) for i in imgs], [lab.to(device) for lab in labs]


@torch.no_grad()
def visualize(model, ds: SegDataset, n: int, mode: str, crop: int, palette, path: Path,
              stride: "int | None" = None) -> Path:
    """``predictions.png`` for ``n`` images spread over ``ds`` (see :func:`draw_segmentation`)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    rows, names = [], []
    for i in spread_indices(len(ds), n):
        img, lab = ds[i]
        pred = predict_logits(model, img.to(dev), tuple(lab.shape), mode, crop, stride).argmax(0).cpu()
        rows.append((img, lab, pred))
        names.append(Path(ds.pairs[i][0]).name)
    model.train(was)
    path.parent.mkdir(parents=True, exist_ok=True)
    title = f"{ds.split} split: {len(rows)} of {len(ds)} images, {mode} inference"
    return draw_segmentation(rows, palette, path, ds.classes, names, title)
