"""The hierarchical ViT transformed from a plain ViT.

Module names mirror timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``norm_pre``, ``blocks.{i}``, ``norm``, ``fc_norm``, ``head``), so every pre-trained tensor keeps its
name. The only new tensors are ``blocks.{i}.downsample.conv.*`` (the pooling layer that starts a
stage lives in the first block of that stage), ``blocks.{i}.attn.rel_pos_table`` and, when the class
count changes, ``head.*``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoints.spec import PlainSpec
from ..config import HPViTConfig, get_config
from ..errors import ConfigError, InputError
from ..layers import Block, Downsample, PatchEmbed, resample_abs_pos_embed


def _as_hw(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class HierarchicalViT(nn.Module):
    """A plain ViT's blocks arranged into stages at decreasing resolution.

    Input ``(B, C, H, W)`` with ``H, W >= min_input_size``. Inside, stages work on channels-last maps
    ``(B, H_s, W_s, D)`` with ``H_0 = floor(H / stride)`` and ``H_{s+1} = ceil(H_s / 2)``; the width
    ``D`` of the plain ViT is kept throughout. The ``identity`` config instead runs the plain ViT's
    token sequence ``(B, prefix + H_0 * W_0, D)`` unchanged.

    Outputs: ``forward`` -> logits ``(B, num_classes)`` (or pooled features when ``num_classes == 0``,
    or the pyramid when ``config.head == "none"``); ``forward_pyramid`` -> one ``(B, D, H_s, W_s)``
    map per stage (channels-last memory); ``forward_features`` -> final normalised map
    ``(B, H_last, W_last, D)`` (or the token sequence for ``identity``).
    """

    def __init__(self, spec: PlainSpec, config: "HPViTConfig | str" = "paper-cls", num_classes: int | None = None):
        super().__init__()
        cfg = get_config(config)
        layout = cfg.resolve(spec.depth)
        self.spec, self.config, self.layout = spec, cfg, layout
        self.embed_dim = self.num_features = d = spec.embed_dim
        self.head_type = cfg.head
        if cfg.head == "auto":
            self.head_type = "token" if (spec.global_pool == "token" and spec.class_token and cfg.keep_prefix_tokens) else "avg"
        if self.head_type == "token" and not (cfg.keep_prefix_tokens and spec.class_token):
            raise ConfigError(
                "head='token' needs the class token, which only the single-stage global layout keeps "
                "(config 'identity'); use head='avg' for hierarchical configs"
            )
        self.num_classes = spec.num_classes if num_classes is None else int(num_classes)
        if self.head_type == "none":
            self.num_classes = 0

        k = spec.patch_size
        stride = cfg.patch_stride or k
        if stride > k:
            raise ConfigError(f"patch_stride {stride} exceeds the patch kernel {k}: pixels would be skipped")
        pad = cfg.patch_padding if cfg.patch_padding is not None else (k - stride) // 2
        self.patch_embed = PatchEmbed(spec.in_chans, d, k, stride, pad, bias=spec.patch_bias)
        self.stride = stride

        # prefix tokens are kept only in all-global layouts (identity); hierarchical configs drop them
        self.keep_prefix = cfg.keep_prefix_tokens
        self.num_prefix_tokens = spec.num_prefix_tokens if self.keep_prefix else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if (self.keep_prefix and spec.class_token) else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, spec.num_reg_tokens, d)) if (self.keep_prefix and spec.num_reg_tokens) else None
        )
        self.no_embed_class = spec.no_embed_class
        self.pos_embed_prefix = self.num_prefix_tokens if (self.keep_prefix and not spec.no_embed_class) else 0
        if spec.pos_grid is None:
            self.pos_grid = None
            self.pos_embed = None
        else:
            if cfg.patch_stride is None or cfg.patch_stride == k:
                self.pos_grid = tuple(spec.pos_grid)
            else:
                ih, iw = _as_hw(cfg.img_size)
                self.pos_grid = self.patch_embed.grid(ih, iw)
            n = self.pos_grid[0] * self.pos_grid[1] + self.pos_embed_prefix
            self.pos_embed = nn.Parameter(torch.zeros(1, n, d))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.norm_pre = nn.LayerNorm(d, eps=spec.norm_eps) if spec.norm_pre else nn.Identity()

        act = cfg.act or spec.act
        dpr = [x.item() for x in torch.linspace(0, cfg.drop_path_rate, spec.depth)]
        stage_starts = {sum(layout.depths[:s]): s for s in range(1, layout.num_stages)}
        blocks = []
        for i in range(spec.depth):
            down = None
            if i in stage_starts:
                kind = cfg.pools[stage_starts[i] - 1]
                if cfg.reparameterized and kind == "avgconv":
                    kind = "conv"
                down = Downsample(kind, d, cfg.pool_conv)
            blocks.append(
                Block(
                    d, spec.num_heads, spec.mlp_hidden, qkv_bias=spec.qkv_bias, qk_norm=spec.qk_norm,
                    proj_bias=spec.proj_bias, mlp_bias=spec.mlp_bias, layerscale=spec.layerscale,
                    window_size=layout.windows[i], rel_pos=cfg.rel_pos, drop_path=dpr[i], act=act,
                    norm_eps=spec.norm_eps, fused_attn=cfg.fused_attn, downsample=down,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d, eps=spec.norm_eps) if spec.final_norm == "norm" else nn.Identity()
        self.fc_norm = nn.LayerNorm(d, eps=spec.norm_eps) if spec.final_norm == "fc_norm" else nn.Identity()
        self.head_proj = nn.Linear(d, spec.proj_dim, bias=False) if spec.proj_dim else None
        self.head_dim_in = spec.proj_dim or d
        self.head = nn.Linear(self.head_dim_in, self.num_classes) if self.num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.grad_checkpointing = False
        self._reuse_report = None

        red = [stride * 2**s for s in range(layout.num_stages)]
        self.feature_info = [
            dict(num_chs=d, reduction=red[s], module=f"blocks.{layout.stage_ends[s]}", stage=s)
            for s in range(layout.num_stages)
        ]

    # ------------------------------------------------------------------ properties
    @property
    def min_input_size(self) -> int:
        """Smallest accepted input side: every stage must have at least one token."""
        k, s, p = self.patch_embed.kernel, self.patch_embed.stride, self.patch_embed.padding
        base = max(k - 2 * p, 1)
        return max(base, s * 2 ** (self.layout.num_stages - 1))

    @property
    def strides(self) -> list[int]:
        return [f["reduction"] for f in self.feature_info]

    # ------------------------------------------------------------------ embedding
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise InputError(f"expected images of shape (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.spec.in_chans:
            raise InputError(f"expected {self.spec.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        m = self.min_input_size
        if x.shape[-2] < m or x.shape[-1] < m:
            raise InputError(
                f"input {x.shape[-2]}x{x.shape[-1]} is smaller than the minimum {m}x{m} of this config "
                f"(patch stride {self.stride}, {self.layout.num_stages} stages); resize or pad the images"
            )

    def _pos_grid(self, h: int, w: int) -> torch.Tensor | None:
        if self.pos_embed is None:
            return None
        gh, gw = self.pos_grid
        grid = self.pos_embed[:, self.pos_embed_prefix:].view(1, gh, gw, -1)
        return resample_abs_pos_embed(grid, (h, w))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.patch_embed(x)  # (B, H0, W0, D)
        b, h, w, d = x.shape
        pos = self._pos_grid(h, w)
        if not self.keep_prefix:
            if pos is not None:
                x = x + pos
            return self.norm_pre(x)
        x = x.reshape(b, h * w, d)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(b, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        if pos is not None:
            pos = pos.reshape(1, h * w, d)
        if self.no_embed_class or self.pos_embed_prefix == 0:
            if pos is not None:
                x = x + pos
            if prefix:
                x = torch.cat(prefix + [x], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1)
            x = x + torch.cat([self.pos_embed[:, : self.pos_embed_prefix], pos], dim=1)
        return self.norm_pre(x)

    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    # ------------------------------------------------------------------ forward API
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for blk in self.blocks:
            x = self._run_block(blk, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head_type == "token":
            x = x[:, 0]
        elif x.ndim == 4:
            x = x.mean(dim=(1, 2))
        else:
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.fc_norm(x)
        if self.head_proj is not None:
            x = self.head_proj(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor):
        if self.head_type == "none":
            return self.forward_pyramid(x)
        return self.forward_head(self.forward_features(x))

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One ``(B, D, H_s, W_s)`` map per stage (strides ``self.strides``: 4, 8, 16, 32 for paper configs)."""
        if self.keep_prefix:
            raise ConfigError(
                "forward_pyramid needs a hierarchical config (e.g. 'paper-det'); the single-stage 'identity' "
                "config has no pyramid (the plain baseline in hpvit.models.plain adds a simple feature pyramid)"
            )
        return self.forward_intermediates(x, intermediates_only=True)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Iterable[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm-style: features at stage ends. ``indices``: stage ids (or the last n stages if an int)."""
        n = self.layout.num_stages
        if indices is None:
            take = list(range(n))
        elif isinstance(indices, int):
            take = list(range(n - indices, n))
        else:
            take = [i % n for i in indices]
        if output_fmt not in ("NCHW", "NHWC"):
            raise ConfigError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        ends = {self.layout.stage_ends[s]: s for s in take}
        last = max(ends) if stop_early else len(self.blocks) - 1
        gh, gw = self.patch_embed.grid(x.shape[-2], x.shape[-1])
        x = self._embed(x)
        feats = []
        for i, blk in enumerate(self.blocks[: last + 1]):
            x = self._run_block(blk, x)
            if i in ends:
                y = self.norm(x) if norm else x
                if y.ndim == 3:  # identity: drop prefix tokens, restore the grid
                    y = y[:, self.num_prefix_tokens:]
                    y = y.reshape(y.shape[0], gh, gw, -1)
                feats.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return feats
        return self.norm(x), feats

    # ------------------------------------------------------------------ re-parameterisation
    def reparameterize(self) -> "HierarchicalViT":
        """Merge every average-pool + conv pair into a single conv, in place. Returns ``self``."""
        for blk in self.blocks:
            if blk.downsample is not None:
                blk.downsample.reparameterize()
        self.config = self.config.replace(reparameterized=True)
        return self

    # ------------------------------------------------------------------ timm-style helpers
    def reuse_report(self):
        """Which tensors came from the plain checkpoint, which are new, which were dropped."""
        from .reuse import ReuseReport

        if self._reuse_report is None:
            return ReuseReport(reused=[], new=sorted(self.state_dict()), dropped={}, source="<random init>")
        return self._reuse_report

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        nwd = {"pos_embed", "cls_token", "reg_token"}
        nwd |= {n for n, _ in self.named_parameters() if n.endswith("rel_pos_table")}
        return nwd

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^cls_token|^reg_token|^pos_embed|^patch_embed|^norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", "token"):
                raise ConfigError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
            if global_pool == "token" and self.cls_token is None:
                raise ConfigError("this model has no class token; use global_pool='avg'")
            self.head_type = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_dim_in, num_classes) if num_classes > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"config={self.config.name}, depths={self.layout.depths}, stride={self.stride}"
