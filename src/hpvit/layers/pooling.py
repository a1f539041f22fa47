"""Pooling layers between stages, and their re-parameterisation.

All layers map a channels-last map ``(B, H, W, D)`` to ``(B, ceil(H/2), ceil(W/2), D)`` (``gap``: to
``(B, 1, 1, D)``); the width ``D`` never changes (every stage reuses the plain ViT's blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Downsample(nn.Module):
    """One stage transition.

    kinds:
      * ``avgconv``: ``avg_pool3x3/2(x) + conv3x3/2(x)``, the conv (depthwise or full) initialised to
        zero so that a freshly transformed model pools exactly like ``avg``. The average pool counts
        the zero padding (``count_include_pad=True``), which makes it *equal* to a conv with constant
        weight 1/9 -- the property :meth:`reparameterize` relies on, exact at every border.
      * ``avg``: the 3x3/2 average pool alone (parameter-free).
      * ``conv``: a 3x3/2 conv alone (e.g. a merged ``avgconv``).
      * ``max``: 2x2/2 max pool (``ceil_mode=True`` so odd sizes keep their last row/column).
      * ``gap``: global average pooling to a single token (parameter-free).

    ``padding`` (3x3 kinds): ``zeros`` pads with zeros, which the average counts, so the first row and
    column of the output (which read one padded row/column) shrink by up to 4/9 at a corner while the
    last ones (for even sizes) do not; ``replicate`` repeats the edge tokens instead. Either way the
    pool is a fixed 1/9 conv over the padded map, so :meth:`reparameterize` stays exact.
    """

    def __init__(self, kind: str, dim: int, conv: str = "depthwise", padding: str = "zeros"):
        super().__init__()
        self.kind = kind
        self.conv_kind = conv
        self.padding = padding
        self.dim = dim
        self.conv: nn.Conv2d | None = None
        if kind in ("avgconv", "conv"):
            groups = dim if conv == "depthwise" else 1
            self.conv = nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=0, groups=groups, bias=True)
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 3, 1, 2)  # NCHW view of channels-last memory: no copy
        if self.kind == "max":
            out = F.max_pool2d(y, 2, 2, ceil_mode=True)
        elif self.kind == "gap":
            out = y.mean(dim=(2, 3), keepdim=True)
        else:
            # one explicit 1-pixel pad serves the pool and the conv (both 3x3/2 with padding 0 after it)
            y = F.pad(y, (1, 1, 1, 1), mode="replicate" if self.padding == "replicate" else "constant")
            if self.kind == "avg":
                out = F.avg_pool2d(y, 3, 2, 0)
            elif self.kind == "conv":
                out = self.conv(y)
            else:
                out = F.avg_pool2d(y, 3, 2, 0) + self.conv(y)
        return out.permute(0, 2, 3, 1)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the average pool into the conv: ``avgconv`` becomes ``conv`` with identical output."""
        if self.kind != "avgconv":
            return
        w = self.conv.weight
        if self.conv_kind == "depthwise":
            w.add_(1.0 / 9.0)
        else:
            idx = torch.arange(self.dim, device=w.device)
            w[idx, idx] += 1.0 / 9.0
        self.kind = "conv"

    def extra_repr(self) -> str:
        return f"kind={self.kind}, conv={self.conv_kind if self.conv is not None else None}, padding={self.padding}"
