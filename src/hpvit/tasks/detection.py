"""Object detection and instance segmentation: torchvision's Mask R-CNN on a transformed backbone
(``paper-det``) or on the paper's plain baseline (``plain-det``), trained with the shared engine.

``hpvit train det --init SRC --config paper-det|plain-det --ann ANN.json --images DIR --out DIR``
``hpvit eval det --model DIR --ann ANN.json --images DIR [--out EVAL_DIR]``

Evaluation is COCO box and mask AP through pycocotools; the output directory gets ``results.json``
(``bbox_AP``, ``bbox_AP50``, ``bbox_AP75``, ``bbox_APs/m/l``, ``bbox_AR1/10/100``, ``bbox_ARs/m/l``
and the same twelve ``segm_*`` numbers), ``predictions.json`` (COCO results format: boxes and RLE
masks) and ``predictions.png`` (boxes and masks drawn on a few images). See docs/dense.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.coco import CocoInstances, CocoSource, collate_detection, parse_range
from ..engine.recipe import Recipe, load_recipe
from ..engine.task import Task
from ..errors import ConfigError
from ..cli import parse_key_values
from ..models.dense_io import dense_meta_reuse
from ..models.detector import BackboneWithFPN, MaskRCNNModel, build_detector, load_detector  # noqa: F401 (re-exported)
from ._args import add_det_eval_args, add_det_train_args, subset_indices
from ._cli import eval_out_dir, run_training

TASK = "det"
MODEL_FILE = "model.safetensors"
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
AP_UNIT = "% (pycocotools' 0-1 value x 100; -1 where no ground truth of that size)"
METRIC_UNITS = {**{f"{t}_{n}": AP_UNIT for t in ("bbox", "segm") for n in STAT_NAMES},
                "eval_images": "images", "num_predictions": "detections"}

# Defaults for dense detection fine-tuning (ViTDet-like AdamW settings, scaled down for small runs).
DET_DEFAULTS = dict(name="det-default", epochs=12, warmup_epochs=1.0, batch_size=2, lr=1e-4, min_lr=1e-6,
                    weight_decay=0.1, layer_decay=0.7, drop_path=0.1, smoothing=0.0, mixup=0.0, cutmix=0.0,
                    auto_augment=None, reprob=0.0, img_size=512, num_workers=2, clip_grad=None, log_every_steps=10)


# -------------------------------------------------------------------- model (in hpvit.models.detector)
def detector_meta(model: MaskRCNNModel, config_name: str, source: CocoSource, img_size: int) -> dict[str, Any]:
    body = model.body
    return {"task": "det", "backbone": body.kind, "config_name": config_name, "config": body.vit.config.to_dict(),
            "spec": body.vit.spec.to_dict(), "out_indices": list(getattr(body, "out_indices", []) or []),
            "num_classes": model.num_classes, "cat_ids": source.cat_ids, "cat_names": source.cat_names,
            "img_size": img_size, "fpn_channels": model.detector.backbone.out_channels, "rcnn": model.rcnn,
            **dense_meta_reuse(body)}


# -------------------------------------------------------------------- evaluation
def predictions_to_coco(outputs: list[dict], targets: list[dict], cat_ids: list[int], mask_thresh: float = 0.5) -> list[dict]:
    """Model outputs (in resized-image pixels) -> COCO results entries in original-image pixels, with RLE masks."""
    from pycocotools import mask as mask_utils

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
    from pycocotools.cocoeval import COCOeval

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
    from matplotlib.patches import Rectangle

    for (x0, y0, x1, y1), t, c in zip(boxes.tolist(), texts, colors):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=1.6))
        ax.text(x0, y0, t, fontsize=7, color="white", va="bottom", bbox=dict(facecolor=c, alpha=0.8, pad=1, lw=0))


def draw_predictions(images: list[torch.Tensor], outputs: list[dict], names: list[str], path: Path,
                     score_thresh: float = 0.3, max_per_image: int = 20, targets: "list[dict] | None" = None,
                     titles: "list[str] | None" = None) -> Path:
    """One row per image: the ground truth (when ``targets`` are given) beside the predictions scoring >=
    ``score_thresh`` (at most ``max_per_image``), boxes and masks coloured by class with "class score" labels.
    An image with no detection above the threshold says so, with its best score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..checkpoints.io import atomic_write

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
            ax.set_title(f"{name}: ground truth ({len(t['labels'])} objects)", fontsize=9)
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


# -------------------------------------------------------------------- task
class DetectionTask(Task):
    name = "det"
    primary_metric = "bbox_AP"
    summary_metrics = ("bbox_AP", "bbox_AP50", "segm_AP", "bbox_AR100")
    metric_units = METRIC_UNITS

    @property
    def eval_split(self) -> str:
        """Which images are scored: the validation json and the slice of it."""
        src = getattr(self, "val_source", None)
        if src is None:
            return "none"
        rng = getattr(self, "val_range", None)
        return f"{Path(src.ann_file).name}" + (f" images {rng}" if rng else "")

    def __init__(self, init: str, config: str, ann: str, images: str, recipe: Recipe, out: "str | Path",
                 train_range: str | None = None, val_ann: str | None = None, val_images: str | None = None,
                 val_range: str | None = None, lsj: bool = False, fmt: str | None = None, vis_images: int = 4,
                 rcnn: dict[str, Any] | None = None):
        self.init, self.config, self.recipe, self.out, self.fmt = init, config, recipe, Path(out), fmt
        self.rcnn = dict(rcnn or {})
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
        self._preds: list[dict] = []
        self._gt = None

    def datasets(self):
        r = self.recipe
        train = CocoInstances(self.source, self.train_idx, True, r.img_size, lsj=self.lsj)
        ev = CocoInstances(self.val_source, self.val_idx, False, r.img_size) if self.val_source is not None else None
        from ..engine.logging import log

        log("train: " + self.source.summary(self.train_idx))
        if ev is not None:
            log("eval: " + self.val_source.summary(self.val_idx))
        return train, ev

    def build_model(self) -> nn.Module:
        r = self.recipe
        self.model = build_detector(self.init, self.config, len(self.source.cat_ids), r.img_size, r.drop_path, self.fmt,
                                    rcnn=self.rcnn)
        return self.model

    def collate_fn(self, train):
        return collate_detection

    def prepare_batch(self, batch, device, train):
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]
        return images, targets

    def loss(self, model, batch):
        images, targets = batch
        losses = model(images, [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets])
        self.last_losses = {k: float(v.detach()) for k, v in losses.items()}
        return sum(v.float() for v in losses.values())

    def eval_batch(self, model, batch):
        images, targets = batch
        outputs = model(images)
        self._preds.extend(predictions_to_coco(outputs, targets, self.val_source.cat_ids))
        return {"images": len(images)}

    def eval_finalize(self, sums):
        from ..engine import distributed as D

        preds = self._preds
        self._preds = []
        # COCO AP is not a sum over batches: every rank's predictions are gathered (DDP), then scored
        gathered = D.all_gather_objects(preds, _dist_info())
        preds = [p for part in gathered for p in part]
        if self._gt is None:
            self._gt = self.val_source.coco_gt(self.val_idx)
        m = coco_metrics(self._gt, preds)
        m["eval_images"] = int(sums.get("images", 0))
        m["num_predictions"] = len(preds)
        self.last_predictions = preds
        if self.out is not None and _dist_info().is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "predictions.json").write_text(json.dumps(preds))
        return m

    def results(self, model):
        res = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
               "backbone": model.body.kind, "num_classes": model.num_classes}
        if self.val_source is not None:
            ds = CocoInstances(self.val_source, self.val_idx[: self.vis_images], False, self.recipe.img_size)
            res["predictions_png"] = str(visualize(model, ds, self.val_source.cat_names, self.out / "predictions.png"))
            res["predictions_json"] = str(self.out / "predictions.json")
        return res

    def describe(self):
        return {"init": str(self.init), "config": self.config, "ann": str(self.source.ann_file),
                "images": str(self.source.images_dir), "train_images": len(self.train_idx),
                "val_ann": str(self.val_source.ann_file) if self.val_source else None, "val_images": len(self.val_idx),
                "lsj": self.lsj, "categories": len(self.source.cat_ids), "rcnn": self.rcnn}

    def save_model(self, model, out_dir, ema=None):
        from ..models.dense_io import save_dense

        meta = detector_meta(model, self.config, self.source, self.recipe.img_size)
        paths = [save_dense(model, out_dir / MODEL_FILE, meta)]
        if ema is not None:
            paths.append(save_dense(ema, out_dir / "model_ema.safetensors", meta))
        return paths


def _dist_info():
    """The current process group as the engine describes it (single process when none is initialised)."""
    import torch.distributed as tdist

    from ..engine import distributed as D

    if tdist.is_available() and tdist.is_initialized():
        return D.DistInfo(rank=tdist.get_rank(), world_size=tdist.get_world_size())
    return D.DistInfo()


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


# -------------------------------------------------------------------- command line
def build_dense_recipe(args, defaults: dict[str, Any]) -> Recipe:
    r = load_recipe(args.recipe) if args.recipe else Recipe().replace(**defaults)
    flags = {"epochs": args.epochs, "img_size": args.img_size, "batch_size": args.batch_size,
             "accum_steps": args.accum_steps, "lr": args.lr, "warmup_epochs": args.warmup_epochs,
             "layer_decay": args.layer_decay, "drop_path": args.drop_path, "amp": args.amp,
             "grad_checkpointing": args.grad_checkpointing, "num_workers": args.workers, "seed": args.seed,
             "eval_every_epochs": args.eval_every, "ckpt_every_steps": args.ckpt_every_steps}
    changes = {k: v for k, v in flags.items() if v is not None}
    changes.update(parse_key_values(args.set, "--set"))
    return r.replace(**changes) if changes else r


add_train_args = add_det_train_args
add_eval_args = add_det_eval_args


def as_range(spec: "str | None") -> "str | None":
    """A subset flag for the COCO image list: ``N`` -> ``"0:N"`` (the first N), ``START:STOP`` unchanged."""
    return f"0:{int(spec)}" if spec is not None and ":" not in spec else spec


def run_train(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = build_dense_recipe(args, DET_DEFAULTS)
    task = DetectionTask(args.init, args.config, args.ann, args.images, recipe, args.out, as_range(args.train_images),
                         args.val_ann, args.val_images_dir, as_range(args.eval_images), args.lsj, args.format,
                         rcnn=parse_key_values(args.rcnn, "--rcnn"))
    return run_training(task, recipe, args)


def run_eval(args) -> int:
    from ..engine import distributed as D
    from ..engine.loop import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_detector(args.model)
    out = eval_out_dir(args.model, args.out)
    src = CocoSource(args.ann, args.images)
    if src.cat_ids != meta["cat_ids"]:
        raise ConfigError(f"{args.ann}: its categories differ from the model's ({len(src.cat_ids)} vs "
                          f"{len(meta['cat_ids'])}); evaluate on data with the training category list")
    idx = parse_range(as_range(args.eval_images), len(src.images), "--eval-images")
    img_size = args.img_size or meta["img_size"]
    recipe = Recipe().replace(img_size=img_size)
    task = DetectionTask.__new__(DetectionTask)
    task.recipe, task.out, task.val_source, task.val_idx, task._preds, task._gt = recipe, out, src, idx, [], None
    task.val_range = as_range(args.eval_images)
    ds = CocoInstances(src, idx, False, img_size)
    dist = D.init_distributed(args.device)
    try:
        model.to(dist.device)
        t = time.time()
        m = evaluate(task.evaluator(), model, ds, args.batch_size, 0, dist, desc=f"evaluating {task.eval_split}",
                     collate_fn=collate_detection, prepare=lambda b, dev: task.prepare_batch(b, dev, train=False))
        if dist.is_main:
            vis = CocoInstances(src, idx[: args.vis_images], False, img_size)
            png = visualize(model, vis, src.cat_names, out / "predictions.png")
            m.update({"model": str(args.model), "ann": str(args.ann), "split": task.eval_split, "img_size": img_size,
                      "metric_units": METRIC_UNITS,
                      "eval_time_s": round(time.time() - t, 2), "predictions_json": str(out / "predictions.json"),
                      "predictions_png": str(png)})
            (out / "results.json").write_text(json.dumps(m, indent=2))
            print(json.dumps(m, indent=2))
    finally:
        D.cleanup(dist)
    return 0
