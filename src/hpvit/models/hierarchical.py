"""The hierarchical ViT transformed from a plain ViT.

Module names mirror timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``norm_pre``, ``blocks.{i}``, ``norm``, ``fc_norm``, ``head``), so every pre-trained tensor keeps its
name. The only new tensors are ``blocks.{i}.downsample.conv.*`` / ``.gate`` (the pooling layer that starts a
stage lives in the first block of that stage), ``blocks.{i}.attn.rel_pos_table`` and, when the class
count changes, ``head.*``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoints.spec import PlainSpec
from ..config import HPViTConfig, get_config, phase_dilations
from ..errors import ConfigError, InputError
from ..layers import (Block, Downsample, PatchEmbed, pad_partition, phase_partition, phase_unpartition,
                      resample_abs_pos_embed, unpartition_crop, valid_partition)
from ..layers.attention import CHUNK_BYTES, Attention, DropPath, Mlp
from ..layers.capture import is_graph_capture
from .reuse import ReuseReport

# A run of windowed blocks keeps its tokens in window order (one partition per run) unless padding would
# add more than this factor of tokens; then each block pads inside its attention only (see _run_segment).
PAD_FALLBACK = 1.10



class StagePool(nn.Module):
    """The pooling layer into a stage that has no blocks (efficiency presets with 0-block stages).
    Stages with blocks keep their pool in ``blocks.{first}.downsample``; this one is stored as
    ``empty_stages.{stage}.downsample``. Its output is that stage's pyramid level."""

    def __init__(self, downsample: Downsample):
        super().__init__()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x)


def _as_hw(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# Modules torch.fx must call as leaves (their forward branches on tensor shapes): timm's tracer gets them
# through timm.layers.register_notrace_module (models/registry.py); a plain torch.fx.Tracer user passes
# ``is_leaf_module=lambda m, name: isinstance(m, FX_LEAF_MODULES)``.
FX_LEAF_MODULES: tuple[type[nn.Module], ...] = (Block, Attention, Mlp, DropPath)


def _is_fx_tracing() -> bool:
    """True while torch.fx symbolically traces the model: shapes are proxies, so no Python branch may read them."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def _pos_embed_at(pos_embed: torch.Tensor, prefix: int, gh: int, gw: int, h: int, w: int) -> torch.Tensor:
    """The stored position embedding ``(1, prefix + gh * gw, D)`` -> its grid part resampled to ``(1, h, w, D)``.
    A leaf for torch.fx (``h, w`` come from the input's shape)."""
    return resample_abs_pos_embed(pos_embed[:, prefix:].reshape(1, gh, gw, -1), (h, w))


torch.fx.wrap("_pos_embed_at")


def _pos_embed_phases(pos_embed: torch.Tensor, prefix: int, gh: int, gw: int, h: int, w: int, r: int) -> torch.Tensor:
    """The stored position embedding sampled onto every phase of an ``h x w`` stride-``patch / r`` map:
    the source grid resampled to the phase grid ``(ceil(h / r), ceil(w / r))`` (the source grid itself at the
    source resolution), each entry repeated ``r x r`` times -> ``(1, h, w, D)``. Token ``(r*i + a, r*j + c)``
    then carries exactly the embedding the plain model gives token ``(i, j)``. A leaf for torch.fx."""
    g = resample_abs_pos_embed(pos_embed[:, prefix:].reshape(1, gh, gw, -1), (-(-h // r), -(-w // r)))
    return g.repeat_interleave(r, dim=1).repeat_interleave(r, dim=2)[:, :h, :w]


torch.fx.wrap("_pos_embed_phases")


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

    # state-dict entries whose stored shape may differ from a fresh model's (see _load_from_state_dict)
    flexible_shape_keys = ("pos_embed",)

    def __init__(self, spec: PlainSpec, config: "HPViTConfig | str" = "paper-cls", num_classes: int | None = None):
        super().__init__()
        cfg = config if isinstance(config, HPViTConfig) else get_config(config)  # a config object is used as given
        layout = cfg.resolve(spec.depth)
        self.spec, self.config, self.layout = spec, cfg, layout
        self.embed_dim = self.num_features = d = spec.embed_dim
        self.head_type = cfg.head
        self.join = cfg.class_token == "join" or (cfg.class_token == "auto" and spec.class_token and layout.joinable)
        if self.join and not spec.class_token:
            raise ConfigError(
                "class_token='join' keeps the source's pre-trained class token, but this checkpoint has none "
                "(e.g. MAE pre-training or a GAP model); use class_token='drop'"
            )
        has_token = spec.class_token and (cfg.keep_prefix_tokens or self.join)
        if cfg.head == "auto":
            self.head_type = "token" if (spec.global_pool == "token" and has_token) else "avg"
        if self.head_type == "token" and not has_token:
            raise ConfigError(
                "head='token' needs the class token: use the 'identity' config or class_token='join' with a "
                "class-token checkpoint, or head='avg'"
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
        # phase attention: per stage, the number of phases per side (1 = the stage attends as configured)
        self.dilations = (phase_dilations(k, stride, layout.num_stages) if cfg.attention == "phase"
                          else (1,) * layout.num_stages)
        if cfg.pos_embed_sampling == "phase" and k % stride:
            raise ConfigError(f"pos_embed_sampling='phase' needs the stride ({stride}) to divide the patch ({k})")
        self.pos_phases = k // stride if cfg.pos_embed_sampling == "phase" else 1
        if cfg.sub_phase >= max(1, k // stride):
            raise ConfigError(
                f"sub_phase={cfg.sub_phase} is not a phase of this layout: a {k}-px patch at stride {stride} has "
                f"{max(1, k // stride)} phases per side (0..{max(1, k // stride) - 1})"
            )
        ih, iw = _as_hw(cfg.img_size)
        phase_grid = max(1, min(ih, iw) // k)  # a phase grid at the config's image size: the source's token grid

        # prefix tokens: kept from the start in all-global layouts (identity), joined at the first global
        # block with class_token='join', otherwise dropped
        self.keep_prefix = cfg.keep_prefix_tokens
        prefixed = self.keep_prefix or self.join
        self.num_prefix_tokens = spec.num_prefix_tokens if prefixed else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if (prefixed and spec.class_token) else None
        self.reg_token = nn.Parameter(torch.zeros(1, spec.num_reg_tokens, d)) if (prefixed and spec.num_reg_tokens) else None
        self.join_block = layout.windows.index(None) if self.join else None
        self.no_embed_class = spec.no_embed_class
        self.pos_embed_prefix = self.num_prefix_tokens if (prefixed and not spec.no_embed_class) else 0
        # the position embedding keeps the source's grid (as in the checkpoint) and is interpolated to each
        # input's token grid at run time; files saved with a larger stored grid load too (_load_from_state_dict)
        self.pos_grid = None if spec.pos_grid is None else tuple(spec.pos_grid)
        self.pos_embed = None
        if self.pos_grid is not None:
            n = self.pos_grid[0] * self.pos_grid[1] + self.pos_embed_prefix
            self.pos_embed = nn.Parameter(torch.zeros(1, n, d))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.norm_pre = nn.LayerNorm(d, eps=spec.norm_eps) if spec.norm_pre else nn.Identity()

        act = cfg.act or spec.act
        dpr = torch.linspace(0, cfg.drop_path_rate, spec.depth, device="cpu").tolist()
        stage_starts = {sum(layout.depths[:s]): s for s in range(1, layout.num_stages) if layout.depths[s] > 0}
        empty: dict[str, nn.Module] = {}
        for s in range(1, layout.num_stages):
            if layout.depths[s] == 0:
                empty[str(s)] = StagePool(self._make_pool(cfg, s - 1, d))
        blocks = []
        for i in range(spec.depth):
            down = self._make_pool(cfg, stage_starts[i] - 1, d) if i in stage_starts else None
            blocks.append(
                Block(
                    d, spec.num_heads, spec.mlp_hidden, qkv_bias=spec.qkv_bias, qk_norm=spec.qk_norm,
                    proj_bias=spec.proj_bias, mlp_bias=spec.mlp_bias, layerscale=spec.layerscale,
                    window_size=layout.windows[i], rel_pos=cfg.rel_pos, drop_path=dpr[i], act=act,
                    norm_eps=spec.norm_eps, fused_attn=cfg.fused_attn, downsample=down,
                    rel_pos_grid=phase_grid if self.dilations[layout.stage_of[i]] > 1 else None,
                )
            )
            blocks[-1].phase = self.dilations[layout.stage_of[i]]
        self.empty_stages = nn.ModuleDict(empty) if empty else None
        # per stage: runs of consecutive blocks sharing a window size, as (start, stop, window)
        self._segments: list[list[tuple[int, int, int | None]]] = []
        for s in range(layout.num_stages):
            start = sum(layout.depths[:s])
            segs: list[tuple[int, int, int | None]] = []
            for i in range(start, start + layout.depths[s]):
                if segs and layout.windows[i] == segs[-1][2]:
                    segs[-1] = (segs[-1][0], i + 1, segs[-1][2])
                else:
                    segs.append((i, i + 1, layout.windows[i]))
            self._segments.append(segs)
        self.chunk_tokens = max(1, CHUNK_BYTES // (4 * spec.mlp_hidden))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d, eps=spec.norm_eps) if spec.final_norm == "norm" else nn.Identity()
        self.fc_norm = nn.LayerNorm(d, eps=spec.norm_eps) if spec.final_norm == "fc_norm" else nn.Identity()
        self.head_proj = nn.Linear(d, spec.proj_dim, bias=False) if spec.proj_dim else None
        self.head_dim_in = self.head_hidden_size = spec.proj_dim or d
        self.head_drop: nn.Module = nn.Identity()  # timm's drop_rate (models/registry.py sets a Dropout)
        # layout of forward_features' output: a map (B, H, W, D), or the token sequence (B, L, D) when prefix
        # tokens are kept (identity) or joined (class_token='join')
        self.output_fmt = "NLC" if (self.keep_prefix or self.join) else "NHWC"
        # run every block as blk(x) on maps (see _plain_calls); export sets it for graph capture
        self.force_plain_calls = False
        self.head = nn.Linear(self.head_dim_in, self.num_classes) if self.num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.grad_checkpointing = False
        self._reuse_report = None

        red = [stride * 2**s for s in range(layout.num_stages)]

        def _module(s: int) -> str:
            if layout.depths[s]:
                return f"blocks.{layout.stage_ends[s]}"
            return "patch_embed" if s == 0 else f"empty_stages.{s}"

        self.feature_info = [
            dict(num_chs=d, reduction=red[s], module=_module(s), stage=s) for s in range(layout.num_stages)
        ]

    @staticmethod
    def _make_pool(cfg: HPViTConfig, k: int, d: int) -> Downsample:
        kind, conv = cfg.pools[k], cfg.pool_conv
        if cfg.reparameterized and kind in ("avgconv", "subconv", "subgconv", "subavg"):
            kind, conv = "conv", "depthwise" if kind == "subavg" else conv  # a merged subavg is depthwise
        return Downsample(kind, d, conv, cfg.pool_padding, tap=(cfg.sub_phase >> k) & 1)

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
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
            raise InputError(f"expected a float tensor of images (B, C, H, W), got {got}; stack a list of images with "
                             "torch.stack(...), turn uint8 pixels into floats (x.float() / 255) and normalise them")
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
        p = self.pos_embed
        if is_graph_capture() or self.training or torch.is_grad_enabled() or p.is_inference():
            # (a tensor made inside torch.inference_mode has no version counter to key a cache on)
            return self._pos_fresh(h, w)
        # inference: the resampled grid depends only on the stored tensor and (h, w); reuse it while the
        # tensor is unchanged (any in-place update bumps _version; a new tensor has another data_ptr)
        key = (h, w, p.data_ptr(), p._version, p.dtype, p.device)
        hit = getattr(self, "_pos_cache", None)
        if hit is None or hit[0] != key:
            hit = self._pos_cache = (key, self._pos_fresh(h, w).contiguous())
        return hit[1]

    def _pos_fresh(self, h: int, w: int) -> torch.Tensor:
        gh, gw = self.pos_grid
        if self.pos_phases > 1:
            return _pos_embed_phases(self.pos_embed, self.pos_embed_prefix, gh, gw, h, w, self.pos_phases)
        return _pos_embed_at(self.pos_embed, self.pos_embed_prefix, gh, gw, h, w)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> the first stage's input: a map ``(B, H0, W0, D)`` with the (resampled)
        position embedding and ``norm_pre`` applied, or, when prefix tokens are kept (``identity``), the
        plain ViT's token sequence ``(B, prefix + H0 * W0, D)``. Validates the input size (except while
        torch.fx traces, where sizes are symbolic: the traced graph runs unchecked)."""
        if not _is_fx_tracing():
            self._check_input(x)
        x = self.patch_embed(x)  # (B, H0, W0, D)
        b, h, w, d = x.shape
        pos = self._pos_grid(h, w)
        if not self.keep_prefix:
            if pos is not None:
                x = x + pos
            return self.norm_pre(x)
        x = x.reshape(b, h * w, d)
        if pos is not None:
            x = x + pos.reshape(1, h * w, d)
        x = self.norm_pre(x)
        return torch.cat([self.prefix_tokens(b), x], dim=1) if self.num_prefix_tokens else x

    def prefix_tokens(self, b: int) -> torch.Tensor:
        """The class/register tokens ``(B, P, D)`` with their position embedding and ``norm_pre`` applied,
        as they enter the first block of the plain ViT (identity) or the join block (class_token='join')."""
        parts = []
        if self.cls_token is not None:
            parts.append(self.cls_token)
        if self.reg_token is not None:
            parts.append(self.reg_token)
        t = torch.cat(parts, dim=1)
        if self.pos_embed_prefix:
            t = t + self.pos_embed[:, : self.pos_embed_prefix]
        return self.norm_pre(t).expand(b, -1, -1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Files written before the position embedding kept the source grid store it at the img_size/stride
        # grid: adopt the stored grid (the forward interpolates from whatever grid is stored).
        key = prefix + "pos_embed"
        v = state_dict.get(key)
        if self.pos_embed is not None and v is not None and v.shape != self.pos_embed.shape and v.ndim == 3:
            n = v.shape[1] - self.pos_embed_prefix
            ih, iw = _as_hw(self.config.img_size)
            cands = [self.patch_embed.grid(ih, iw), (int(round(n**0.5)),) * 2]
            grid = next((g for g in cands if g[0] * g[1] == n), None)
            if grid is not None and v.shape[2] == self.pos_embed.shape[2]:
                self.pos_grid = tuple(grid)
                self.pos_embed = nn.Parameter(self.pos_embed.new_empty(v.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _run_block(self, blk: Block, t: torch.Tensor, mask: torch.Tensor | None, groups: int, images: int,
                   grid: "tuple[int, int, int] | None" = None) -> torch.Tensor:
        """One block (without its downsample) on sequences ``t``: global ``(B, L, D)`` or windows
        ``(B * nW, N, D)`` with ``groups = nW`` when ``mask`` is per window (padding). ``grid = (h, w, prefix)``:
        global sequences on a phase grid, whose bias the block's attention adds (Attention._attend)."""
        windowed = blk.attn.window_size is not None
        n_seq = t.shape[1]
        if not torch.is_grad_enabled() and not self.training:
            # inference: residuals in place, big stages in chunks (on CPU, where it saves page faults)
            chunk = 0
            if t.device.type == "cpu":
                chunk = max(1, self.chunk_tokens // n_seq) if windowed else self.chunk_tokens
            return blk.forward_tokens_(t, mask, chunk, groups, grid)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            per_image = t.shape[0] // images
            step = max(1, self.chunk_tokens // (2 * n_seq))  # any run of windows
            if windowed and step < t.shape[0]:
                # windows are independent: checkpoint a few windows at a time, so the recomputation in
                # backward holds one chunk's activations, not the stage's (split: one cat in backward).
                # Stochastic depth drops whole images: drawn here once per image, each chunk gets its rows
                keep = None
                if blk.drop_path1.p > 0 or blk.drop_path2.p > 0:
                    keep = blk.draw_keep(images, per_image, t)
                outs = []
                for i, tc in enumerate(t.split(step)):
                    m = Block._mask_rows(mask, i * step, tc.shape[0])
                    kc = None if keep is None else tuple(k[i * step: i * step + tc.shape[0]] for k in keep)
                    outs.append(checkpoint(blk.forward_tokens, tc, m, 1, None, kc, use_reentrant=False))
                return torch.cat(outs)
            return checkpoint(blk.forward_tokens, t, mask, groups, images, None, grid, use_reentrant=False)
        return blk.forward_tokens(t, mask, groups, images, grid=grid)

    def _run_segment(self, x: torch.Tensor, start: int, stop: int, ws: int | None,
                     pre: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                     images: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Blocks ``start..stop-1`` sharing window ``ws``. Windowed runs partition the map once, keep the
        tokens in window order through all their blocks, and restore the map once at the end. ``pre``:
        joined prefix tokens ``(B, P, D)`` (class_token='join'), attended with the map by global blocks.
        In a phase stage ``x`` is the phase batch ``(B * r * r, Hp, Wp, D)`` of :func:`phase_partition` (each
        phase attends as a map of its own, ``pre`` holds one copy per phase), ``valid`` its ``(r * r, Hp, Wp)``
        mask of real tokens (None: none padded) and ``images`` the real batch B (stochastic depth drops whole
        images). Returns the map (or identity's sequence) and the prefix tokens."""
        images = x.shape[0] if images is None else images
        if ws is None:
            if x.ndim == 3:  # identity: the plain token sequence with prefix tokens
                for blk in self.blocks[start:stop]:
                    x = self._run_block(blk, x, None, 1, x.shape[0])
                return x, pre
            b, h, w, d = x.shape
            t = x.reshape(b, h * w, d)
            if self.join and pre is None and start <= self.join_block < stop:
                if start != self.join_block:  # split so the tokens join exactly at join_block
                    x, pre = self._run_segment(x, start, self.join_block, ws, None, valid, images)
                    return self._run_segment(x, self.join_block, stop, ws, None, valid, images)
                pre = self.prefix_tokens(b)  # in a phase stage: one copy per phase
            p = 0 if pre is None else pre.shape[1]
            if pre is not None:
                t = torch.cat([pre, t], dim=1)
            keys = self._key_mask(valid, p, t)
            for blk in self.blocks[start:stop]:
                t = self._run_block(blk, t, keys, 1 if keys is None else keys.shape[0], images, (h, w, p))
            if pre is not None:
                return t[:, p:].reshape(b, h, w, d), t[:, :p]
            return t.view(b, h, w, d), None
        b, h, w, d = x.shape
        hp, wp = h + (-h) % ws, w + (-w) % ws
        if valid is None and ((h <= ws and w <= ws) or hp * wp > PAD_FALLBACK * h * w):
            # the map fits in one window (attention then runs at the map's size, see Attention.forward), or
            # padding would be a large share of the windows (small or odd maps): keeping the map in window
            # order would run the MLPs on the padding too, so pad only inside each block's attention
            for blk in self.blocks[start:stop]:
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(blk.forward_map, x, use_reentrant=False)
                else:
                    x = blk.forward_map(x)
            return x, pre
        xw, key_ok = pad_partition(x, ws)
        if valid is not None:  # phase padding and window padding, per (phase, window)
            key_ok = valid_partition(valid, ws)
        groups = 1 if key_ok is None else key_ok.shape[0]
        for blk in self.blocks[start:stop]:
            xw = self._run_block(blk, xw, blk.attn.window_mask(key_ok), groups, images)
        return unpartition_crop(xw, ws, b, h, w), pre

    @staticmethod
    def _key_mask(valid: torch.Tensor | None, prefix: int, like: torch.Tensor) -> torch.Tensor | None:
        """``(G, 1, 1, P + N)`` additive mask, ``-inf`` on the padded tokens of each phase group (``valid``:
        ``(G, Hp, Wp)``), none on the ``prefix`` tokens; None when nothing is padded."""
        if valid is None:
            return None
        ok = valid.flatten(1)
        if prefix:
            ok = torch.cat([ok.new_ones(ok.shape[0], prefix), ok], dim=1)
        m = torch.zeros(ok.shape, dtype=like.dtype, device=like.device).masked_fill(~ok, float("-inf"))
        return m[:, None, None, :]

    def _merge_prefix(self, pre: torch.Tensor | None, b: int, r: int) -> torch.Tensor | None:
        """Joined prefix tokens with one copy per phase of a stage with ``r0 x r0`` phases, ``(B * r0 * r0, P, D)``,
        -> one copy per phase of an ``r x r`` stage (``r <= r0``). Phase ``p`` of the finer stage survives a
        stride-2 subsample as phase ``p / 2`` of the next, so ``prefix_merge='keep'`` takes copy ``f * q`` for
        new phase ``q`` (``f = r0 / r``) and ``'mean'`` averages copies ``f * q .. f * q + f - 1`` per side."""
        if pre is None or self.dilations[0] == 1 or pre.shape[0] == b * r * r:  # (no shape read without phases)
            return pre
        r0 = int(round((pre.shape[0] // b) ** 0.5))
        f = r0 // r
        _, p, d = pre.shape
        if self.config.prefix_merge == "mean":
            out = pre.view(b, r, f, r, f, p, d).mean(dim=(2, 4))
        else:  # the copy of the phase the subsample pools keep (sub_phase, at this stage's resolution)
            o = (self.config.sub_phase // (self.dilations[0] // r0)) % f
            out = pre.view(b, r0, r0, p, d)[:, o::f, o::f]
        return out.reshape(b * r * r, p, d)

    def _run_stage(self, x: torch.Tensor, s: int, pre: torch.Tensor | None = None,
                   pool: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stage ``s``: its pooling layer (none for stage 0; skipped with ``pool=False``), then its blocks.
        Returns the stage output and the joined prefix tokens (which pooling leaves unchanged). A phase stage
        (``r > 1`` phases per side) permutes the map into its phase batch once, runs every block there, and
        permutes back once."""
        if self.layout.depths[s] == 0:
            return (self.empty_stages[str(s)](x) if s > 0 and pool else x), pre
        r = self.dilations[s]
        down = self.blocks[self._segments[s][0][0]].downsample
        if down is not None and pool:
            x = down(x)
        if r == 1:
            pre = self._merge_prefix(pre, x.shape[0], 1)
            for start, stop, ws in self._segments[s]:
                x, pre = self._run_segment(x, start, stop, ws, pre)
            return x, pre
        b, h, w, _ = x.shape
        xp, valid = phase_partition(x, r)
        pre = self._merge_prefix(pre, b, r)
        xp, pre = self._run_phase_batch(xp, s, pre, valid, b)
        return phase_unpartition(xp, r, b, h, w), pre

    def _run_phase_batch(self, xp: torch.Tensor, s: int, pre: torch.Tensor | None, valid: torch.Tensor | None,
                         images: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The blocks of phase stage ``s`` (no pool) on a batch of phase maps ``xp`` ``(images * G, Hp, Wp, D)``
        (``G`` phases per image; ``valid``: their ``(G, Hp, Wp)`` mask of real tokens, None if none padded)."""
        for start, stop, ws in self._segments[s]:
            xp, pre = self._run_segment(xp, start, stop, ws, pre, valid, images)
        return xp, pre

    def _plain_calls(self) -> bool:
        """Whether to run every block as ``blk(x)`` on maps instead of the fast runner (window-order runs,
        in-place chunks): while torch.fx traces, when ``force_plain_calls`` is set (graph export), and when a
        block has forward (pre-)hooks, so that hooks (timm's ``feature_cls='hook'``) fire and see each block's
        output map ``(B, H, W, D)``. Same results up to float rounding; slower on large maps."""
        if self.force_plain_calls or _is_fx_tracing():
            return True
        return self._hooked()

    def _hooked(self) -> bool:
        """Whether a block or a pool has forward (pre-)hooks."""
        mods = [m for b in self.blocks for m in (b, b.downsample) if m is not None]
        mods += [st.downsample for st in (self.empty_stages or {}).values()]
        return any(m._forward_hooks or m._forward_pre_hooks for m in mods)

    def _run_stage_calls(self, x: torch.Tensor, s: int, pre: torch.Tensor | None,
                         pool: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stage ``s`` as plain module calls, no branch on tensor shapes (torch.fx-traceable with
        ``FX_LEAF_MODULES`` as leaves). ``x``: map ``(B, H, W, D)`` (identity: sequence); returns as
        :meth:`_run_stage`. With class_token='join' a joined block gets ``(B, P + H * W, D)``, and a block
        that also pools runs its ``downsample`` and ``forward_map`` separately (its hooks do not fire). A
        block of a phase stage permutes to its phases and back itself (``Block.forward``), so hooks see maps;
        joined phase blocks run ``forward_tokens`` on the phase batch with one prefix copy per phase.
        ``pool=False`` skips the stage's pooling layer (its block's hooks then do not fire)."""
        if self.layout.depths[s] == 0:
            return (self.empty_stages[str(s)](x) if s > 0 and pool else x), pre
        start = sum(self.layout.depths[:s])
        r = self.dilations[s]
        if r > 1 and self.join:
            return self._run_phase_stage_calls(x, s, pre)
        for i in range(start, start + self.layout.depths[s]):
            blk = self.blocks[i]
            skip_pool = not pool and i == start
            if not self.join or (pre is None and i != self.join_block):
                if skip_pool and blk.downsample is not None:
                    x = blk.forward_phases(x) if blk.phase > 1 else blk.forward_map(x)
                else:
                    x = blk(x)
                continue
            if blk.downsample is not None and not skip_pool:
                x = blk.downsample(x)
            pre = self.prefix_tokens(x.shape[0]) if pre is None else self._merge_prefix(pre, x.shape[0], 1)
            b, h, w, d = x.shape
            t = torch.cat([pre, x.reshape(b, h * w, d)], dim=1)
            t = blk(t) if blk.downsample is None else blk.forward_map(t)
            p = self.num_prefix_tokens
            pre, x = t[:, :p], t[:, p:].reshape(b, h, w, d)
        return x, pre

    def _run_phase_stage_calls(self, x: torch.Tensor, s: int, pre: torch.Tensor | None):
        """A phase stage with joined prefix tokens (every block attends globally inside its phase, the class
        token copies with it), as explicit calls for graph capture; maps must tile into whole phases."""
        r = self.dilations[s]
        start = sum(self.layout.depths[:s])
        down = self.blocks[start].downsample
        if down is not None:
            x = down(x)
        b, h, w, d = x.shape
        xp, valid = phase_partition(x, r)
        if valid is not None:
            raise InputError(
                f"graph capture (export, torch.fx, forward hooks) of a phase stage needs maps that tile into whole "
                f"phases: the {h}x{w} map of stage {s} is not a multiple of {r}; use image sides that are multiples "
                f"of the {self.spec.patch_size}-px patch"
            )
        xp, pre = self._phase_blocks_calls(xp, s, pre, b, r)
        return phase_unpartition(xp, r, b, h, w), pre

    def _phase_blocks_calls(self, xp: torch.Tensor, s: int, pre: torch.Tensor | None, b: int, r: int):
        """The blocks of phase stage ``s`` (no pool) as explicit calls on the phase batch ``xp``
        ``(B * r * r, Hp, Wp, D)`` of ``b`` images (no padded tokens); the prefix tokens, once joined, go with one
        copy per phase. Returns the phase batch and the prefix tokens."""
        bp, hp, wp, d = xp.shape
        start = sum(self.layout.depths[:s])
        for i in range(start, start + self.layout.depths[s]):
            blk = self.blocks[i]
            if pre is None and (not self.join or i < self.join_block):
                xp = blk.forward_map(xp).reshape(bp, hp, wp, d)
                continue
            pre = self.prefix_tokens(bp) if pre is None else self._merge_prefix(pre, b, r)
            p = pre.shape[1]
            t = blk.forward_tokens(torch.cat([pre, xp.reshape(bp, hp * wp, d)], dim=1), blk.attn.grid_bias(hp, wp, p))
            pre, xp = t[:, :p], t[:, p:].reshape(bp, hp, wp, d)
        return xp, pre

    # ------------------------------------------------------------------ classification on the phase it sees
    def stage_pool(self, s: int) -> Downsample:
        """The pooling layer into stage ``s >= 1`` (``blocks.{first}.downsample`` or ``empty_stages.{s}.downsample``)."""
        if self.layout.depths[s] == 0:
            return self.empty_stages[str(s)].downsample
        return self.blocks[sum(self.layout.depths[:s])].downsample

    def _seen_phase(self, h: int, w: int) -> tuple[int, int]:
        """``(n, a)``: the output of :meth:`forward_features` on an ``h x w`` first-stage map depends only on
        phase ``(a, a)`` of its ``n`` leading phase stages, so they may run on that phase alone; ``(0, 0)`` when
        any other phase can reach the output.

        That is the case when every pool from the first stage into the first stage without phases is the
        pure subsample (it keeps one phase: ``a`` collects the pools' taps), the joined class token's copies
        are not averaged across phases (``prefix_merge='keep'``), the output is not the pyramid, and phase
        ``a`` is whole (none of its chain would read the pools' padding). Off while torch.fx traces (sizes
        are symbolic) and while a block or pool has hooks (they must see the full maps)."""
        r = self.dilations[0]
        n = sum(d > 1 for d in self.dilations)
        if r == 1 or n == self.layout.num_stages or self.head_type == "none" or _is_fx_tracing():
            return 0, 0
        pools = [self.stage_pool(s) for s in range(1, n + 1)]
        if any(p is None or p.kind != "sub" for p in pools):
            return 0, 0
        if self.join and self.layout.stage_of[self.join_block] < n and self.config.prefix_merge != "keep":
            return 0, 0
        a = sum(p.tap << k for k, p in enumerate(pools))
        if len(range(a, h, r)) != -(-h // r) or len(range(a, w, r)) != -(-w // r) or self._hooked():
            return 0, 0
        return n, a

    def _run_seen_phase(self, x: torch.Tensor, n: int, a: int, calls: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first ``n`` (phase) stages on phase ``(a, a)`` of the embedded map ``x`` ``(B, H0, W0, D)`` only
        (see :meth:`_seen_phase`): their subsample pools keep exactly this phase, so the result ``(B, Hp, Wp, D)``
        is the input of stage ``n`` with its pool already applied, and ``pre`` the prefix copy of this phase."""
        r = self.dilations[0]
        x, pre = x[:, a::r, a::r], None
        for s in range(n):
            if self.layout.depths[s]:
                x, pre = (self._phase_blocks_calls(x, s, pre, x.shape[0], 1) if calls
                          else self._run_phase_batch(x, s, pre, None, x.shape[0]))
        return x, pre

    def _final(self, x: torch.Tensor, pre: torch.Tensor | None) -> torch.Tensor:
        """The normalised output: the map ``(B, H, W, D)``, or with joined prefix tokens the sequence
        ``(B, P + H * W, D)`` (prefix first, as in timm's ViT)."""
        if pre is not None:
            pre = self._merge_prefix(pre, x.shape[0], 1)
            x = torch.cat([pre, x.flatten(1, 2)], dim=1)
        return self.norm(x)

    # ------------------------------------------------------------------ forward API
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> the final normalised features, laid out as ``self.output_fmt``: a map
        ``(B, H_last, W_last, D)`` (``NHWC``) or, with prefix tokens kept or joined, ``(B, P + L, D)`` (``NLC``).
        When they depend on one phase only (``grid-*`` classifiers without mixing, see :meth:`_seen_phase`) the
        stages finer than the patch run on that phase alone (same numbers, a plain ViT's cost);
        :meth:`forward_intermediates` / :meth:`forward_pyramid` always compute every phase."""
        calls = self._plain_calls()
        run = self._run_stage_calls if calls else self._run_stage
        x, pre = self.embed(x), None
        n, a = (0, 0) if _is_fx_tracing() or x.ndim != 4 else self._seen_phase(x.shape[1], x.shape[2])
        if n:  # classification: the phase stages run on the one phase the output sees
            x, pre = self._run_seen_phase(x, n, a, calls)
        for s in range(n, self.layout.num_stages):
            x, pre = run(x, s, pre, pool=not n or s > n)
        return self._final(x, pre)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``forward_features``' output -> logits ``(B, num_classes)``, or with ``pre_logits`` the pooled
        features ``(B, head_hidden_size)``. ``global_pool=''`` leaves the features unpooled (the head, if
        any, then acts on the last dim of the map)."""
        if self.head_type == "token":
            x = x[:, 0]
        elif self.head_type != "":
            x = x.mean(dim=(1, 2)) if self.output_fmt == "NHWC" else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.fc_norm(x)
        if self.head_proj is not None:
            x = self.head_proj(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    @property
    def global_pool(self) -> str:
        """timm's name for the head's pooling: ``avg``, ``token``, ``''`` (none) or ``none`` (pyramid output)."""
        return self.head_type

    def __prepare_scriptable__(self) -> "HierarchicalViT":
        raise ConfigError(
            "TorchScript (torch.jit.script) is not supported for hpvit models: the forward picks its runner from "
            "Python state and the config. Use torch.export / ONNX (`hpvit export`, hpvit.export.export_onnx), "
            "torch.compile, or torch.fx (FX_LEAF_MODULES as leaves) instead"
        )

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
        """timm-style: features at stage ends, each ``(B, D, H_s, W_s)`` (``NCHW``) or ``(B, H_s, W_s, D)``
        (``NHWC``). ``indices``: stage ids (negative counts from the end) or an int n for the last n stages;
        out-of-range ids raise ConfigError as timm does. Returns ``(forward_features output, features)`` or,
        with ``intermediates_only``, the features."""
        take = self.take_indices(indices)
        if output_fmt not in ("NCHW", "NHWC"):
            raise ConfigError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        last = max(take) if stop_early else self.layout.num_stages - 1
        gh, gw = self.patch_embed.grid(x.shape[-2], x.shape[-1])
        run = self._run_stage_calls if self._plain_calls() else self._run_stage
        x, pre = self.embed(x), None
        feats = []
        for s in range(last + 1):
            x, pre = run(x, s, pre)
            if s in take:
                y = self.norm(x) if norm else x
                if y.ndim == 3:  # identity: drop prefix tokens, restore the grid
                    y = y[:, self.num_prefix_tokens:]
                    y = y.reshape(y.shape[0], gh, gw, -1)
                feats.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return feats
        return self._final(x, pre), feats

    def take_indices(self, indices: int | Iterable[int] | None) -> list[int]:
        """Stage ids for ``indices`` as timm reads them: None -> all, an int n -> the last n, a list -> those ids
        (negative ones count from the end). Raises ConfigError for ids outside the model's stages."""
        n = self.layout.num_stages
        if indices is None:
            return list(range(n))
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ConfigError(f"indices={indices}: this model has {n} stages; ask for the last 1..{n}")
            return list(range(n - indices, n))
        take = [int(i) for i in indices]
        bad = [i for i in take if not -n <= i < n]
        if bad:
            raise ConfigError(f"indices {bad} out of range: this model has {n} stages (ids 0..{n - 1}, or -{n}..-1)")
        return [i % n for i in take]

    # ------------------------------------------------------------------ re-parameterisation
    def reparameterize(self) -> "HierarchicalViT":
        """Merge every average-pool + conv pair into a single conv, in place. Returns ``self``."""
        for blk in self.blocks:
            if blk.downsample is not None:
                blk.downsample.reparameterize()
        for stage in (self.empty_stages or {}).values():
            stage.downsample.reparameterize()
        self.config = self.config.replace(reparameterized=True)
        return self

    # ------------------------------------------------------------------ timm-style helpers
    def reuse_report(self):
        """Which tensors came from the plain checkpoint, which are new, which were dropped."""
        if self._reuse_report is None:
            return ReuseReport(reused=[], new=sorted(self.state_dict()), dropped={}, source="<random init>")
        return self._reuse_report

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters without weight decay: position embedding, class/register tokens,
        relative-position tables (only those this model has)."""
        return {n for n, _ in self.named_parameters()
                if n in ("pos_embed", "cls_token", "reg_token") or n.endswith("rel_pos_table")}

    def set_drop_path_rate(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 to ``rate`` over the blocks (as at construction); for
        models loaded from a file (e.g. ``hpvit adapt``'s output) that are fine-tuned with another rate."""
        rates = torch.linspace(0, rate, len(self.blocks)).tolist()
        for blk, p in zip(self.blocks, rates):
            blk.drop_path1.p = blk.drop_path2.p = p
        self.config = self.config.replace(drop_path_rate=float(rate))

    def as_backbone(self) -> "HierarchicalViT":
        """Drop the classifier (``head='none'``: ``forward`` returns the pyramid), in place; returns ``self``.
        Used when a saved classifier (an adapted model) becomes a detection or segmentation backbone."""
        self.head_type, self.num_classes = "none", 0
        self.head = nn.Identity()
        self.head_proj = None
        self.config = self.config.replace(head="none")
        return self

    @torch.jit.ignore
    def new_parameter_names(self) -> list[str]:
        """Parameters the transform adds to the plain ViT (pooling convs and gates, relative-position tables),
        which start from zero (the gated conv of ``subgconv`` behind its zero gate); the optimizer may give them their own lr (recipe ``new_param_lr_scale``)."""
        return [n for n, _ in self.named_parameters()
                if n.endswith("rel_pos_table") or ".downsample." in n or n.startswith("empty_stages.")]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        # pools of empty stages (efficiency presets) act on the stem's output before any block: stem id
        return dict(
            stem=r"^cls_token|^reg_token|^pos_embed|^patch_embed|^norm_pre|^empty_stages",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh ``Linear(head_hidden_size, num_classes)`` head (``Identity`` for 0). ``global_pool``: ``avg``,
        ``token`` (needs the class token) or ``''`` (no pooling: ``forward`` returns the unpooled features)."""
        if global_pool is not None:
            if global_pool not in ("avg", "token", ""):
                raise ConfigError(f"global_pool must be 'avg', 'token' or '' (no pooling), got {global_pool!r}")
            if global_pool == "token" and self.cls_token is None:
                raise ConfigError("this model has no class token; use global_pool='avg'")
            self.head_type = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_dim_in, num_classes) if num_classes > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"config={self.config.name}, depths={self.layout.depths}, stride={self.stride}"
