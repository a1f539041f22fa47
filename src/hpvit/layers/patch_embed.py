"""Patch embedding: the pre-trained ``kernel x kernel`` projection, applied with any stride."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Image -> token map.

    Input ``(B, C_in, H, W)``; output ``(B, H', W', D)`` (channels last, contiguous) with
    ``H' = floor((H + 2p - k) / s) + 1``. With the pre-trained 16x16 kernel, stride 4 and padding 6
    this is ``floor(H / 4)`` for any H >= 4 (exactly H/4 when 4 divides H); with stride = kernel and
    padding 0 it is the plain ViT's patchify.

    The convolution runs on the channels-last image, so its output already is the ``(B, H', W', D)``
    map every later layer reads: no layout copy, and on CPU oneDNN's channels-last kernel is faster
    (stride 4, ViT-B, batch 8: 155 vs 190 ms on one core) with the same numbers as ``F.conv2d`` on the
    NCHW image (tests/test_perf_api.py compares the two). Later element-wise ops (the position embedding,
    the pools) then read contiguous memory instead of a permuted NCHW tensor.
    """

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int, bias: bool = True):
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=padding, bias=bias)

    def grid(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self.kernel, self.stride, self.padding
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        # backends that ignore the memory format (or a 1x1 output, where both formats coincide) still
        # get a contiguous map
        return y.contiguous()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The unoptimised embedding (``F.conv2d`` on the NCHW image, then a permuted view), for tests."""
        return F.conv2d(x, self.proj.weight, self.proj.bias, self.stride, self.padding).permute(0, 2, 3, 1)
