"""Pooling layers between stages, and their re-parameterisation.

All layers map a channels-last map ``(B, H, W, D)`` to ``(B, ceil(H/2), ceil(W/2), D)`` (``gap``: to
``(B, 1, 1, D)``); the width ``D`` never changes (every stage reuses the plain ViT's blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .capture import is_graph_capture


def pool3x3s2(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, replicate: bool) -> torch.Tensor:
    """``conv2d(pad(y, 1), weight, bias, stride=2)`` (``weight``: ``(D, 1|D, 3, 3)``, depthwise or full) or,
    with ``weight=None``, ``avg_pool2d(pad(y, 1), 3, 2)``, where ``pad`` repeats the edge (``replicate``) or
    adds zeros -- without materialising the padded map.

    ``y`` is ``(B, D, H, W)`` (typically the NCHW view of a channels-last map). The convolution runs with
    its own zero padding; for ``replicate`` the padded ring's actual values are then added back through
    the few outputs that read them: row 0 and column 0 always, the last row / column when H / W is odd
    (a 3x3/2 window never reads the bottom / right pad of an even side). The ring is split into disjoint
    strips (top and bottom rows with their corners, left and right columns without), each convolved with
    the kernel row / column that reads it. Same result as the padded copy up to float rounding
    (tests/test_perf_api.py), about 10x faster on a 56x56x768 map, where the copy dominated.
    """
    d = y.shape[1]
    if weight is None:  # the average pool is the fixed 1/9 depthwise conv (count_include_pad)
        out = F.avg_pool2d(y, 3, 2, 1, count_include_pad=True)
        if not replicate:
            return out
        weight, groups = y.new_full((d, 1, 3, 3), 1.0 / 9.0), d
    else:
        groups = d if weight.shape[1] == 1 else 1
        out = F.conv2d(y, weight, bias, 2, 1, 1, groups)
        if not replicate:
            return out
    h, w = y.shape[-2:]

    def row(r: int, k: int) -> torch.Tensor:  # padded row (edge values, corners included) x kernel row k
        return F.conv2d(F.pad(y[:, :, r:r + 1 if r >= 0 else None], (1, 1, 0, 0), mode="replicate"),
                        weight[:, :, k:k + 1], None, (1, 2), 0, 1, groups)

    def col(c: int, k: int) -> torch.Tensor:  # padded column without its corners x kernel column k
        return F.conv2d(F.pad(y[..., c:c + 1 if c >= 0 else None], (0, 0, 1, 1)), weight[..., k:k + 1],
                        None, (2, 1), 0, 1, groups)

    out[:, :, :1] += row(0, 0)
    out[..., :1] += col(0, 0)
    if h % 2:
        out[:, :, -1:] += row(-1, 2)
    if w % 2:
        out[..., -1:] += col(-1, 2)
    return out


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
      * ``subconv``: the stride-2 subsample ``x[:, ::2, ::2]`` (the centre tap of a 3x3/2 window with
        1-pixel padding, so it lines up with the conv) + a parallel 3x3/2 conv initialised to zero: a fresh
        model keeps exactly the tokens at even positions, i.e. whole phases of a phase-attention stage.
        :meth:`reparameterize` merges it into one conv (centre weight + 1), exact at every border because
        the centre tap never reads the padding.
        ``tap=1`` keeps inputs ``2j + 1`` instead (the window's tap after the centre; the last one of an odd
        side reads the padding), which is how ``sub_phase`` picks the phase that survives.
      * ``sub``: the subsample alone (parameter-free).

    ``padding`` (3x3 kinds): ``zeros`` pads with zeros, which the average counts, so the first row and
    column of the output (which read one padded row/column) shrink by up to 4/9 at a corner while the
    last ones (for even sizes) do not; ``replicate`` repeats the edge tokens instead. Either way the
    pool is a fixed 1/9 conv over the padded map, so :meth:`reparameterize` stays exact.
    """

    def __init__(self, kind: str, dim: int, conv: str = "depthwise", padding: str = "zeros", tap: int = 0):
        super().__init__()
        self.kind = kind
        self.tap = tap  # sub/subconv: 0 keeps input 2j (the window's centre), 1 keeps 2j + 1
        self.conv_kind = conv
        self.padding = padding
        self.dim = dim
        self.conv: nn.Conv2d | None = None
        if kind in ("avgconv", "conv", "subconv"):
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
        elif self.kind == "sub":
            if self.tap:
                y = F.pad(y, (0, 1, 0, 1), mode="replicate" if self.padding == "replicate" else "constant")
            out = y[:, :, self.tap::2, self.tap::2][:, :, : (x.shape[1] + 1) // 2, : (x.shape[2] + 1) // 2]
        elif self.kind in ("avg", "conv", "avgconv") and not is_graph_capture():
            # eager: no padded copy of the map (see pool3x3s2)
            rep = self.padding == "replicate"
            out = None
            if self.kind in ("avg", "avgconv"):
                out = pool3x3s2(y, None, None, replicate=rep)
            if self.kind in ("conv", "avgconv"):
                c = pool3x3s2(y, self.conv.weight, self.conv.bias, replicate=rep)
                out = c if out is None else out.add_(c)
        else:
            # graph capture, subconv: one explicit 1-pixel pad serves the pool and the conv (3x3/2, padding 0)
            y = F.pad(y, (1, 1, 1, 1), mode="replicate" if self.padding == "replicate" else "constant")
            if self.kind == "avg":
                out = F.avg_pool2d(y, 3, 2, 0)
            elif self.kind == "conv":
                out = self.conv(y)
            elif self.kind == "subconv":
                o, h, w = 1 + self.tap, (x.shape[1] + 1) // 2, (x.shape[2] + 1) // 2
                out = y[:, :, o : o + 2 * h - 1 : 2, o : o + 2 * w - 1 : 2] + self.conv(y)
            else:
                out = F.avg_pool2d(y, 3, 2, 0) + self.conv(y)
        return out.permute(0, 2, 3, 1)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the fixed branch into the conv: ``avgconv`` (the pool is a constant 1/9 kernel) and ``subconv``
        (the subsample is a centre-tap kernel of 1) become ``conv`` with identical output."""
        if self.kind not in ("avgconv", "subconv"):
            return
        w = self.conv.weight
        idx = torch.arange(self.dim, device=w.device)
        rows = slice(None) if self.conv_kind == "depthwise" else idx
        cols = 0 if self.conv_kind == "depthwise" else idx
        if self.kind == "avgconv":
            w[rows, cols] += 1.0 / 9.0
        else:
            w[rows, cols, 1 + self.tap, 1 + self.tap] += 1.0
        self.kind = "conv"

    def extra_repr(self) -> str:
        tap = f", tap={self.tap}" if self.kind in ("sub", "subconv") and self.tap else ""
        return f"kind={self.kind}, conv={self.conv_kind if self.conv is not None else None}, padding={self.padding}{tap}"
