"""UperNet semantic segmentation over a dense ViT backbone (transformed ``paper-seg`` or plain ``plain-seg``):
files ``hpvit train seg`` writes are read back by :func:`hpvit.export.load`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.spec import PlainSpec
from .contract import Wraps
from .dense import backbone_from_config, build_dense_backbone
from .necks import UperNetHead


class UperNetSegmenter(Wraps, nn.Module):
    """Dense backbone + :class:`~hpvit.models.necks.UperNetHead`.

    ``forward(x)``: ``(B, 3, H, W)`` (any H, W >= 32) -> logits ``(B, K, H, W)``. The input is zero-padded
    bottom/right to a multiple of 32 (so both backbones' levels line up exactly), the 1/4-resolution
    logits are upsampled bilinearly to the padded size and the padding is cropped off again.
    From image files or PIL images to label maps, resized as in training: ``hpvit.predict(hpvit.load(RUN),
    ["a.jpg"])`` (docs/predict.md).
    """

    size_divisor = 32
    wrapped = "body"  # the dense backbone's contract (hpvit.models.contract) answers for the whole model

    def __init__(self, body: nn.Module, num_classes: int, channels: int = 128):
        super().__init__()
        self.body = body
        self.head = UperNetHead(body.out_channels, num_classes, channels)
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        d = self.size_divisor
        ph, pw = (-x.shape[-2]) % d, (-x.shape[-1]) % d
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self._prepare(x)
        logits = self.head(self.body(x))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's four maps for images ``(B, 3, H, W)`` in [0, 1] (normalised and padded as in
        :meth:`forward`)."""
        return self.body(self._prepare(x))


def build_segmenter(init, config: str, num_classes: int, img_size: int, drop_path: float = 0.0,
                    fmt: str | None = None, channels: int = 128) -> UperNetSegmenter:
    """UperNet over the dense backbone ``config`` (paper-seg, plain-seg, ...) from ``init`` (a plain checkpoint or a
    loaded HierarchicalViT, see :func:`~hpvit.models.dense.build_dense_backbone`)."""
    body = build_dense_backbone(init, config, fmt=fmt, drop_path_rate=drop_path, img_size=img_size)
    return UperNetSegmenter(body, num_classes, channels)


def segmenter_from_meta(meta: dict[str, Any]) -> UperNetSegmenter:
    """The (untrained) segmenter a file's description ``meta`` describes (``hpvit.export.load`` fills the weights)."""
    body = backbone_from_config(PlainSpec.from_dict(meta["spec"]), meta["config"], meta["backbone"], meta["out_indices"])
    return UperNetSegmenter(body, meta["num_classes"], meta["head_channels"])
