"""One Attention and one Block serve every stage of every model in hpvit.

Tensor layouts:
  * A *sequence* is ``(B, L, D)`` (plain ViT tokens, possibly with class/register tokens first).
  * A *map* is ``(B, H, W, D)``: channels last, row-major, so ``map.reshape(B, H * W, D)`` is the
    sequence of the same tokens without a copy.
Global attention (``window_size=None``) accepts either. A map no larger than the window is one window of
the map's size (the padded window's numbers, without the padding). Otherwise window attention pads H and W
up to multiples of the window (padded keys are masked out, so padding never changes a real token's
output), partitions into ``ws x ws`` windows with one copy, attends inside each window with an additive
relative-position bias, and copies back.

Inference (no autograd, no graph capture) works a chunk at a time so that no intermediate is much larger than
the map itself: blocks update a fresh copy of their input in place, a few sequences (windows, phases) at a
time, and global attention on a phase grid builds its relative-position bias for a block of query rows at a
time instead of the whole ``(heads, N, N)`` tensor. Training and graph capture (export, torch.fx,
``torch.compile``) take the plain formulation, with the whole bias.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .capture import is_graph_capture

# Inference on CPU works through large maps this many bytes of MLP hidden activations at a time (tokens per
# chunk = CHUNK_BYTES / (4 * mlp_hidden): 2048 for ViT-B). Buffers this small are recycled by the C allocator
# instead of being mmap-ed and page-faulted afresh (glibc mmaps blocks > 32 MiB).
CHUNK_BYTES = 24 * 2**20

# Inference builds the phase-grid bias (plus any key mask added to it) this many bytes of query rows at a time.
BIAS_CHUNK_BYTES = 16 * 2**20


def add_masks(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Sum of two broadcastable additive attention masks, either of which may be None."""
    if a is None:
        return b
    return a if b is None else a + b


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``(B, H, W, D)`` with H, W multiples of ``ws`` -> ``(B * nH * nW, ws * ws, D)``, windows in row-major order."""
    b, h, w, d = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // ws) * (w // ws), ws * ws, d)


def window_unpartition(x: torch.Tensor, ws: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nH * nW, ws * ws, D)`` -> ``(B, H, W, D)``."""
    d = x.shape[-1]
    x = x.view(b, h // ws, w // ws, ws, ws, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, d)


def _pad_to_multiple(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A map ``(B, H, W, D)`` zero-padded at the bottom/right to multiples of ``m``, and its ``(H', W')`` bool
    mask of real tokens (``None`` when nothing was padded)."""
    h, w = x.shape[1], x.shape[2]
    ph, pw = (-h) % m, (-w) % m
    if not (ph or pw):
        return x, None
    valid = torch.zeros(h + ph, w + pw, dtype=torch.bool, device=x.device)
    valid[:h, :w] = True
    return F.pad(x, (0, 0, 0, pw, 0, ph)), valid


def pad_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(B, H, W, D)`` -> windows ``(B * nW, ws * ws, D)`` (always a fresh tensor) and ``key_ok``.

    H and W are zero-padded up to multiples of ``ws`` first; ``key_ok`` is ``(nW, ws * ws)`` bool, True
    for real tokens (``None`` when nothing was padded). Window ``j`` of image ``b`` is row ``b * nW + j``.
    """
    x, valid = _pad_to_multiple(x, ws)
    key_ok = None if valid is None else window_partition(valid.view(1, *valid.shape, 1), ws).view(-1, ws * ws)
    xw = window_partition(x, ws)
    if xw._base is not None:  # a single window per image: reshape returned a view; callers may write in place
        xw = xw.clone()
    return xw, key_ok


def unpartition_crop(xw: torch.Tensor, ws: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pad_partition`: windows -> ``(B, H, W, D)`` map with the padding cropped."""
    hp, wp = h + (-h) % ws, w + (-w) % ws
    x = window_unpartition(xw, ws, b, hp, wp)
    if hp != h or wp != w:
        x = x[:, :h, :w].contiguous()
    return x


def phase_partition(x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Space to batch: a map ``(B, H, W, D)`` -> its ``r x r`` phases ``(B * r * r, Hp, Wp, D)`` and ``valid``.

    Phase ``(a, c)`` holds the tokens at rows ``a, a + r, ...`` and columns ``c, c + r, ...``; row
    ``b * r * r + a * r + c`` of the result is phase ``(a, c)`` of image ``b``, its own row-major map of
    ``Hp = ceil(H / r)`` rows. H and W are zero-padded up to multiples of ``r`` first; ``valid`` is
    ``(r * r, Hp, Wp)`` bool, True for real tokens (``None`` when nothing was padded). One copy.
    """
    b, d = x.shape[0], x.shape[3]
    x, m = _pad_to_multiple(x, r)
    hp, wp = x.shape[1] // r, x.shape[2] // r
    valid = None if m is None else m.view(hp, r, wp, r).permute(1, 3, 0, 2).reshape(r * r, hp, wp)
    x = x.view(b, hp, r, wp, r, d).permute(0, 2, 4, 1, 3, 5).reshape(b * r * r, hp, wp, d)
    return x, valid


def phase_unpartition(x: torch.Tensor, r: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`phase_partition`: ``(B * r * r, Hp, Wp, D)`` -> the map ``(B, H, W, D)`` (padding cropped)."""
    _, hp, wp, d = x.shape
    x = x.view(b, r, r, hp, wp, d).permute(0, 3, 1, 4, 2, 5).reshape(b, hp * r, wp * r, d)
    if hp * r != h or wp * r != w:
        x = x[:, :h, :w]
    return x.contiguous()


def valid_partition(valid: torch.Tensor, ws: int) -> torch.Tensor:
    """Phase validity ``(G, H, W)`` bool -> per-window key validity ``(G * nW, ws * ws)`` after the same
    zero padding to multiples of ``ws`` that :func:`pad_partition` applies (padding is invalid)."""
    g, h, w = valid.shape
    v = F.pad(valid.view(g, h, w, 1), (0, 0, 0, (-w) % ws, 0, (-h) % ws))
    return window_partition(v, ws).view(-1, ws * ws)


def grid_index_rows(h: int, w: int, g: int, start: int, stop: int, device=None) -> torch.Tensor:
    """Rows ``start .. stop-1`` (query tokens, row-major on an ``h x w`` grid) of the ``(h*w, h*w)`` index into a
    ``((2g-1)^2, heads)`` relative-position table (Swin's convention), offsets beyond the table's reach ``g - 1``
    clamped to its edge: ``(stop - start, h*w)`` int64."""
    q = torch.arange(start, stop, device=device)
    k = torch.arange(h * w, device=device)
    dy = ((q // w)[:, None] - (k // w)[None, :]).clamp(-(g - 1), g - 1) + g - 1
    dx = ((q % w)[:, None] - (k % w)[None, :]).clamp(-(g - 1), g - 1) + g - 1
    return dy * (2 * g - 1) + dx


@functools.lru_cache(maxsize=8)
def _cached_grid_index(h: int, w: int, g: int) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor even when first asked for inside inference_mode
        return grid_index_rows(h, w, g, 0, h * w)


def grid_position_index(h: int, w: int, g: int) -> torch.Tensor:
    """``(h*w, h*w)`` index into a ``((2g-1)^2, heads)`` relative-position table for an ``h x w`` grid (see
    :func:`grid_index_rows`). Cached (CPU; do not modify) in eager mode only: while a graph is captured (export,
    torch.fx, ``torch.compile``) it is built afresh, so the cache never holds a value created by a trace."""
    if is_graph_capture():
        return grid_index_rows(h, w, g, 0, h * w)
    return _cached_grid_index(h, w, g)


def relative_position_index(ws: int) -> torch.Tensor:
    """``(ws*ws, ws*ws)`` index into a ``((2ws-1)^2, heads)`` table, Swin's convention."""
    return grid_position_index(ws, ws, ws).clone()


class Attention(nn.Module):
    """Multi-head self-attention, global or windowed. Parameter names follow timm's ViT (``qkv``,
    ``proj``, ``q_norm``, ``k_norm``) so plain checkpoints load unchanged; windowed attention adds
    ``rel_pos_table`` (zero-initialised, so a fresh model attends exactly as the plain one inside a window).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        window_size: int | None = None,
        rel_pos: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-6,
        fused: bool = True,
        rel_pos_grid: int | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = window_size
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rel_pos_table: nn.Parameter | None = None
        if window_size is not None and rel_pos:
            self.rel_pos_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
            self.register_buffer("rel_pos_index", relative_position_index(window_size), persistent=False)
        self.rel_pos_grid = None
        if window_size is None and rel_pos and rel_pos_grid:
            # global attention on a phase grid: a zero-initialised bias over relative offsets up to the grid
            # of the config's image size; larger grids (bigger inputs) clamp the offsets to the table's edge
            self.rel_pos_grid = int(rel_pos_grid)
            self.rel_pos_table = nn.Parameter(torch.zeros((2 * self.rel_pos_grid - 1) ** 2, num_heads))

    def rel_pos_bias(self) -> torch.Tensor | None:
        """``(heads, N, N)`` additive bias for one window, or None."""
        if self.rel_pos_table is None or self.window_size is None:
            return None
        n = self.window_size * self.window_size
        return self.rel_pos_table[self.rel_pos_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def grid_bias(self, h: int, w: int, prefix: int = 0, rows: "tuple[int, int] | None" = None) -> torch.Tensor | None:
        """``(1, heads, R, P + h*w)`` bias of global attention on an ``h x w`` phase grid whose sequence starts with
        ``prefix`` tokens (class/register: no bias to or from them), for the query rows ``rows = (start, stop)``
        of that sequence (default: all, ``R = P + h*w``); None without a grid table."""
        if self.rel_pos_grid is None:
            return None
        n = prefix + h * w
        start, stop = (0, n) if rows is None else rows
        gs, ge = max(start - prefix, 0), max(stop - prefix, 0)
        if rows is None:
            idx = grid_position_index(h, w, self.rel_pos_grid).to(self.rel_pos_table.device)
        else:
            idx = grid_index_rows(h, w, self.rel_pos_grid, gs, ge, self.rel_pos_table.device)
        bias = self.rel_pos_table[idx.view(-1)].view(ge - gs, h * w, self.num_heads).permute(2, 0, 1)
        if prefix:
            bias = F.pad(bias, (prefix, 0, min(stop, prefix) - min(start, prefix), 0))
        return bias.unsqueeze(0)

    def map_bias(self, h: int, w: int) -> torch.Tensor | None:
        """``(1, heads, h*w, h*w)`` bias for a map that fits in one window (``h, w <= window_size``): the
        entries of :meth:`rel_pos_bias` between the map's positions, as padding puts them (top left)."""
        bias = self.rel_pos_bias()
        if bias is None:
            return None
        ws = self.window_size
        idx = (torch.arange(h, device=bias.device)[:, None] * ws + torch.arange(w, device=bias.device)[None, :]).flatten()
        return bias[:, idx][:, :, idx].unsqueeze(0)

    def window_mask(self, key_ok: torch.Tensor | None) -> torch.Tensor | None:
        """Additive logits mask for windowed attention: the relative-position bias ``(1, heads, N, N)``
        plus ``-inf`` on padded keys, ``(nW, heads|1, N, N)`` when ``key_ok`` (``(nW, N)``) is given."""
        bias = self.rel_pos_bias()
        if key_ok is None:
            return None if bias is None else bias.unsqueeze(0)
        pad = torch.zeros(key_ok.shape, dtype=torch.float32, device=key_ok.device).masked_fill(~key_ok, float("-inf"))
        pad = pad[:, None, None, :]
        return pad if bias is None else pad + bias.unsqueeze(0)

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None, groups: int = 1,
                grid: "tuple[int, int, int] | None" = None) -> torch.Tensor:
        """Attention over sequences ``x: (B', N, D)``; ``mask`` is added to the logits.

        With ``groups > 1`` the batch is ``(B, groups)`` flattened and ``mask`` is ``(groups, heads|1, N|1, N)``
        (one per window position or phase), broadcast over B without materialising it per image. ``grid =
        (h, w, prefix)``: the sequences are ``prefix`` tokens and an ``h x w`` phase grid, and the block's
        phase-grid bias (:meth:`grid_bias`) is added too; in inference it is built for a block of query rows
        at a time (:data:`BIAS_CHUNK_BYTES`), never for all ``N x N`` pairs at once.
        """
        bn, n, d = x.shape
        qkv = self.qkv(x).view(bn, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if groups > 1:
            q, k, v = (t.view(bn // groups, groups, *t.shape[1:]) for t in (q, k, v))
        if grid is not None and self.rel_pos_grid is None:
            grid = None
        if grid is not None and (torch.is_grad_enabled() or is_graph_capture()):
            mask, grid = add_masks(mask, self.grid_bias(*grid)), None  # autograd and exporters: the whole bias
        if mask is not None:
            mask = mask.to(q.dtype)
        drop = self.attn_drop if self.training else 0.0
        if grid is None:
            out = self._weights_times_v(q, k, v, mask, drop)
        else:
            out = torch.empty_like(q)
            rows = 1 if mask is None else mask.shape[0]
            step = max(1, BIAS_CHUNK_BYTES // (4 * n * self.num_heads * rows))
            for i in range(0, n, step):
                j = min(n, i + step)
                m = self.grid_bias(*grid, rows=(i, j)).to(q.dtype)
                if mask is not None:
                    m = m + (mask if mask.shape[-2] == 1 else mask[..., i:j, :])
                out[..., i:j, :] = self._weights_times_v(q[..., i:j, :], k, v, m, drop)
        if groups > 1:
            out = out.flatten(0, 1)
        out = out.transpose(1, 2).reshape(bn, n, d)
        return self.proj_drop(self.proj(out))

    def _weights_times_v(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         drop: float) -> torch.Tensor:
        """``softmax(q k^T * scale + mask) v`` for ``(..., heads, Nq, hd)`` queries and ``(..., heads, N, hd)`` keys."""
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            attn = attn + mask
        attn = attn.softmax(dim=-1)
        if drop:
            attn = F.dropout(attn, drop)
        return attn @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window_size is None:
            if x.ndim == 4:
                b, h, w, d = x.shape
                return self._attend(x.reshape(b, h * w, d), None, grid=(h, w, 0)).view(b, h, w, d)
            return self._attend(x, None)
        if x.ndim != 4:
            raise ValueError("window attention needs a (B, H, W, D) map, got a sequence")
        b, h, w, d = x.shape
        ws = self.window_size
        if h <= ws and w <= ws:
            # the map fits in one window: that window is the map (no padding, no masked keys). The numbers
            # are those of the padded window exactly (padded keys are masked, padded queries cropped), at
            # h*w instead of ws*ws tokens; without rel_pos this is global attention.
            return self._attend(x.reshape(b, h * w, d), self.map_bias(h, w)).view(b, h, w, d)
        xw, key_ok = pad_partition(x, ws)
        mask = self.window_mask(key_ok)
        groups = 1 if key_ok is None else key_ok.shape[0]
        return unpartition_crop(self._attend(xw, mask, groups=groups), ws, b, h, w)

    def extra_repr(self) -> str:
        grid = f", rel_pos_grid={self.rel_pos_grid}" if self.rel_pos_grid else ""
        return f"heads={self.num_heads}, window={self.window_size}, rel_pos={self.rel_pos_table is not None}{grid}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act_name = act
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.act_name == "quick_gelu":
            x = x * torch.sigmoid(1.702 * x)
        elif self.act_name == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        elif not torch.is_grad_enabled():
            x = torch.ops.aten.gelu_(x)  # inference: no new (B, L, 4D) buffer
        else:
            x = F.gelu(x)
        return self.fc2(self.drop(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, images: int | None = None) -> torch.Tensor:
        """``images``: how many images the leading dim holds (default: one per row); windows
        ``(B * nW, N, D)`` pass ``images=B`` so that a whole image's windows are dropped together."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        n = x.shape[0] if images is None else images
        shape = (n,) + (1,) * x.ndim
        return (x.view(n, -1, *x.shape[1:]) * x.new_empty(shape).bernoulli_(keep).div_(keep)).view_as(x)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block (timm names: ``norm1, attn, ls1, norm2, mlp, ls2``), with an
    optional ``downsample`` (a :class:`~hpvit.layers.pooling.Downsample`) applied to its input: the
    pooling layer that starts a stage belongs to the block it feeds, so for layer-wise lr decay and
    checkpoint names it shares that block's index.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        mlp_bias: bool = True,
        layerscale: bool = False,
        window_size: int | None = None,
        rel_pos: bool = True,
        drop_path: float = 0.0,
        act: str = "gelu",
        norm_eps: float = 1e-6,
        fused_attn: bool = True,
        downsample: nn.Module | None = None,
        rel_pos_grid: int | None = None,
    ):
        super().__init__()
        self.downsample = downsample
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias,
            window_size=window_size, rel_pos=rel_pos, norm_eps=norm_eps, fused=fused_attn, rel_pos_grid=rel_pos_grid,
        )
        self.ls1 = LayerScale(dim) if layerscale else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden, act=act, bias=mlp_bias)
        self.ls2 = LayerScale(dim) if layerscale else nn.Identity()
        self.drop_path2 = DropPath(drop_path)
        # phase attention (set by the hierarchical model): on a map, attend among the tokens of each of the
        # phase x phase phases (positions equal modulo ``phase``) as separate maps; 1 = attend on the map
        self.phase = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.phase > 1 and x.ndim == 4:
            return self.forward_phases(x)
        return self.forward_map(x)

    def forward_phases(self, x: torch.Tensor) -> torch.Tensor:
        """The block (without ``downsample``) on a map ``(B, H, W, D)`` with phase attention: one permutation
        to the phase batch (:func:`phase_partition`), the block on each phase's map, one permutation back.
        H and W must be multiples of ``phase`` (the model's own runner also handles the padded case)."""
        b, h, w, _ = x.shape
        if h % self.phase or w % self.phase:
            raise ValueError(
                f"phase attention with {self.phase} phases per side needs a map whose sides are multiples of "
                f"{self.phase}, got {h}x{w}; use image sides that are multiples of the patch size"
            )
        xp, _ = phase_partition(x, self.phase)
        return phase_unpartition(self.forward_map(xp), self.phase, b, h, w)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """The block without ``downsample`` on a map ``(B, H, W, D)`` (or a sequence): window attention
        pads and crops inside, so the MLP only ever sees real tokens. Inference (eval mode, no autograd, no
        graph capture) takes :meth:`forward_map_`: the same numbers, a chunk at a time."""
        if not self.training and not torch.is_grad_enabled() and not is_graph_capture():
            if x.ndim == 4 or self.attn.window_size is None:
                return self.forward_map_(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    @property
    def chunk_tokens(self) -> int:
        """Tokens per inference chunk on CPU (:data:`CHUNK_BYTES` of MLP hidden activations)."""
        return max(1, CHUNK_BYTES // (4 * self.mlp.fc1.out_features))

    @torch.no_grad()
    def forward_map_(self, x: torch.Tensor) -> torch.Tensor:
        """Inference version of :meth:`forward_map` (``x`` is left as it is; one new map is returned): a windowed
        block attends one band of windows (``ws`` rows of the map) of a few images at a time, padding only that
        band, and adds it to the new map; then the MLP runs on the real tokens, a chunk at a time. A global block
        (or a map inside one window) runs :meth:`forward_tokens_` on the map's token sequence. Chunks on CPU only."""
        attn, cpu = self.attn, x.device.type == "cpu"
        ws = attn.window_size
        if x.ndim == 3:
            return self.forward_tokens_(x, None, self.chunk_tokens if cpu else 0)
        b, h, w, d = x.shape
        if ws is None:
            return self.forward_tokens_(x.reshape(b, h * w, d), None, self.chunk_tokens if cpu else 0,
                                        grid=(h, w, 0)).view(b, h, w, d)
        if h <= ws and w <= ws:
            t = x.reshape(b, h * w, d).clone()
            rows = max(1, self.chunk_tokens // (h * w)) if cpu else 0
            return self.forward_tokens_(t, attn.map_bias(h, w), rows).view(b, h, w, d)
        y = x.clone(memory_format=torch.contiguous_format)
        per = max(1, self.chunk_tokens // (ws * (w + (-w) % ws))) if cpu else b  # images per chunk of a band
        for i in range(0, h, ws):  # a band of ws rows: one row of windows
            for j in range(0, b, per):
                band = x[j : j + per, i : i + ws]
                xw, key_ok = pad_partition(self.norm1(band), ws)
                a = attn._attend(xw, attn.window_mask(key_ok), 1 if key_ok is None else key_ok.shape[0])
                y[j : j + per, i : i + ws] += self.ls1(unpartition_crop(a, ws, band.shape[0], band.shape[1], w))
        self._mlp_(y.view(-1, d), self.chunk_tokens if cpu else 0)
        return y

    def _mlp_(self, flat: torch.Tensor, chunk: int) -> None:
        """The MLP residual on tokens ``(T, D)`` in place, ``chunk`` tokens at a time (0 = all at once)."""
        step = chunk if chunk > 0 else flat.shape[0]
        for i in range(0, flat.shape[0], step):
            xc = flat[i : i + step]
            xc += self.drop_path2(self.ls2(self.mlp(self.norm2(xc))))

    def forward_tokens(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, groups: int = 1, images: int | None = None,
        keep: "tuple[torch.Tensor, torch.Tensor] | None" = None, grid: "tuple[int, int, int] | None" = None,
    ) -> torch.Tensor:
        """The block (without ``downsample``) on sequences ``(B', N, D)``, each attended on its own:
        a global block gets ``(B, L, D)``, a windowed one the windows ``(B * nW, ws * ws, D)`` of
        :func:`pad_partition` with ``mask = attn.window_mask(key_ok)`` (``groups = nW`` when padded)
        and ``images = B`` (stochastic depth drops whole images). ``keep``: stochastic depth already drawn,
        one ``(B',)`` factor per sequence for each residual branch (0 or 1/(1-p); see :meth:`draw_keep`), so
        that the windows of one image can run in separate chunks and still share their image's draw. ``grid``:
        global attention on phase grids (see :meth:`Attention._attend`)."""
        if keep is None:
            x = x + self.drop_path1(self.ls1(self.attn._attend(self.norm1(x), mask, groups, grid)), images)
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))), images)
        k1, k2 = (k.view(-1, 1, 1).to(x.dtype) for k in keep)
        x = x + self.ls1(self.attn._attend(self.norm1(x), mask, groups, grid)) * k1
        return x + self.ls2(self.mlp(self.norm2(x))) * k2

    def draw_keep(self, images: int, rows_per_image: int, like: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """Stochastic depth of both residual branches for ``images`` images, drawn now (the same random
        numbers, in the same order, :meth:`forward_tokens` would draw), repeated for each image's
        ``rows_per_image`` sequences: two ``(images * rows_per_image,)`` tensors of 0 or 1/(1-p)."""
        out = []
        for dp in (self.drop_path1, self.drop_path2):
            if dp.p == 0.0 or not self.training:
                out.append(like.new_ones(images * rows_per_image))
                continue
            k = like.new_empty((images, 1, 1, 1)).bernoulli_(1.0 - dp.p).div_(1.0 - dp.p)
            out.append(k.view(images).repeat_interleave(rows_per_image))
        return out[0], out[1]

    @torch.no_grad()
    def forward_tokens_(self, x: torch.Tensor, mask: torch.Tensor | None = None, chunk: int = 0,
                        groups: int = 1, grid: "tuple[int, int, int] | None" = None) -> torch.Tensor:
        """Inference version of :meth:`forward_tokens` that works ``chunk`` sequences (windowed) or tokens
        (global) at a time (0 = all at once), so that no intermediate is larger than a chunk's, and adds the
        residuals in place.

        Windowed blocks update ``x`` (windows ``(B * nW, N, D)`` from :func:`pad_partition`, which the
        caller owns) in place; ``mask`` is ``(nW|1, heads|1, N, N)``. Global blocks leave ``x`` untouched
        and return a new tensor; their ``mask`` is ``(groups|1, heads|1, N, N)`` as in :meth:`Attention._attend`
        (phase groups with padded keys), ``grid`` as there. They attend ``chunk // N`` sequences at a time (at
        least one) and run the MLP ``chunk`` tokens at a time. Returns the output.
        """
        if self.attn.window_size is None:
            x = x.clone(memory_format=torch.contiguous_format)
            rows = max(1, chunk // x.shape[1]) if chunk > 0 else x.shape[0]
            for i in range(0, x.shape[0], rows):
                xc = x[i : i + rows]
                m, g = (mask, groups) if xc.shape[0] == x.shape[0] else (self._mask_rows(mask, i, xc.shape[0]), 1)
                xc += self.drop_path1(self.ls1(self.attn._attend(self.norm1(xc), m, g, grid)))
                self._mlp_(xc.view(-1, xc.shape[-1]), chunk)
            return x
        n = x.shape[0]
        step = chunk if 0 < chunk < n else n
        for i in range(0, n, step):
            xc = x[i : i + step]
            m = self._mask_rows(mask, i, xc.shape[0])
            xc += self.drop_path1(self.ls1(self.attn._attend(self.norm1(xc), m, 1)))
            xc += self.drop_path2(self.ls2(self.mlp(self.norm2(xc))))
        return x

    @staticmethod
    def _mask_rows(mask: torch.Tensor | None, start: int, rows: int) -> torch.Tensor | None:
        """The per-window mask rows for windows ``start .. start+rows`` of a flattened ``(B, nW)`` batch."""
        if mask is None or mask.shape[0] == 1:
            return mask
        nw = mask.shape[0]
        idx = torch.arange(start, start + rows, device=mask.device) % nw
        return mask.index_select(0, idx)
