"""Patch embedding: the pre-trained ``kernel x kernel`` projection, applied with any stride."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Image -> token map.

    Input ``(B, C_in, H, W)``; output ``(B, H', W', D)`` (channels last) with
    ``H' = floor((H + 2p - k) / s) + 1``. With the pre-trained 16x16 kernel, stride 4 and padding 6
    this is ``floor(H / 4)`` for any H >= 4 (exactly H/4 when 4 divides H); with stride = kernel and
    padding 0 it is the plain ViT's patchify.
    """

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int, bias: bool = True):
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=padding, bias=bias)

    def grid(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self.kernel, self.stride, self.padding
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)
