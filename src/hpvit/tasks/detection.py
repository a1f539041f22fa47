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

import argparse
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
from ._cli import eval_out_dir, run_training

TASK = "det"
TRAIN_HELP = "train Mask R-CNN (FPN) on a transformed or plain ViT backbone with COCO-format data"
EVAL_HELP = "COCO box / mask AP of a trained Mask R-CNN, predictions json and a PNG of predictions"
MODEL_FILE = "model.safetensors"
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# Defaults for dense detection fine-tuning (ViTDet-like AdamW settings, scaled down for small runs).
DET_DEFAULTS = dict(name="det-default", epochs=12, warmup_epochs=1.0, batch_size=2, lr=1e-4, min_lr=1e-6,
                    weight_decay=0.1, layer_decay=0.7, drop_path=0.1, smoothing=0.0, mixup=0.0, cutmix=0.0,
                    auto_augment=None, reprob=0.0, img_size=512, num_workers=2, clip_grad=None, log_every_steps=10)


# -------------------------------------------------------------------- model
class BackboneWithFPN(nn.Module):
    """A dense backbone (4 maps at strides 4..32) + torchvision's FPN (``fpn_channels``, an extra
    max-pooled level): images ``(B, 3, H, W)`` -> OrderedDict ``'0'..'3'`` (strides 4..32) and
    ``'pool'`` (stride 64), each ``(B, fpn_channels, ., .)``."""

    def __init__(self, body: nn.Module, fpn_channels: int = 256):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.out_channels), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f.contiguous()) for i, f in enumerate(feats)))


def _no_resize_transform(min_size: int, max_size: int):
    """torchvision's RCNN transform (normalise, pad the batch to a multiple of 32) without its resize:
    :class:`~hpvit.data.coco.CocoInstances` resizes images and targets itself (so flips, scale jitter
    and LSJ all live in one place) and the predictions come back in the input's pixel coordinates."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class _T(GeneralizedRCNNTransform):
        def resize(self, image, target=None):
            return image, target

    return _T(min_size, max_size, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
              size_divisible=32)


class MaskRCNNModel(nn.Module):
    """torchvision ``MaskRCNN`` whose backbone is :class:`BackboneWithFPN` over a dense ViT backbone.

    ``forward(images, targets)``: images a list of ``(3, h, w)`` float tensors in [0, 1] (any sizes;
    padded to a multiple of 32 inside); training returns the loss dict, eval a list of
    ``{boxes, labels, scores, masks}`` in the input images' pixel coordinates.
    """

    def __init__(self, body: nn.Module, num_classes: int, fpn_channels: int = 256, img_size: int = 512,
                 rcnn: dict[str, Any] | None = None):
        super().__init__()
        from torchvision.models.detection import MaskRCNN

        self.rcnn = dict(rcnn or {})
        try:
            self.detector = MaskRCNN(BackboneWithFPN(body, fpn_channels), num_classes=num_classes + 1,
                                     min_size=img_size, max_size=img_size, **self.rcnn)
        except TypeError as e:
            raise ConfigError(f"--rcnn: {e}; valid keys are torchvision MaskRCNN arguments such as "
                              "box_batch_size_per_image, rpn_post_nms_top_n_train, box_detections_per_img") from e
        self.detector.transform = _no_resize_transform(img_size, img_size)
        self.num_classes = num_classes

    @property
    def body(self) -> nn.Module:
        return self.detector.backbone.body

    def forward(self, images, targets=None):
        return self.detector(images, targets)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.body.set_grad_checkpointing(enable)


def build_detector(init, config: str, num_classes: int, img_size: int, drop_path: float = 0.0,
                   fmt: str | None = None, fpn_channels: int = 256, rcnn: dict[str, Any] | None = None) -> MaskRCNNModel:
    """Mask R-CNN over the dense backbone ``config`` (paper-det, plain-det, ...) from plain checkpoint ``init``."""
    from ..models.plain import build_dense_backbone

    body = build_dense_backbone(init, config, fmt=fmt, drop_path_rate=drop_path, img_size=img_size)
    return MaskRCNNModel(body, num_classes, fpn_channels, img_size, rcnn)


def detector_meta(model: MaskRCNNModel, config_name: str, source: CocoSource, img_size: int) -> dict[str, Any]:
    body = model.body
    return {"task": "det", "backbone": body.kind, "config_name": config_name, "config": body.vit.config.to_dict(),
            "spec": body.vit.spec.to_dict(), "out_indices": list(getattr(body, "out_indices", []) or []),
            "num_classes": model.num_classes, "cat_ids": source.cat_ids, "cat_names": source.cat_names,
            "img_size": img_size, "fpn_channels": model.detector.backbone.out_channels, "rcnn": model.rcnn}


def load_detector(path) -> tuple[MaskRCNNModel, dict[str, Any]]:
    from ..checkpoints.spec import PlainSpec
    from ..models.dense_io import read_dense
    from ..models.plain import backbone_from_config

    sd, meta = read_dense(path, "det")
    body = backbone_from_config(PlainSpec.from_dict(meta["spec"]), meta["config"], meta["backbone"], meta["out_indices"])
    model = MaskRCNNModel(body, meta["num_classes"], meta["fpn_channels"], meta["img_size"], meta.get("rcnn"))
    model.load_state_dict(sd, strict=True)
    return model, meta


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


def draw_predictions(images: list[torch.Tensor], outputs: list[dict], names: list[str], path: Path,
                     score_thresh: float = 0.3, max_per_image: int = 20) -> Path:
    """Boxes, masks and "class score" labels drawn on ``images`` (float (3, h, w) in [0, 1]), side by side in
    one PNG: detections scoring >= ``score_thresh`` (at most ``max_per_image``), else the 3 best."""
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

    tiles = []
    hmax = max(im.shape[-2] for im in images)
    wmax = max(im.shape[-1] for im in images)
    for im, out in zip(images, outputs):
        img = (im.detach().cpu().clamp(0, 1) * 255).to(torch.uint8)
        scores = out["scores"].detach().cpu()
        keep = (scores >= score_thresh).nonzero().flatten()[:max_per_image]
        if not len(keep):  # a weak model: still show its 3 best guesses (the labels carry their scores)
            keep = scores.argsort(descending=True)[:3]
        if len(keep):
            boxes = out["boxes"].detach().float().cpu()[keep]
            labels = [f"{names[int(l) - 1]} {float(s):.2f}" for l, s in
                      zip(out["labels"].cpu()[keep], out["scores"].cpu()[keep])]
            if "masks" in out and len(out["masks"]):
                m = out["masks"].detach().float().cpu()[keep, 0] > 0.5
                img = draw_segmentation_masks(img, m, alpha=0.45)
            img = draw_bounding_boxes(img, boxes, labels=labels, width=2)
        tiles.append(F.pad(img, (0, wmax - img.shape[-1], 0, hmax - img.shape[-2])))
    grid = make_grid(tiles, nrow=min(4, len(tiles)), padding=4, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


# -------------------------------------------------------------------- task
class DetectionTask(Task):
    name = "det"
    primary_metric = "bbox_AP"

    def __init__(self, init: str, config: str, ann: str, images: str, recipe: Recipe, out: "str | Path",
                 train_range: str | None = None, val_ann: str | None = None, val_images: str | None = None,
                 val_range: str | None = None, lsj: bool = False, fmt: str | None = None, vis_images: int = 4,
                 rcnn: dict[str, Any] | None = None):
        self.init, self.config, self.recipe, self.out, self.fmt = init, config, recipe, Path(out), fmt
        self.rcnn = dict(rcnn or {})
        self.lsj, self.vis_images = lsj, vis_images
        self.source = CocoSource(ann, images)
        self.train_idx = parse_range(train_range, len(self.source.images), "--train-images")
        if val_ann is not None:
            self.val_source = CocoSource(val_ann, val_images or images)
            self.val_idx = parse_range(val_range, len(self.val_source.images), "--val-images")
        elif val_range is not None:
            self.val_source = self.source
            self.val_idx = parse_range(val_range, len(self.source.images), "--val-images")
            overlap = set(self.val_idx) & set(self.train_idx)
            if overlap:
                raise ConfigError(f"--train-images and --val-images overlap in {len(overlap)} image(s); choose disjoint ranges")
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

    def param_group_kwargs(self, model):
        return {"backbone": model.body.vit, "backbone_prefix": "detector.backbone.body.vit."}

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
        m["eval_images"] = sums.get("images", 0.0)
        m["num_predictions"] = float(len(preds))
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
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    images = [ds[i][0] for i in range(len(ds))]
    outputs = model([im.to(dev) for im in images])
    model.train(was)
    return draw_predictions(images, outputs, names, path)


# -------------------------------------------------------------------- command line
def add_common_train_args(p: argparse.ArgumentParser, default_config: str, configs: str) -> None:
    p.add_argument("--init", required=True, help="plain ViT checkpoint (file, HF folder, timm:<name>)")
    p.add_argument("--config", default=default_config, help=configs)
    p.add_argument("--format", default=None, help="force the checkpoint format instead of auto-detecting it")
    p.add_argument("--out", required=True, help="output directory (checkpoint, metrics.jsonl, results.json, PNGs)")
    p.add_argument("--recipe", default=None, help="recipe JSON file (default: the task's built-in defaults)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size")
    p.add_argument("--accum-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="absolute learning rate")
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--layer-decay", type=float, default=None)
    p.add_argument("--drop-path", type=float, default=None)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None)
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N epochs (and at the end)")
    p.add_argument("--ckpt-every-steps", type=int, default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (finished or not); without it such a run is never replaced")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out training images that cannot be decoded and list them in OUT/skipped-images.txt "
                        "(default: such an image is an error naming the file)")


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


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_common_train_args(p, "paper-det", "paper-det (transformed backbone, default) or plain-det (the ViTDet-style plain baseline)")
    p.add_argument("--ann", required=True, help="COCO instances json (polygon or RLE masks)")
    p.add_argument("--images", required=True, help="folder holding the json's file_name images")
    p.add_argument("--train-images", default=None, metavar="START:STOP",
                   help="train on this slice of the json's images sorted by id (default: all)")
    p.add_argument("--val-ann", default=None, help="validation json (default: --ann restricted to --val-images)")
    p.add_argument("--val-images-dir", default=None, help="image folder of --val-ann (default: --images)")
    p.add_argument("--val-images", default=None, metavar="START:STOP", help="slice of the validation images (sorted by id)")
    p.add_argument("--lsj", action="store_true", help="large-scale jitter (scale 0.1-2.0, crop/pad to img-size square)")
    p.add_argument("--rcnn", action="append", metavar="KEY=VALUE",
                   help="torchvision MaskRCNN argument (repeatable), e.g. box_batch_size_per_image=128")


def run_train(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = build_dense_recipe(args, DET_DEFAULTS)
    task = DetectionTask(args.init, args.config, args.ann, args.images, recipe, args.out, args.train_images,
                         args.val_ann, args.val_images_dir, args.val_images, args.lsj, args.format,
                         rcnn=parse_key_values(args.rcnn, "--rcnn"))
    return run_training(task, recipe, args)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a `hpvit train det` output directory or its model.safetensors")
    p.add_argument("--ann", required=True, help="COCO instances json to evaluate on")
    p.add_argument("--images", required=True, help="image folder of --ann")
    p.add_argument("--val-images", default=None, metavar="START:STOP", help="slice of the images (sorted by id)")
    p.add_argument("--out", default=None, help="output directory (default: MODEL_DIR/eval)")
    p.add_argument("--img-size", type=int, default=None, help="default: the training size")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--vis-images", type=int, default=4, help="images drawn into predictions.png")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)


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
    idx = parse_range(args.val_images, len(src.images), "--val-images")
    img_size = args.img_size or meta["img_size"]
    recipe = Recipe().replace(img_size=img_size)
    task = DetectionTask.__new__(DetectionTask)
    task.recipe, task.out, task.val_source, task.val_idx, task._preds, task._gt = recipe, out, src, idx, [], None
    ds = CocoInstances(src, idx, False, img_size)
    dist = D.init_distributed(args.device)
    try:
        model.to(dist.device)
        t = time.time()
        m = evaluate(task, model, ds, args.batch_size, 0, dist)
        if dist.is_main:
            vis = CocoInstances(src, idx[: args.vis_images], False, img_size)
            png = visualize(model, vis, src.cat_names, out / "predictions.png")
            m.update({"model": str(args.model), "ann": str(args.ann), "img_size": img_size,
                      "eval_time_s": round(time.time() - t, 2), "predictions_json": str(out / "predictions.json"),
                      "predictions_png": str(png)})
            (out / "results.json").write_text(json.dumps(m, indent=2))
            print(json.dumps(m, indent=2))
    finally:
        D.cleanup(dist)
    return 0
