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
        try:
            self.detector = MaskRCNN(BackboneWithFPN(body, fpn_channels), num_classes=num_classes + 1,
                                     min_size=img_size, max_size=img_size, **self.rcnn)
        except TypeError as e:
            raise ConfigError(f"--rcnn: {e}; valid keys are torchvision MaskRCNN arguments such as "
                              "box_batch_size_per_image, rpn_post_nms_top_n_train, box_detections_per_img") from e
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
    a loaded HierarchicalViT, see :func:`~hpvit.models.dense.build_dense_backbone`)."""
    body = build_dense_backbone(init, config, fmt=fmt, drop_path_rate=drop_path, img_size=img_size)
    return MaskRCNNModel(body, num_classes, fpn_channels, img_size, rcnn)


def detector_from_meta(meta: dict[str, Any]) -> MaskRCNNModel:
    """The (untrained) detector a file's description ``meta`` describes (``hpvit.export.load`` fills the weights)."""
    body = backbone_from_config(PlainSpec.from_dict(meta["spec"]), meta["config"], meta["backbone"], meta["out_indices"])
    return MaskRCNNModel(body, meta["num_classes"], meta["fpn_channels"], meta["img_size"], meta.get("rcnn"))
