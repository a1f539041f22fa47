"""Semantic-segmentation metrics, inference and drawings.

Metrics (scored at the labels' full resolution, ignored pixels excluded): ``mIoU``, ``mAcc``, ``aAcc`` (pixel
accuracy) and per class ``IoU.<name>`` / ``Acc.<name>``, in percent, from per-class intersection and area
sums (so ranks add up). Classes absent from both labels and predictions are left out of the means (mmseg's
convention). Inference: whole image, or sliding windows (:func:`predict_logits`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from torch import nn  # noqa: E402

from ..data.segmentation import IGNORE, colorize  # noqa: E402
from ..errors import ConfigError  # noqa: E402
from ..utils import atomic_write  # noqa: E402
from .base import SumEvaluator  # noqa: E402

METRIC_UNITS = {"mIoU": "% (mean over classes present)", "mAcc": "% (mean over classes present)",
                "aAcc": "% of labelled pixels", "IoU.<class>": "%", "Acc.<class>": "%", "eval_images": "images",
                "eval_loss": "cross-entropy per labelled pixel (nats)"}


class SegmentationEvaluator(SumEvaluator):
    """mIoU / mAcc / aAcc and per-class numbers of a segmenter over ``(images, labels)`` batches, with
    ``mode`` inference (``whole`` or ``slide`` with ``crop`` windows every ``stride`` pixels)."""

    def __init__(self, classes: Sequence[str], mode: str = "whole", crop: int = 512, stride: "int | None" = None):
        self.classes, self.mode, self.crop, self.stride = list(classes), mode, crop, stride
        super().__init__(self.batch_sums, lambda s: seg_metrics(s, self.classes))

    def batch_sums(self, model: nn.Module, batch: Any) -> dict[str, float]:
        imgs, labs = batch
        if isinstance(imgs, torch.Tensor):
            imgs, labs = list(imgs), list(labs)
        k = len(self.classes)
        sums: dict[str, float] = {"images": float(len(imgs)), "loss_sum": 0.0}
        for img, lab in zip(imgs, labs):
            logits = predict_logits(model, img, tuple(lab.shape), self.mode, self.crop, self.stride)
            for key, v in confusion_sums(logits.argmax(0), lab, k).items():
                sums[key] = sums.get(key, 0.0) + v
            if (lab != IGNORE).any():
                sums["loss_sum"] += float(F.cross_entropy(logits[None], lab[None], ignore_index=IGNORE, reduction="sum"))
        return sums


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
