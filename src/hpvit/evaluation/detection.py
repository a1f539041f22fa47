"""Detection and instance-segmentation metrics and drawings: COCO box and mask AP through pycocotools
(``bbox_*`` / ``segm_*``: AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l, in percent), the predictions in
COCO results format, and ``predictions.png`` (ground truth beside predictions).

:class:`DetectionEvaluator` collects each rank's predictions and gathers them before scoring: COCO AP is
not a sum over batches.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import nn  # noqa: E402

from ..data.coco import CocoSource  # noqa: E402
from ..engine import distributed as D  # noqa: E402
from ..utils import atomic_write, write_text_atomic  # noqa: E402
from .base import Evaluator  # noqa: E402

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
AP_UNIT = "% (pycocotools' 0-1 value x 100; -1 where no ground truth of that size)"
METRIC_UNITS = {**{f"{t}_{n}": AP_UNIT for t in ("bbox", "segm") for n in STAT_NAMES},
                "eval_images": "images", "num_predictions": "detections"}


class DetectionEvaluator(Evaluator):
    """COCO box and mask AP of a detector over ``(images, targets)`` batches of the images ``indices`` of
    ``source``. :meth:`evaluate` gathers every rank's predictions, scores them against the ground truth of
    exactly those images, keeps them in ``self.predictions`` and, with ``out``, writes
    ``out/predictions.json`` (main process)."""

    def __init__(self, source: CocoSource, indices: Sequence[int], out: "str | Path | None" = None):
        self.source, self.indices = source, list(indices)
        self.out = None if out is None else Path(out)
        self._gt = None
        self.predictions: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self._preds: list[dict] = []
        self._images = 0

    def process(self, model: nn.Module, batch: Any) -> None:
        images, targets = batch
        self._preds.extend(predictions_to_coco(model(images), targets, self.source.cat_ids))
        self._images += len(images)

    def evaluate(self, dist: "D.DistInfo | None" = None) -> dict[str, Any]:
        dist = dist or D.DistInfo()
        preds = [p for part in D.all_gather_objects(self._preds, dist) for p in part]
        n_images = sum(D.all_gather_objects(self._images, dist))
        if self._gt is None:
            self._gt = self.source.coco_gt(self.indices)
        m: dict[str, Any] = coco_metrics(self._gt, preds)
        m["eval_images"] = int(n_images)
        m["num_predictions"] = len(preds)
        self.predictions = preds
        if self.out is not None and dist.is_main:
            write_text_atomic(self.out / "predictions.json", json.dumps(preds))
        return m


def predictions_to_coco(outputs: list[dict], targets: list[dict], cat_ids: list[int], mask_thresh: float = 0.5) -> list[dict]:
    """Model outputs (in resized-image pixels) -> COCO results entries in original-image pixels, with RLE masks."""
    from pycocotools import mask as mask_utils  # optional peer (hpvit[dense])

    res = []
    for out, t in zip(outputs, targets):
        sy, sx = t["scale"]
        h, w = t["orig_size"]
        boxes = out["boxes"].detach().float().cpu() / torch.tensor([sx, sy, sx, sy])
        scores = out["scores"].detach().float().cpu()
        labels = out["labels"].detach().cpu()
        masks = out.get("masks")
        if masks is not None and len(masks):
            masks = F.interpolate(masks.detach().float().cpu(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            masks = (masks > mask_thresh).numpy().astype(np.uint8)
        for k in range(len(scores)):
            x0, y0, x1, y1 = boxes[k].tolist()
            r = {"image_id": int(t["image_id"]), "category_id": int(cat_ids[int(labels[k]) - 1]),
                 "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                 "score": round(float(scores[k]), 5)}
            if masks is not None and len(masks):
                rle = mask_utils.encode(np.asfortranarray(masks[k]))
                rle["counts"] = rle["counts"].decode("ascii")
                r["segmentation"] = rle
            res.append(r)
    return res


def coco_metrics(gt, preds: list[dict]) -> dict[str, float]:
    """COCO summary (12 numbers each for ``bbox`` and ``segm``, in percent) of ``preds`` against ``gt``.
    With no predictions at all every number is 0 (pycocotools cannot load an empty result list)."""
    from pycocotools.cocoeval import COCOeval  # optional peer (hpvit[dense])

    out: dict[str, float] = {}
    for iou_type in ("bbox", "segm"):
        ps = [p for p in preds if iou_type == "bbox" or "segmentation" in p]
        if not ps:
            out.update({f"{iou_type}_{n}": 0.0 for n in STAT_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes([dict(p) for p in ps])
            ev = COCOeval(gt, dt, iou_type)
            ev.params.imgIds = sorted(gt.getImgIds())
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # pycocotools reports -1 where a size range has no ground truth: keep it as -1 (documented)
        out.update({f"{iou_type}_{n}": (100.0 * float(v) if v >= 0 else -1.0) for n, v in zip(STAT_NAMES, ev.stats)})
    return out


def _overlay(img: np.ndarray, masks: "torch.Tensor | None", colors: list[tuple[float, float, float]]) -> np.ndarray:
    """``img`` (h, w, 3) float in [0, 1] with each boolean mask ``(N, h, w)`` blended in its colour."""
    out = img.copy()
    if masks is not None:
        for m, c in zip(masks.numpy().astype(bool), colors):
            out[m] = 0.55 * out[m] + 0.45 * np.asarray(c)
    return out


def _draw_boxes(ax, boxes: torch.Tensor, texts: list[str], colors: list[tuple[float, float, float]]) -> None:
    for (x0, y0, x1, y1), t, c in zip(boxes.tolist(), texts, colors):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=1.6))
        ax.text(x0, y0, t, fontsize=7, color="white", va="bottom", bbox=dict(facecolor=c, alpha=0.8, pad=1, lw=0))


def draw_predictions(images: list[torch.Tensor], outputs: list[dict], names: list[str], path: Path,
                     score_thresh: float = 0.3, max_per_image: int = 20, targets: "list[dict] | None" = None,
                     titles: "list[str] | None" = None) -> Path:
    """One row per image: the ground truth (when ``targets`` are given) beside the predictions scoring >=
    ``score_thresh`` (at most ``max_per_image``), boxes and masks coloured by class with "class score" labels.
    An image with no detection above the threshold says so, with its best score."""
    cmap = plt.get_cmap("tab20")
    color = lambda label: cmap((int(label) - 1) % 20)[:3]  # noqa: E731
    cols = 2 if targets is not None else 1
    fig, axes = plt.subplots(len(images), cols, figsize=(5.2 * cols, 4.2 * len(images)), squeeze=False)
    for r, (im, out) in enumerate(zip(images, outputs)):
        img = im.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
        name = titles[r] if titles else f"image {r + 1}"
        if targets is not None:
            t = targets[r]
            cs = [color(l) for l in t["labels"].tolist()]
            ax = axes[r][0]
            ax.imshow(_overlay(img, t["masks"].bool() if len(t["masks"]) else None, cs))
            _draw_boxes(ax, t["boxes"], [names[int(l) - 1] for l in t["labels"]], cs)
            n_obj = len(t["labels"])
            ax.set_title(f"{name}: ground truth ({n_obj} object{'' if n_obj == 1 else 's'})", fontsize=9)
        scores = out["scores"].detach().float().cpu()
        keep = (scores >= score_thresh).nonzero().flatten()[:max_per_image]
        ax = axes[r][cols - 1]
        labels = out["labels"].detach().cpu()[keep]
        cs = [color(l) for l in labels.tolist()]
        masks = out["masks"].detach().float().cpu()[keep, 0] > 0.5 if "masks" in out and len(keep) else None
        ax.imshow(_overlay(img, masks, cs))
        if len(keep):
            _draw_boxes(ax, out["boxes"].detach().float().cpu()[keep],
                        [f"{names[int(l) - 1]} {float(s):.2f}" for l, s in zip(labels, scores[keep])], cs)
            ax.set_title(f"predictions: {len(keep)} with score >= {score_thresh:.2f}", fontsize=9)
        else:
            best = (f"best: {names[int(out['labels'][scores.argmax()]) - 1]} {float(scores.max()):.2f}"
                    if len(scores) else "the model returned no boxes")
            ax.set_title(f"predictions: none with score >= {score_thresh:.2f}", fontsize=9)
            ax.text(0.5, 0.5, f"no detections above threshold {score_thresh:.2f}\n({best})", transform=ax.transAxes,
                    ha="center", va="center", fontsize=10, color="black",
                    bbox=dict(facecolor="white", alpha=0.85, edgecolor="red"))
        for a in axes[r]:
            a.axis("off")
    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=80, format="png"), force=True)
    finally:
        plt.close(fig)
    return Path(path)
