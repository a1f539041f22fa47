"""One Attention and one Block serve every stage of every model in hpvit.

Tensor layouts:
  * A *sequence* is ``(B, L, D)`` (plain ViT tokens, possibly with class/register tokens first).
  * A *map* is ``(B, H, W, D)``: channels last, row-major, so ``map.reshape(B, H * W, D)`` is the
    sequence of the same tokens without a copy.
Global attention (``window_size=None``) accepts either. Window attention needs a map: it pads H and W
up to multiples of the window (padded keys are masked out, so padding never changes a real token's
output), partitions into ``ws x ws`` windows with one copy, attends inside each window with an additive
relative-position bias, and copies back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


def relative_position_index(ws: int) -> torch.Tensor:
    """``(ws*ws, ws*ws)`` index into a ``((2ws-1)^2, heads)`` table, Swin's convention."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)
    return rel[0] * (2 * ws - 1) + rel[1]


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

    def rel_pos_bias(self) -> torch.Tensor | None:
        """``(heads, N, N)`` additive bias for one window, or None."""
        if self.rel_pos_table is None:
            return None
        n = self.window_size * self.window_size
        return self.rel_pos_table[self.rel_pos_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None, groups: int = 1) -> torch.Tensor:
        """Attention over sequences ``x: (B', N, D)``; ``mask`` is added to the logits.

        With ``groups > 1`` the batch is ``(B, groups)`` flattened and ``mask`` is ``(groups, heads|1, N, N)``
        (one per window position), broadcast over B without materialising it per image.
        """
        bn, n, d = x.shape
        qkv = self.qkv(x).view(bn, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if groups > 1:
            q, k, v = (t.view(bn // groups, groups, *t.shape[1:]) for t in (q, k, v))
        if mask is not None:
            mask = mask.to(q.dtype)
        drop = self.attn_drop if self.training else 0.0
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                attn = attn + mask
            attn = attn.softmax(dim=-1)
            if drop:
                attn = F.dropout(attn, drop)
            out = attn @ v
        if groups > 1:
            out = out.flatten(0, 1)
        out = out.transpose(1, 2).reshape(bn, n, d)
        return self.proj_drop(self.proj(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window_size is None:
            if x.ndim == 4:
                b, h, w, d = x.shape
                return self._attend(x.reshape(b, h * w, d), None).view(b, h, w, d)
            return self._attend(x, None)
        if x.ndim != 4:
            raise ValueError("window attention needs a (B, H, W, D) map, got a sequence")
        b, h, w, d = x.shape
        ws = self.window_size
        ph, pw = (-h) % ws, (-w) % ws
        bias = self.rel_pos_bias()
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            valid = torch.zeros(hp, wp, dtype=torch.bool, device=x.device)
            valid[:h, :w] = True
            key_ok = window_partition(valid.view(1, hp, wp, 1), ws).view(-1, 1, 1, ws * ws)  # (nW, 1, 1, N)
            mask = torch.zeros(key_ok.shape, dtype=torch.float32, device=x.device).masked_fill(~key_ok, float("-inf"))
            if bias is not None:
                mask = mask + bias.unsqueeze(0)
            out = self._attend(window_partition(x, ws), mask, groups=key_ok.shape[0])
            return window_unpartition(out, ws, b, hp, wp)[:, :h, :w].contiguous()
        out = self._attend(window_partition(x, ws), None if bias is None else bias.unsqueeze(0))
        return window_unpartition(out, ws, b, h, w)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, window={self.window_size}, rel_pos={self.rel_pos_table is not None}"


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

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
    ):
        super().__init__()
        self.downsample = downsample
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias,
            window_size=window_size, rel_pos=rel_pos, norm_eps=norm_eps, fused=fused_attn,
        )
        self.ls1 = LayerScale(dim) if layerscale else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden, act=act, bias=mlp_bias)
        self.ls2 = LayerScale(dim) if layerscale else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
