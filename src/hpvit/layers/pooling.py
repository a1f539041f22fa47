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
      * ``subavg``: ``sub + g * (avg - sub)`` with a per-channel gate ``g`` (``gate``, ``(D,)``) initialised to
        zero (ReZero / LayerScale style): a fresh model keeps the subsample exactly, and as ``g`` grows the
        pool moves toward the paper's 3x3/2 average (``g = 1``: ``avg``), mixing the neighbouring phases.
        The branch is fixed and well-scaled; only ``D`` numbers learn. :meth:`reparameterize` merges it
        into one depthwise conv (``g / 9`` on every tap, ``+ 1 - g`` on the subsample's tap), exact.
      * ``subgconv``: ``sub + g * conv3x3/2(x)``, the gated ``subconv``: the zero gate keeps the start exact,
        and the conv starts at the ``avg - sub`` kernel (so at first it grows like ``subavg``; a zero conv
        behind a zero gate would get no gradient) and is free to learn. :meth:`reparameterize` scales the
        conv by ``g`` per output channel and adds 1 to the subsample's tap, exact.

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
        self.gate: nn.Parameter | None = None
        if kind in ("avgconv", "conv", "subconv", "subgconv"):
            groups = dim if conv == "depthwise" else 1
            self.conv = nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=0, groups=groups, bias=True)
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)
        if kind in ("subavg", "subgconv"):
            self.gate = nn.Parameter(torch.zeros(dim))
        if kind == "subgconv":  # the avg - sub kernel: the direction subavg grows in
            with torch.no_grad():
                self._diagonal(self.conv.weight)[...] = 1.0 / 9.0
                self._diagonal(self.conv.weight)[:, 1 + tap, 1 + tap] -= 1.0

    def _diagonal(self, w: torch.Tensor) -> torch.Tensor:
        """The ``(D, 3, 3)`` kernels that map each channel to itself (all of a depthwise conv), as a view."""
        return w[:, 0] if w.shape[1] == 1 else w.diagonal(dim1=0, dim2=1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 3, 1, 2)  # NCHW view of channels-last memory: no copy
        if self.kind == "max":
            out = F.max_pool2d(y, 2, 2, ceil_mode=True)
        elif self.kind == "gap":
            out = y.mean(dim=(2, 3), keepdim=True)
        elif self.kind in ("sub", "subavg", "subgconv"):
            out = y
            if self.tap:
                out = F.pad(y, (0, 1, 0, 1), mode="replicate" if self.padding == "replicate" else "constant")
            out = out[:, :, self.tap::2, self.tap::2][:, :, : (x.shape[1] + 1) // 2, : (x.shape[2] + 1) // 2]
            if self.gate is not None:  # subavg / subgconv: the gated branch
                mix = self._window3x3(y, self.kind == "subgconv")
                out = out + self.gate.view(1, -1, 1, 1).to(out.dtype) * (mix - out if self.kind == "subavg" else mix)
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

    def _window3x3(self, y: torch.Tensor, conv: bool) -> torch.Tensor:
        """The 3x3/2 average (``conv=False``) or ``self.conv`` over the 1-pixel padded NCHW map ``y``: eager without
        a padded copy (:func:`pool3x3s2`), one explicit pad under graph capture."""
        rep = self.padding == "replicate"
        if not is_graph_capture():
            return pool3x3s2(y, self.conv.weight if conv else None, self.conv.bias if conv else None, replicate=rep)
        y = F.pad(y, (1, 1, 1, 1), mode="replicate" if rep else "constant")
        return self.conv(y) if conv else F.avg_pool2d(y, 3, 2, 0)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the fixed branch into the conv: ``avgconv`` (the pool is a constant 1/9 kernel), ``subconv``
        (the subsample is a one-tap kernel of 1), ``subavg`` (a new depthwise conv: ``g / 9`` everywhere plus
        ``1 - g`` on the subsample's tap) and ``subgconv`` (the conv scaled by ``g`` per output channel, plus 1
        on the tap) become ``conv`` with identical output."""
        if self.kind not in ("avgconv", "subconv", "subavg", "subgconv"):
            return
        if self.kind == "subavg":
            g = self.gate.detach()
            self.conv = nn.Conv2d(self.dim, self.dim, 3, stride=2, padding=0, groups=self.dim, bias=True).to(g)
            self.conv.weight.copy_((g / 9.0).view(-1, 1, 1, 1).expand_as(self.conv.weight))
            self.conv.weight[:, 0, 1 + self.tap, 1 + self.tap] += 1.0 - g
            self.conv.bias.zero_()
            self.conv_kind = "depthwise"
        else:
            w = self.conv.weight
            if self.kind == "subgconv":
                w.mul_(self.gate.view(-1, 1, 1, 1))
                self.conv.bias.mul_(self.gate)
            if self.kind == "avgconv":
                self._diagonal(w)[...] += 1.0 / 9.0
            else:
                self._diagonal(w)[:, 1 + self.tap, 1 + self.tap] += 1.0
        self.gate = None
        self.kind = "conv"

    def extra_repr(self) -> str:
        tap = f", tap={self.tap}" if self.kind.startswith("sub") and self.tap else ""
        return f"kind={self.kind}, conv={self.conv_kind if self.conv is not None else None}, padding={self.padding}{tap}"
