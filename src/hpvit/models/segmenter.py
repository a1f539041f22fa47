"""UperNet semantic segmentation over a dense ViT backbone (transformed ``paper-seg`` or plain ``plain-seg``):
building, and loading the files ``hpvit train seg`` writes (see :mod:`hpvit.models.dense_io`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .contract import Wraps
from .dense import backbone_from_config, build_dense_backbone
from .dense_io import read_dense, restore_reuse_report
from .detector import drop_unused_vit_parts, mark_dropped_in_report, unused_dense_keys
from .necks import UperNetHead


class UperNetSegmenter(Wraps, nn.Module):
    """Dense backbone + :class:`~hpvit.models.necks.UperNetHead`.

    ``forward(x)``: ``(B, 3, H, W)`` (any H, W >= 32) -> logits ``(B, K, H, W)``. The input is zero-padded
    bottom/right to a multiple of 32 (so both backbones' levels line up exactly), the 1/4-resolution
    logits are upsampled bilinearly to the padded size and the padding is cropped off again.
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
    body = build_dense_backbone(init, config, fmt=fmt, drop_path_rate=drop_path, img_size=img_size)
    drop_unused_vit_parts(body)  # the ViT's final norm / head never run here (see hpvit.models.detector)
    return UperNetSegmenter(body, num_classes, channels)


def load_segmenter(path) -> tuple[UperNetSegmenter, dict[str, Any]]:
    """``(model, meta)`` from a file written by ``hpvit train seg`` (or its output directory)."""
    from ..checkpoints.spec import PlainSpec

    sd, meta = read_dense(path, "seg")
    body = backbone_from_config(PlainSpec.from_dict(meta["spec"]), meta["config"], meta["backbone"], meta["out_indices"])
    drop_unused_vit_parts(body)
    model = UperNetSegmenter(body, meta["num_classes"], meta["head_channels"])
    old = unused_dense_keys(sd, "body.vit.")  # files saved while the dense model still held them
    model.load_state_dict({k: v for k, v in sd.items() if k not in old}, strict=True)
    restore_reuse_report(body.vit, meta.get("reuse"), path)
    mark_dropped_in_report(body.vit, {k[len("body.vit."):]: sd[k].numel() for k in old})
    return model, meta
