"""Heads for dense prediction on top of a 4-level backbone (:mod:`hpvit.models.dense`).

* :class:`UperNetHead` -- UperNet (Xiao et al. 2018): pyramid pooling on the 1/32 map, FPN top-down
  path, fusion of all levels at 1/4, 1x1 classifier. GroupNorm instead of BatchNorm (CPU batches of
  2-8 images); see docs/dense.md for why it is written here rather than taken from
  segmentation-models-pytorch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_gn_relu(cin: int, cout: int, k: int, groups: int) -> nn.Sequential:
    # at least 4 channels per group: the 1x1 pyramid-pooling branch must still have >1 value per group
    g = max(1, min(groups, cout // 4))
    while cout % g:
        g -= 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
        nn.GroupNorm(g, cout),
        nn.ReLU(inplace=True),
    )


class UperNetHead(nn.Module):
    """UperNet decode head over four maps (strides 4, 8, 16, 32).

    ``in_channels``: channels of the four inputs; ``channels``: the head's width (512 in mmseg's
    ViT-B configs; smaller for tiny models). Output: logits ``(B, num_classes, H_0, W_0)`` at the
    resolution of the first (1/4) input.

    Layout (mmseg's ``UPerHead``): PPM with bins 1, 2, 3, 6 on the last map -> 3x3 conv = top of the
    FPN; 1x1 lateral convs on the other levels; top-down bilinear upsample + add; 3x3 conv on each
    level; all levels upsampled to 1/4, concatenated, 3x3 conv; dropout; 1x1 classifier.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 128,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, gn_groups: int = 32):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"UperNetHead expects 4 input levels, got {len(in_channels)}")
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(_conv_gn_relu(in_channels[-1], channels, 1, gn_groups) for _ in pool_scales)
        self.ppm_out = _conv_gn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3, gn_groups)
        self.lateral = nn.ModuleList(_conv_gn_relu(c, channels, 1, gn_groups) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_gn_relu(channels, channels, 3, gn_groups) for _ in in_channels[:-1])
        self.fuse = _conv_gn_relu(len(in_channels) * channels, channels, 3, gn_groups)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def _ppm(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        outs = [x]
        for scale, conv in zip(self.pool_scales, self.ppm):
            y = conv(F.adaptive_avg_pool2d(x, scale))
            outs.append(F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False))
        return self.ppm_out(torch.cat(outs, dim=1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:-1])]
        lat.append(self._ppm(feats[-1]))
        for i in range(len(lat) - 1, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear",
                                                    align_corners=False)
        outs = [conv(t) for conv, t in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))
