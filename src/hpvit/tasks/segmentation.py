"""Semantic segmentation: UperNet on a transformed backbone (``paper-seg``) or on the paper's plain
baseline (``plain-seg``: transposed-conv pyramid from blocks 4/6/8/12), trained with the shared engine.

``hpvit train seg --init SRC --config paper-seg|plain-seg --data ROOT --layout camvid --out DIR``
``hpvit eval seg --model DIR --data ROOT [--mode whole|slide] [--out EVAL_DIR]``

Metrics (scored at the labels' full resolution, ignored pixels excluded): ``mIoU``, ``mAcc``, ``aAcc``
(pixel accuracy) and per class ``IoU.<name>`` / ``Acc.<name>``, in percent. Classes absent from both
labels and predictions are left out of the means (mmseg's convention). The output directory gets
``results.json`` and ``predictions.png`` (image | ground truth | prediction in the dataset palette).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.segmentation import IGNORE, SegDataset, collate_seg, colorize, get_layout
from ..engine.recipe import Recipe
from ..engine.task import Task
from ..errors import ConfigError
from ..models.dense_io import dense_meta_reuse
from ..models.segmenter import UperNetSegmenter, build_segmenter, load_segmenter  # noqa: F401 (re-exported)
from ._args import add_seg_eval_args, add_seg_train_args, subset_indices
from ._cli import eval_out_dir, run_training
from .detection import build_dense_recipe

TASK = "seg"
MODEL_FILE = "model.safetensors"

SEG_DEFAULTS = dict(name="seg-default", epochs=20, warmup_epochs=1.0, batch_size=4, lr=2e-4, min_lr=1e-6,
                    weight_decay=0.05, layer_decay=0.65, drop_path=0.1, smoothing=0.0, mixup=0.0, cutmix=0.0,
                    auto_augment=None, reprob=0.0, img_size=512, num_workers=2, log_every_steps=10)


# -------------------------------------------------------------------- model (in hpvit.models.segmenter)
# -------------------------------------------------------------------- inference and metrics
@torch.no_grad()
def predict_logits(model: nn.Module, img: torch.Tensor, out_size: tuple[int, int], mode: str = "whole",
                   crop: int = 512, stride: int | None = None) -> torch.Tensor:
    """Logits ``(K, *out_size)`` for one image ``(3, h, w)``.

    ``whole``: one forward pass over the whole image. ``slide``: ``crop x crop`` windows every ``stride``
    pixels (default 2/3 of the crop; the last window is aligned to the border), logits averaged where
    windows overlap; images smaller than the crop are run whole. Either way the logits are then
    resized bilinearly to ``out_size`` (the label's resolution).
    """
    x = img[None]
    h, w = x.shape[-2:]
    if mode == "whole" or (h <= crop and w <= crop):
        logits = model(x)
    elif mode == "slide":
        stride = stride or max(1, crop * 2 // 3)
        k = model.num_classes
        logits = x.new_zeros(1, k, h, w)
        count = x.new_zeros(1, 1, h, w)
        ys = list(range(0, max(h - crop, 0) + 1, stride))
        xs = list(range(0, max(w - crop, 0) + 1, stride))
        if ys[-1] + crop < h:
            ys.append(h - crop)
        if xs[-1] + crop < w:
            xs.append(w - crop)
        for y0 in ys:
            for x0 in xs:
                y1, x1 = min(y0 + crop, h), min(x0 + crop, w)
                logits[..., y0:y1, x0:x1] += model(x[..., y0:y1, x0:x1])
                count[..., y0:y1, x0:x1] += 1
        logits = logits / count
    else:
        raise ConfigError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    return logits[0]


def confusion_sums(pred: torch.Tensor, label: torch.Tensor, k: int) -> dict[str, float]:
    """Per-class intersection, prediction and label areas over the non-ignored pixels (summable)."""
    valid = label != IGNORE
    cm = torch.bincount(label[valid] * k + pred[valid], minlength=k * k).view(k, k).double()
    inter, area_gt, area_pred = cm.diag(), cm.sum(1), cm.sum(0)
    out = {"pixels": float(valid.sum())}
    for c in range(k):
        out[f"inter_{c:03d}"] = float(inter[c])
        out[f"gt_{c:03d}"] = float(area_gt[c])
        out[f"pred_{c:03d}"] = float(area_pred[c])
    return out


def seg_metrics(sums: dict[str, float], classes: tuple[str, ...] | list[str]) -> dict[str, float]:
    k = len(classes)
    inter = np.array([sums.get(f"inter_{c:03d}", 0.0) for c in range(k)])
    gt = np.array([sums.get(f"gt_{c:03d}", 0.0) for c in range(k)])
    pred = np.array([sums.get(f"pred_{c:03d}", 0.0) for c in range(k)])
    union = gt + pred - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(gt > 0, inter / gt, np.nan)
    out = {
        "mIoU": float(100 * np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        "mAcc": float(100 * np.nanmean(acc)) if np.isfinite(acc).any() else 0.0,
        "aAcc": float(100 * inter.sum() / max(gt.sum(), 1.0)),
        "eval_images": int(sums.get("images", 0)),
        "eval_loss": sums.get("loss_sum", 0.0) / max(sums.get("pixels", 0.0), 1.0),
    }
    for c, name in enumerate(classes):
        out[f"IoU.{name}"] = float(100 * iou[c]) if math.isfinite(iou[c]) else float("nan")
        out[f"Acc.{name}"] = float(100 * acc[c]) if math.isfinite(acc[c]) else float("nan")
    return out


def draw_segmentation(rows: "list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]", palette, path: Path,
                      classes: "Sequence[str] | None" = None, names: "Sequence[str] | None" = None,
                      title: str = "") -> Path:
    """One row per image: image | ground truth | prediction, each titled, in the dataset palette (ignored
    pixels black), with a legend of the classes that appear. ``names``: a title for each image (file names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from ..checkpoints.io import atomic_write

    n = len(rows)
    fig, axes = plt.subplots(n, 3, figsize=(12, 3.4 * n + 0.9), squeeze=False)
    present: set[int] = set()
    for r, (img, lab, pred) in enumerate(rows):
        h, w = lab.shape
        im = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
        im = (im.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        lab_np, pred_np = lab.numpy(), pred.numpy()
        valid = lab_np != IGNORE
        acc = 100.0 * float((pred_np[valid] == lab_np[valid]).mean()) if valid.any() else float("nan")
        present |= set(np.unique(lab_np[valid]).tolist()) | set(np.unique(pred_np).tolist())
        name = names[r] if names else f"image {r + 1}"
        panels = ((im, f"{name} ({w}x{h})"), (colorize(lab_np, palette), "ground truth (black: not labelled)"),
                  (colorize(pred_np, palette), f"prediction ({acc:.1f}% of labelled pixels right)"))
        for ax, (pic, t) in zip(axes[r], panels):
            ax.imshow(pic, interpolation="nearest")
            ax.set_title(t, fontsize=9)
            ax.axis("off")
    if classes is not None:
        handles = [Patch(color=np.asarray(palette[c]) / 255.0, label=classes[c]) for c in sorted(present)
                   if 0 <= c < len(classes)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8) or 1, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if classes is not None else 0, 1, 0.97 if title else 1))
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=80, format="png"), force=True)
    finally:
        plt.close(fig)
    return Path(path)


def spread_indices(total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(total)`` (distinct images rather than consecutive frames)."""
    n = min(n, total)
    if n <= 0:
        return []
    if n == 1:
        return [0]
    return sorted({round(i * (total - 1) / (n - 1)) for i in range(n)})


# -------------------------------------------------------------------- task
def seg_subset(spec: "str | int | None", flag: str, *args: Any, **kwargs: Any) -> SegDataset:
    """``SegDataset(*args, **kwargs)`` restricted to the subset ``spec`` (``N`` first images or ``START:STOP``)."""
    full = SegDataset(*args, **kwargs)
    idx = subset_indices(None if spec is None else str(spec), len(full), flag)
    return full if idx is None else SegDataset(*args, indices=idx, **kwargs)


METRIC_UNITS = {"mIoU": "% (mean over classes present)", "mAcc": "% (mean over classes present)",
                "aAcc": "% of labelled pixels", "IoU.<class>": "%", "Acc.<class>": "%", "eval_images": "images",
                "eval_loss": "cross-entropy per labelled pixel (nats)"}


class SegmentationTask(Task):
    name = "seg"
    primary_metric = "mIoU"
    summary_metrics = ("mIoU", "mAcc", "aAcc")
    metric_units = METRIC_UNITS

    @property
    def eval_split(self) -> str:
        return str(getattr(self, "val_split", None) or "none")

    def __init__(self, init: str, config: str, data: str, layout: str, recipe: Recipe, out: "str | Path",
                 train_split: str = "train", val_split: str | None = "val", base_size: int | None = None,
                 mode: str = "whole", head_channels: int = 128, fmt: str | None = None,
                 train_images: "str | int | None" = None, eval_images: "str | int | None" = None, vis_images: int = 3,
                 ignore_value: int | None = None):
        self.init, self.config, self.data, self.layout_name = init, config, data, layout
        self.layout = get_layout(layout)
        self.recipe, self.out, self.fmt = recipe, Path(out), fmt
        self.train_split, self.val_split, self.base_size, self.mode = train_split, val_split, base_size, mode
        self.head_channels, self.vis_images = head_channels, vis_images
        self.train_images, self.eval_images = train_images, eval_images
        r = recipe
        self.ignore_value = ignore_value
        self.train_ds = seg_subset(train_images, "--train-images", data, layout, train_split, True, r.img_size,
                                   base_size, ignore_value=ignore_value)
        self.val_ds = None
        if val_split:
            self.val_ds = seg_subset(eval_images, "--eval-images", data, layout, val_split, False, r.img_size,
                                     base_size, ignore_value=ignore_value)

    @property
    def classes(self):
        return self.layout.classes

    def datasets(self):
        return self.train_ds, self.val_ds

    def build_model(self):
        r = self.recipe
        return build_segmenter(self.init, self.config, len(self.classes), r.img_size, r.drop_path, self.fmt,
                               self.head_channels)

    def collate_fn(self, train):
        return collate_seg

    def prepare_batch(self, batch, device, train):
        imgs, labs = batch
        if isinstance(imgs, torch.Tensor):
            return imgs.to(device, non_blocking=True), labs.to(device, non_blocking=True)
        return [i.to(device) for i in imgs], [l.to(device) for l in labs]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x).float(), y, ignore_index=IGNORE)

    def eval_batch(self, model, batch):
        imgs, labs = batch
        if isinstance(imgs, torch.Tensor):
            imgs, labs = list(imgs), list(labs)
        k = len(self.classes)
        sums: dict[str, float] = {"images": float(len(imgs)), "loss_sum": 0.0}
        for img, lab in zip(imgs, labs):
            logits = predict_logits(model, img, tuple(lab.shape), self.mode, self.recipe.img_size)
            pred = logits.argmax(0)
            s = confusion_sums(pred, lab, k)
            valid = lab != IGNORE
            if valid.any():
                sums["loss_sum"] += float(F.cross_entropy(logits[None], lab[None], ignore_index=IGNORE, reduction="sum"))
            for key, v in s.items():
                sums[key] = sums.get(key, 0.0) + v
        return sums

    def eval_finalize(self, sums):
        return seg_metrics(sums, self.classes)

    def results(self, model):
        res = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3), "backbone": model.body.kind,
               "inference": self.mode, "classes": list(self.classes)}
        if self.val_ds is not None:
            res["predictions_png"] = str(visualize(model, self.val_ds, self.vis_images, self.mode, self.recipe.img_size,
                                                   self.layout.palette, self.out / "predictions.png"))
        return res

    def describe(self):
        return {"init": str(self.init), "config": self.config, "data": str(self.data), "layout": self.layout_name,
                "train_split": self.train_split, "val_split": self.val_split, "base_size": self.base_size,
                "inference": self.mode, "head_channels": self.head_channels, "train_images": len(self.train_ds),
                "val_images": len(self.val_ds) if self.val_ds is not None else 0}

    def meta(self, model):
        body = model.body
        return {"task": "seg", "backbone": body.kind, "config_name": self.config, "config": body.vit.config.to_dict(),
                "spec": body.vit.spec.to_dict(), "out_indices": list(getattr(body, "out_indices", []) or []),
                "num_classes": model.num_classes, "classes": list(self.classes), "layout": self.layout_name,
                "crop": self.recipe.img_size, "base_size": self.base_size, "head_channels": self.head_channels,
                "ignore_value": self.ignore_value, **dense_meta_reuse(body)}

    def save_model(self, model, out_dir, ema=None):
        from ..models.dense_io import save_dense

        paths = [save_dense(model, out_dir / MODEL_FILE, self.meta(model))]
        if ema is not None:
            paths.append(save_dense(ema, out_dir / "model_ema.safetensors", self.meta(ema)))
        return paths


@torch.no_grad()
def visualize(model, ds: SegDataset, n: int, mode: str, crop: int, palette, path: Path) -> Path:
    """``predictions.png`` for ``n`` images spread over ``ds`` (see :func:`draw_segmentation`)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    rows, names = [], []
    for i in spread_indices(len(ds), n):
        img, lab = ds[i]
        pred = predict_logits(model, img.to(dev), tuple(lab.shape), mode, crop).argmax(0).cpu()
        rows.append((img, lab, pred))
        names.append(Path(ds.pairs[i][0]).name)
    model.train(was)
    path.parent.mkdir(parents=True, exist_ok=True)
    title = f"{ds.split} split: {len(rows)} of {len(ds)} images, {mode} inference"
    return draw_segmentation(rows, palette, path, ds.classes, names, title)


# -------------------------------------------------------------------- command line
add_train_args = add_seg_train_args
add_eval_args = add_seg_eval_args


def run_train(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = build_dense_recipe(args, SEG_DEFAULTS)
    task = SegmentationTask(args.init, args.config, args.data, args.layout, recipe, args.out, args.train_split,
                            args.val_split or None, args.base_size, args.mode, args.head_channels, args.format,
                            args.train_images, args.eval_images, ignore_value=args.ignore_value)
    return run_training(task, recipe, args)


def run_eval(args) -> int:
    from ..engine import distributed as D
    from ..engine.loop import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_segmenter(args.model)
    out = eval_out_dir(args.model, args.out)
    out.mkdir(parents=True, exist_ok=True)
    layout = get_layout(args.layout)
    if list(layout.classes) != list(meta["classes"]):
        raise ConfigError(f"the model was trained on the {meta['layout']} classes; --layout {args.layout} has different "
                          "classes")
    base = args.base_size if args.base_size is not None else meta["base_size"]
    crop = args.crop or meta["crop"]
    ignore = args.ignore_value if args.ignore_value is not None else meta.get("ignore_value")
    ds = seg_subset(args.eval_images, "--eval-images", args.data, args.layout, args.split, False, crop, base,
                    ignore_value=ignore)
    task = SegmentationTask.__new__(SegmentationTask)
    task.layout, task.mode, task.recipe = layout, args.mode, Recipe().replace(img_size=crop)
    task.val_split = args.split
    dist = D.init_distributed(args.device)
    try:
        model.to(dist.device)
        t = time.time()
        m = evaluate(task.evaluator(), model, ds, 1, 0, dist, desc=f"evaluating {args.split}", collate_fn=collate_seg,
                     prepare=lambda b, dev: task.prepare_batch(b, dev, train=False))
        if dist.is_main:
            png = visualize(model, ds, args.vis_images, args.mode, crop, layout.palette, out / "predictions.png")
            m.update({"model": str(args.model), "data": str(args.data), "split": args.split, "inference": args.mode,
                      "metric_units": METRIC_UNITS,
                      "base_size": base, "crop": crop, "eval_time_s": round(time.time() - t, 2),
                      "predictions_png": str(png)})
            (out / "results.json").write_text(json.dumps(m, indent=2))
            print(json.dumps({k: v for k, v in m.items() if not k.startswith(("IoU.", "Acc."))}, indent=2))
    finally:
        D.cleanup(dist)
    return 0
