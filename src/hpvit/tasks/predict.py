"""``hpvit.predict(model, images)``: from image files, PIL images or arrays to predictions, for every model hpvit
builds or loads, with the preprocessing its training run recorded.

========================================  ==============================================================
model                                     records (see :mod:`hpvit.tasks.predict_io` for the fields)
========================================  ==============================================================
classifier (``HierarchicalViT``)          ``topk``: class ids, names (the run's ``model.json``) and scores
backbone (``head='none'`` / 0 classes)    ``features``: the pyramid maps
``MaskRCNNModel`` (``hpvit train det``)   ``detections``: COCO results with RLE masks, the image's pixels
``UperNetSegmenter`` (``train seg``)      ``label``: class ids at the image's size
an ``.onnx`` file from ``hpvit export``   classifier or backbone, on ONNX Runtime (:mod:`.predict_onnx`)
========================================  ==============================================================

Preprocessing: a classifier uses its run's ``model.json`` (``hpvit.load`` keeps it as
``model.hpvit_preprocess``; :class:`~hpvit.data.preprocess.Preprocess`), else the recipe defaults at the
config's ``img_size``. A detector resizes the longer side to its training ``img_size`` (or the run's
``test_short_side`` / ``max_long_side``) exactly as ``hpvit eval det`` does; a segmenter resizes to its
``base_size`` and runs ``whole`` (or the run's ``eval_mode``) inference as ``hpvit eval seg`` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import ImageNetInfo
from torch import nn

from ..checkpoints.native import model_file
from ..data.preprocess import Preprocess
from ..data.segmentation import get_layout, resize_pair
from ..errors import ConfigError
from ..evaluation.detection import predictions_to_coco
from ..evaluation.segmentation import predict_logits
from ..export import load
from ..models.detector import MaskRCNNModel
from ..models.hierarchical import HierarchicalViT
from ..models.segmenter import UperNetSegmenter
from .predict_io import iter_records, named_items, softmax, topk
from .predict_onnx import OnnxPredictor

DET_SCORE_THRESHOLD = 0.3  # detections below it are left out unless score_threshold says otherwise
RUN_RECIPE = "recipe.json"  # engine.loop.RECIPE_FILE: the run's resolved recipe, next to its model file


def predict(model: "nn.Module | str | os.PathLike", images: Any, *, top_k: int = 5,
            score_threshold: "float | None" = None, batch_size: int = 8, device: "str | None" = None,
            skip_bad_images: bool = False, preprocess: "dict | None" = None) -> list[dict]:
    """Predictions of ``model`` for ``images``: one record per image, in order (see the module docstring).

    ``model``: a loaded or built model, or the path of any file or run folder hpvit wrote, or of an ONNX file
    ``hpvit export`` wrote. ``images``: a path, PIL image or ``(H, W[, 3])`` array, or a list of them (uint8,
    or float in [0, 1]; RGB). ``top_k``: classes per image (classifiers). ``score_threshold``: detections
    below it are left out (default 0.3; 0 keeps all the model returned); for a classifier, classes below it.
    ``skip_bad_images``: leave out image files that cannot be decoded instead of raising BadImageError.
    ``preprocess``: classifier / backbone preprocessing keys (``img_size``, ``crop_pct``, ``interpolation``,
    ``mean``, ``std``) that replace the run's, e.g. the values of ``timm.data.resolve_data_config``.
    The model runs in eval mode under ``torch.no_grad``; its own mode is restored afterwards."""
    predictor = make_predictor(model, top_k=top_k, score_threshold=score_threshold, device=device,
                               preprocess=preprocess)
    return [rec for rec, _ in iter_records(predictor, named_items(images), batch_size, skip_bad_images)]


def make_predictor(model: "nn.Module | str | os.PathLike", *, top_k: int = 5, score_threshold: "float | None" = None,
                   device: "str | None" = None, threads: "int | None" = None, preprocess: "dict | None" = None):
    """The predictor (:mod:`.predict_io`) for ``model`` (a module, or a path as :func:`predict` takes)."""
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    run: dict = {}
    if isinstance(model, (str, os.PathLike)):
        if os.fspath(model).lower().endswith(".onnx"):
            return OnnxPredictor(model, top_k=top_k, score_threshold=score_threshold, device=device, threads=threads)
        run = run_recipe(model)
        model = load(model)
    dev = resolve_device(device)
    if isinstance(model, MaskRCNNModel):
        return DetectorPredictor(model, dev, score_threshold, run)
    if isinstance(model, UperNetSegmenter):
        return SegmenterPredictor(model, dev, run)
    if isinstance(model, HierarchicalViT) and (model.num_classes == 0 or model.head_type == "none"):
        return FeaturePredictor(model, dev, preprocess)
    if isinstance(model, nn.Module) and getattr(model, "num_classes", 0):
        return ClassifierPredictor(model, dev, top_k, score_threshold or 0.0, preprocess)
    raise ConfigError(f"cannot predict with a {type(model).__name__}: pass an hpvit model (classifier, backbone, "
                      "MaskRCNNModel, UperNetSegmenter), a file or run folder hpvit wrote, or an exported .onnx file")


def resolve_device(device: "str | None") -> torch.device:
    """``device`` (cpu, cuda, cuda:N; default: cuda when available, else cpu), refused when not present."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {device}: no such CUDA device on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: hpvit predict runs on cpu or cuda")
    return dev


def run_recipe(path: "str | os.PathLike") -> dict:
    """The resolved recipe of the run that wrote the model at ``path`` (``recipe.json`` beside it), or {}."""
    f = Path(model_file(path)).parent / RUN_RECIPE
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return {}


def class_names(n: int) -> list[str]:
    """ImageNet-1k class names (timm's) for a 1000-class head, else ``class i``."""
    if n == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(n)]
    return [f"class {i}" for i in range(n)]


def _img_size(model: nn.Module) -> int:
    """The model's default input side (its config's ``img_size``; 224 for a model without one)."""
    size = getattr(getattr(model, "config", None), "img_size", 224)
    return size if isinstance(size, int) else int(size[0])


def _head(name: str, pil) -> dict:
    return {"image": name, "width": pil.size[0], "height": pil.size[1]}


def _to_unit(pil) -> torch.Tensor:
    """``(3, H, W)`` float in [0, 1], as the detection and segmentation datasets read an image."""
    return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


class _Runs:
    """Eval mode and no_grad for one batch, the module's own mode restored afterwards."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model.to(device), device

    def __enter__(self):
        self.was = self.model.training
        self.grad = torch.no_grad()
        self.grad.__enter__()
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was)
        self.grad.__exit__(*exc)


class ClassifierPredictor:
    task = "cls"

    def __init__(self, model: nn.Module, device: torch.device, top_k: int, threshold: float,
                 preprocess: "dict | None" = None):
        record = getattr(model, "hpvit_preprocess", None) or {}
        self.pre = Preprocess.from_record({**record, **(preprocess or {})}, img_size=_img_size(model))
        self.class_names = list(record.get("classes") or class_names(model.num_classes))
        self.runs, self.k, self.threshold = _Runs(model, device), top_k, threshold

    def prepare(self, pil) -> np.ndarray:
        return self.pre(pil)

    def run(self, batch: list) -> list[dict]:
        with self.runs as m:
            logits = m(torch.from_numpy(np.stack([b[2] for b in batch])).to(self.runs.device)).float().cpu().numpy()
        return [{**_head(name, pil), "topk": topk(p, self.class_names, self.k, self.threshold)}
                for (name, pil, _), p in zip(batch, softmax(logits))]


class FeaturePredictor:
    """A backbone: its pyramid maps, the input resized (shorter side) and centre-cropped to ``img_size``."""

    task = "features"

    def __init__(self, model: HierarchicalViT, device: torch.device, preprocess: "dict | None" = None):
        record = getattr(model, "hpvit_preprocess", None) or {}
        self.pre = Preprocess.from_record({**record, **(preprocess or {})}, img_size=_img_size(model), crop_pct=1.0)
        self.runs = _Runs(model, device)

    def prepare(self, pil) -> np.ndarray:
        return self.pre(pil)

    def run(self, batch: list) -> list[dict]:
        with self.runs as m:
            maps = m.forward_pyramid(torch.from_numpy(np.stack([b[2] for b in batch])).to(self.runs.device))
        maps = [f.float().cpu().numpy() for f in maps]
        return [{**_head(name, pil), "features": [f[i] for f in maps]} for i, (name, pil, _) in enumerate(batch)]


def _meta(model: nn.Module, what: str) -> dict:
    meta = getattr(model, "hpvit_meta", None)
    if not meta:
        raise ConfigError(f"this {what} carries no description of its training (classes, image size): predict with the "
                          "model hpvit.load returns for the `hpvit train` output, or with that output's path")
    return meta


class DetectorPredictor:
    """Mask R-CNN: images resized as ``hpvit eval det`` resizes them, detections in the image's pixels."""

    task = "det"

    def __init__(self, model: MaskRCNNModel, device: torch.device, threshold: "float | None", run: dict):
        meta = _meta(model, "MaskRCNNModel")
        self.img_size = int(meta["img_size"])
        self.short, self.max_long = run.get("test_short_side"), run.get("max_long_side")
        self.cat_ids, self.class_names = list(meta["cat_ids"]), list(meta["cat_names"])
        self.threshold = DET_SCORE_THRESHOLD if threshold is None else threshold
        self.runs, self.next_id = _Runs(model, device), 1

    def prepare(self, pil) -> tuple[torch.Tensor, dict]:
        img = _to_unit(pil)
        h, w = img.shape[-2:]
        scale = self.img_size / max(h, w)
        if self.short:
            scale = self.short / min(h, w)
            if self.max_long:
                scale = min(scale, self.max_long / max(h, w))
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        return resize_pair(img, None, (nh, nw))[0], {"scale": (nh / h, nw / w), "orig_size": (h, w)}

    def run(self, batch: list) -> list[dict]:
        targets = []
        for _, _, (_, t) in batch:
            targets.append({**t, "image_id": self.next_id})
            self.next_id += 1
        with self.runs as m:
            outputs = m([b[2][0].to(self.runs.device) for b in batch])
        coco = predictions_to_coco(outputs, targets, self.cat_ids)
        return [{**_head(name, pil), "image_id": t["image_id"],
                 "detections": [d for d in coco if d["image_id"] == t["image_id"] and d["score"] >= self.threshold]}
                for (name, pil, _), t in zip(batch, targets)]


class SegmenterPredictor:
    """UperNet: the image resized to the training ``base_size``, logits back at the image's size, arg-max."""

    task = "seg"

    def __init__(self, model: UperNetSegmenter, device: torch.device, run: dict):
        meta = _meta(model, "UperNetSegmenter")
        self.base, self.crop = meta.get("base_size"), int(meta["crop"])
        self.class_names = list(meta["classes"])
        self.palette = get_layout(meta["layout"]).palette
        self.mode, self.stride = run.get("eval_mode") or "whole", run.get("slide_stride")
        self.runs = _Runs(model, device)

    def prepare(self, pil) -> torch.Tensor:
        img = _to_unit(pil)
        h, w = img.shape[-2:]
        s = self.base / max(h, w) if self.base else 1.0
        return resize_pair(img, None, (max(1, round(h * s)), max(1, round(w * s))))[0]

    def run(self, batch: list) -> list[dict]:
        out = []
        k = len(self.class_names)
        for name, pil, img in batch:
            with self.runs as m:
                logits = predict_logits(m, img.to(self.runs.device), (pil.size[1], pil.size[0]), self.mode, self.crop,
                                        self.stride)
            label = logits.argmax(0).to(torch.uint8).cpu().numpy()
            frac = np.bincount(label.ravel(), minlength=k) / label.size
            out.append({**_head(name, pil), "label": label,
                        "class_fractions": {self.class_names[c]: round(float(frac[c]), 6) for c in np.nonzero(frac)[0]}})
        return out
