"""Mask R-CNN over a dense ViT backbone: torchvision's ``MaskRCNN`` with an FPN on the four maps of a
transformed (``paper-det``) or plain-baseline (``plain-det``) backbone. Files ``hpvit train det`` writes are
read back by :func:`hpvit.export.load`."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.poolers import initLevelMapper

from ..checkpoints.spec import PlainSpec
from ..errors import ConfigError
from .contract import Wraps
from .dense import backbone_from_config, build_dense_backbone

class BackboneWithFPN(nn.Module):
    """A dense backbone (4 maps at strides 4..32) + torchvision's FPN (``fpn_channels``, an extra
    max-pooled level): images ``(B, 3, H, W)`` -> OrderedDict ``'0'..'3'`` (strides 4..32) and
    ``'pool'`` (stride 64), each ``(B, fpn_channels, ., .)``."""

    def __init__(self, body: nn.Module, fpn_channels: int = 256):
        super().__init__()
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

    class _T(GeneralizedRCNNTransform):
        def resize(self, image, target=None):
            return image, target

    return _T(min_size, max_size, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
              size_divisible=32)


def _fix_roi_pool_scales(roi_heads: nn.Module, strides) -> None:
    """Give the RoI poolers their levels' scales (1 / stride) up front.

    torchvision's ``MultiScaleRoIAlign`` infers them on its first call, from the first batch's feature-map
    size over its (unpadded) image size, rounded to a power of two, and keeps them for good. Since
    :class:`~hpvit.data.coco.CocoInstances` resizes images itself, the batch is only padded to a multiple
    of 32, so a small first image (e.g. 64x43 padded to 64x64: 16 / 43 -> 1/2 instead of 1/4) fixes every
    level's scale at twice its true value for the rest of the run. The pooled RoI features then depended on
    which image a process happened to see first: each DDP rank, a resumed run and a reloaded model could
    pool differently, and a model evaluated in training scored differently from the same weights reloaded.
    The values set here are what torchvision infers for a well-proportioned input."""
    for pool in (roi_heads.box_roi_pool, getattr(roi_heads, "mask_roi_pool", None)):
        if pool is None or not hasattr(pool, "featmap_names"):
            continue
        scales = [2.0 ** -round(math.log2(strides[int(n)])) for n in pool.featmap_names]
        pool.scales = scales
        pool.map_levels = initLevelMapper(int(-math.log2(scales[0])), int(-math.log2(scales[-1])),
                                          canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)


# hpvit's own ``--rcnn`` keys (the rest go to torchvision's MaskRCNN as they are): the widths of the box head's
# two fully connected layers and of the mask head's four 3x3 convs (torchvision: 1024 and 256 whatever the FPN)
HEAD_KEYS = ("box_head_dim", "mask_head_dim")
# torchvision arguments that count proposals / RoIs / anchors: each must be a whole number >= 1
COUNT_KEYS = ("rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
              "rpn_post_nms_top_n_test", "rpn_batch_size_per_image", "box_batch_size_per_image",
              "box_detections_per_img")
FRACTION_KEYS = ("rpn_positive_fraction", "box_positive_fraction", "rpn_nms_thresh", "box_nms_thresh",
                 "rpn_fg_iou_thresh", "rpn_bg_iou_thresh", "box_fg_iou_thresh", "box_bg_iou_thresh")


# what hpvit sets itself, or what is a module rather than a setting
_NOT_SETTINGS = {"self", "backbone", "num_classes", "min_size", "max_size", "image_mean", "image_std", "kwargs",
                 "rpn_anchor_generator", "rpn_head", "box_roi_pool", "box_head", "box_predictor", "mask_roi_pool",
                 "mask_head", "mask_predictor"}


def rcnn_keys() -> list[str]:
    """Every key ``--rcnn`` takes: torchvision MaskRCNN's settings and hpvit's head widths and fpn_channels."""
    import inspect

    tv = [n for n in inspect.signature(MaskRCNN.__init__).parameters if n not in _NOT_SETTINGS]
    return sorted({*tv, *HEAD_KEYS, "fpn_channels"})


def check_rcnn(rcnn: dict[str, Any]) -> None:
    """Refuse unknown keys (torchvision would pass them on to its transform, which ignores them) and RCNN
    settings the heads cannot run (no RoIs per image, fractions outside (0, 1]) with a :class:`ConfigError`
    that names the key and a working value."""
    import difflib

    valid = rcnn_keys()
    for k in rcnn:
        if k not in valid:
            near = [{"representation_size": "box_head_dim"}.get(k)] if k == "representation_size" else \
                difflib.get_close_matches(k, valid, n=1)
            raise ConfigError(f"--rcnn {k}: not a Mask R-CNN setting" + (f" (did you mean {near[0]}?)" if near else "")
                              + "; valid keys: " + ", ".join(valid))
    for k in (*COUNT_KEYS, *HEAD_KEYS):
        v = rcnn.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            if k in HEAD_KEYS:
                raise ConfigError(f"--rcnn {k}={v!r}: a head width needs a whole number of channels >= 1 "
                                  f"(e.g. {k}={256 if k == 'box_head_dim' else 128})")
            what = "RoIs per image" if "batch_size" in k else "boxes"
            raise ConfigError(f"--rcnn {k}={v!r}: needs a whole number of {what} >= 1 (e.g. {k}="
                              f"{ {'box_batch_size_per_image': 128}.get(k, 256)}); with none the heads have "
                              "nothing to train or predict on")
    for k in FRACTION_KEYS:
        v = rcnn.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
            raise ConfigError(f"--rcnn {k}={v!r}: must be a number in (0, 1]")


def _heads(rcnn: dict[str, Any], fpn_channels: int, num_classes: int) -> dict[str, nn.Module]:
    """The box and mask heads when a head-width key is set (the other head keeps torchvision's width);
    none: torchvision builds its defaults (1024-wide box head, 256-wide mask head)."""
    if not any(rcnn.get(k) for k in HEAD_KEYS):
        return {}
    box, mask = rcnn.get("box_head_dim") or 1024, rcnn.get("mask_head_dim") or 256
    return {"box_head": TwoMLPHead(fpn_channels * 7 * 7, box), "box_predictor": FastRCNNPredictor(box, num_classes),
            "mask_head": MaskRCNNHeads(fpn_channels, (mask,) * 4, 1),
            "mask_predictor": MaskRCNNPredictor(mask, mask, num_classes)}


class MaskRCNNModel(Wraps, nn.Module):
    """torchvision ``MaskRCNN`` whose backbone is :class:`BackboneWithFPN` over a dense ViT backbone.

    ``forward(images, targets)``: images a list of ``(3, h, w)`` float tensors in [0, 1] (any sizes;
    padded to a multiple of 32 inside); training returns the loss dict, eval a list of
    ``{boxes, labels, scores, masks}`` in the input images' pixel coordinates. The dense backbone's contract
    (:mod:`hpvit.models.contract`: layer ids, no-weight-decay names...) answers for the whole model.
    From image files or PIL images to COCO-format detections, resized as in training:
    ``hpvit.predict(hpvit.load(RUN), ["a.jpg"])`` (docs/predict.md).
    """

    wrapped = "detector.backbone.body"

    def __init__(self, body: nn.Module, num_classes: int, fpn_channels: int = 256, img_size: int = 512,
                 rcnn: dict[str, Any] | None = None):
        super().__init__()
        self.rcnn = dict(rcnn or {})
        check_rcnn(self.rcnn)
        tv_args = {k: v for k, v in self.rcnn.items() if k not in HEAD_KEYS}
        heads = _heads(self.rcnn, fpn_channels, num_classes + 1)
        try:
            self.detector = MaskRCNN(BackboneWithFPN(body, fpn_channels), num_classes=None if heads else num_classes + 1,
                                     min_size=img_size, max_size=img_size, **heads, **tv_args)
        except TypeError as e:
            raise ConfigError(f"--rcnn: {e}; valid keys are torchvision MaskRCNN arguments such as "
                              "box_batch_size_per_image, rpn_post_nms_top_n_train, box_detections_per_img, and "
                              "hpvit's " + ", ".join(HEAD_KEYS) + " (docs/dense.md)") from e
        self.detector.transform = _no_resize_transform(img_size, img_size)
        _fix_roi_pool_scales(self.detector.roi_heads, body.strides)
        self.num_classes = num_classes

    @property
    def body(self) -> nn.Module:
        return self.detector.backbone.body

    def forward(self, images, targets=None):
        return self.detector(images, targets)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's four maps for images ``(B, 3, H, W)`` in [0, 1] (normalised and padded as in
        :meth:`forward`)."""
        return self.body(self.detector.transform(list(x))[0].tensors)


def build_detector(init, config: str, num_classes: int, img_size: int, drop_path: float = 0.0,
                   fmt: str | None = None, fpn_channels: int = 256, rcnn: dict[str, Any] | None = None) -> MaskRCNNModel:
    """Mask R-CNN over the dense backbone ``config`` (paper-det, plain-det, ...) from ``init`` (a plain checkpoint or
    a loaded HierarchicalViT, see :func:`~hpvit.models.dense.build_dense_backbone`). ``rcnn``: torchvision
    MaskRCNN arguments plus hpvit's ``fpn_channels``, ``box_head_dim`` and ``mask_head_dim``."""
    rcnn = dict(rcnn or {})
    fpn_channels = rcnn.pop("fpn_channels", fpn_channels)  # ``--rcnn fpn_channels=N`` sets the FPN width
    if not isinstance(fpn_channels, int) or isinstance(fpn_channels, bool) or fpn_channels < 1:
        raise ConfigError(f"--rcnn fpn_channels={fpn_channels!r}: needs a whole number of channels >= 1 (e.g. 128)")
    check_rcnn(rcnn)  # before the backbone is built
    body = build_dense_backbone(init, config, fmt=fmt, drop_path_rate=drop_path, img_size=img_size)
    return MaskRCNNModel(body, num_classes, fpn_channels, img_size, rcnn)


def detector_from_meta(meta: dict[str, Any]) -> MaskRCNNModel:
    """The (untrained) detector a file's description ``meta`` describes (``hpvit.export.load`` fills the weights)."""
    body = backbone_from_config(PlainSpec.from_dict(meta["spec"]), meta["config"], meta["backbone"], meta["out_indices"])
    return MaskRCNNModel(body, meta["num_classes"], meta["fpn_channels"], meta["img_size"], meta.get("rcnn"))
