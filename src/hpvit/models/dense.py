"""Every dense backbone (4 NCHW maps at strides 4, 8, 16, 32) and the one factory that builds them.

* :class:`PyramidBackbone` -- the transformed (hierarchical) ViT: ``vit.forward_pyramid`` plus one
  LayerNorm per level (as Swin adds before its detection/segmentation necks: the stage outputs are
  pre-norm residual streams whose scale grows with depth). Configs ``paper-det``, ``paper-seg`` or any
  4-stage config.
* :class:`PlainPyramidBackbone` -- the paper's plain baselines: the *same*
  :class:`~hpvit.models.hierarchical.HierarchicalViT` class (one Block and one Attention for everything)
  built with a single-stage, stride-16 config, and a *simple feature pyramid* of transposed convolutions
  over the outputs of four of its blocks (Li et al. 2021, "Benchmarking detection transfer learning with
  ViTs"; BEiT's segmentation setup)::

    block a output (1/16) -> ConvT 2x2/2 -> LN -> GELU -> ConvT 2x2/2   -> 1/4
    block b output (1/16) -> ConvT 2x2/2                                -> 1/8
    block c output (1/16)                                               -> 1/16
    block d output (1/16) -> MaxPool 2x2/2 (ceil)                       -> 1/32
    each level -> LayerNorm2d

  ``plain-det`` (in :data:`hpvit.config.PRESETS`): 14x14 window attention with relative position bias,
  global attention in four evenly spaced blocks (3, 6, 9, 12 of 12, 1-based); pyramid from those four
  blocks. ``plain-seg``: global attention everywhere (BEiT); pyramid from blocks 4, 6, 8, 12 of 12
  (1-based; for other depths d/3, d/2, 2d/3, d).

Both offer the dense-backbone contract (:mod:`hpvit.models.contract`): ``feature_info``,
``forward_intermediates``, ``group_matcher``, ``no_weight_decay``, ``new_parameter_names``,
``set_grad_checkpointing``; the wrapped ViT is ``.vit``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoints import load_plain
from ..config import DENSE_PRESETS, HPViTConfig, baseline_global_blocks, get_config
from ..errors import ConfigError, InputError
from .build import from_plain
from .contract import Wraps
from .hierarchical import HierarchicalViT


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of ``(B, C, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class _DenseBackbone(Wraps, nn.Module):
    """What both dense backbones share: ``forward`` returns the pyramid, whose levels (``out_channels``,
    ``strides``) end in the LayerNorms at ``levels_path``."""

    levels_path = "norms"
    out_channels: list[int]
    strides: list[int]

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The pyramid (the contract's name for :meth:`forward`)."""
        return self(x)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        return [dict(num_chs=c, reduction=r, module=f"{self.levels_path}.{i}")
                for i, (c, r) in enumerate(zip(self.out_channels, self.strides))]


class PyramidBackbone(_DenseBackbone):
    """The transformed (hierarchical) ViT as a dense backbone.

    ``vit``: a :class:`~hpvit.models.hierarchical.HierarchicalViT` with 4 stages (``paper-det``,
    ``paper-seg``...). Input ``(B, 3, H, W)`` with H, W >= ``vit.min_input_size``; output four
    ``(B, D, H_s, W_s)`` maps, ``H_0 = floor(H/4)``, ``H_{s+1} = ceil(H_s/2)``, each LayerNorm-ed.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        if len(vit.feature_info) != 4:
            raise ValueError(f"a dense backbone needs 4 pyramid levels, the config gives {len(vit.feature_info)}")
        self.vit = vit
        self.out_channels = [f["num_chs"] for f in vit.feature_info]
        self.strides = [f["reduction"] for f in vit.feature_info]
        self.norms = nn.ModuleList(LayerNorm2d(c, eps=1e-6) for c in self.out_channels)
        self.kind = "hierarchical"

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [n(f) for n, f in zip(self.norms, self.vit.forward_pyramid(x))]

    @property
    def min_input_size(self) -> int:
        return self.vit.min_input_size



def plain_out_indices(name: str, depth: int) -> tuple[int, ...]:
    """0-based blocks whose outputs feed the simple pyramid of plain config ``name``."""
    if name == "plain-det":
        return baseline_global_blocks(depth)
    if depth == 12:
        return (3, 5, 7, 11)
    return tuple(sorted({max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3)} | {depth - 1}))


class SimpleFeaturePyramid(nn.Module):
    """Four stride-16 maps ``(B, D, h, w)`` -> maps at strides 4, 8, 16, 32: ``(B, D, 4h, 4w)``,
    ``(B, D, 2h, 2w)``, ``(B, D, h, w)``, ``(B, D, ceil(h/2), ceil(w/2))``, each LayerNorm-ed."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2), LayerNorm2d(dim, eps=1e-6), nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.norms = nn.ModuleList(LayerNorm2d(dim, eps=1e-6) for _ in range(4))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        a, b, c, d = feats
        outs = [self.up4(a), self.up2(b), c, F.max_pool2d(d, 2, 2, ceil_mode=True)]
        return [n(o) for n, o in zip(self.norms, outs)]


class PlainPyramidBackbone(_DenseBackbone):
    """The plain ViT baseline as a dense backbone.

    ``vit``: a single-stage, stride-16 :class:`HierarchicalViT` without prefix tokens (``plain-det`` /
    ``plain-seg``); ``out_indices``: the four blocks feeding the pyramid. Input ``(B, 3, H, W)``,
    H, W >= 32; output four ``(B, D, ., .)`` maps at strides 4, 8, 16, 32 of ``floor(H/16)``-based
    sizes (exact when 32 divides H and W, which the detection/segmentation wrappers ensure by padding).
    Window blocks pad their input to a multiple of the window and mask the padding (nothing cropped).
    """

    levels_path = "fpn.norms"

    def __init__(self, vit: nn.Module, out_indices: Sequence[int]):
        super().__init__()
        if vit.layout.num_stages != 1 or vit.keep_prefix:
            raise ConfigError("the plain baseline needs a single-stage config without prefix tokens (plain-det/plain-seg)")
        if len(out_indices) != 4 or not all(0 <= i < len(vit.blocks) for i in out_indices):
            raise ConfigError(f"out_indices must be 4 block indices in [0, {len(vit.blocks)}), got {tuple(out_indices)}")
        self.vit = vit
        self.out_indices = tuple(int(i) for i in out_indices)
        d = vit.embed_dim
        self.fpn = SimpleFeaturePyramid(d)
        self.out_channels = [d] * 4
        self.strides = [vit.stride // 4, vit.stride // 2, vit.stride, vit.stride * 2]
        self.grad_checkpointing = False
        self.kind = "plain"

    @property
    def min_input_size(self) -> int:
        return max(32, self.vit.patch_embed.kernel)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> token map ``(B, h, w, D)`` with the (resampled) position embedding."""
        if x.ndim != 4 or x.shape[1] != self.vit.spec.in_chans:
            raise InputError(f"expected images (B, {self.vit.spec.in_chans}, H, W), got {tuple(x.shape)}")
        m = self.min_input_size
        if x.shape[-2] < m or x.shape[-1] < m:
            raise InputError(f"input {x.shape[-2]}x{x.shape[-1]} is smaller than the plain baseline's minimum {m}x{m}")
        return self.vit.embed(x)

    def forward_blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of blocks ``out_indices`` as NCHW maps ``(B, D, floor(H/16), floor(W/16))``."""
        t = self.embed(x)
        feats = []
        last = max(self.out_indices)
        for i, blk in enumerate(self.vit.blocks[: last + 1]):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                t = checkpoint(blk, t, use_reentrant=False)
            else:
                t = blk(t)
            if i in self.out_indices:
                feats.append(t.permute(0, 3, 1, 2))
        return feats

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.fpn(self.forward_blocks(x))


# The parts of the plain ViT that no dense backbone runs. Both backbones read the pyramid levels off the
# blocks' outputs (HierarchicalViT.forward_intermediates with norm=False; the plain baseline's chosen blocks),
# and each level gets its own LayerNorm2d (``body.norms`` / ``body.fpn.norms``): the ViT's final ``norm`` --
# and a classifier checkpoint's ``fc_norm``, ``head_proj`` and ``head`` -- would be parameters that can never
# get a gradient. Kept, they are dead weight in every saved model and they make DistributedDataParallel fail
# on the second step ("Expected to have finished reduction in the prior iteration ... parameters that were
# not used in producing loss"). So the dense models leave them out (and the reuse report says so).
UNUSED_IN_DENSE = ("norm", "fc_norm", "head_proj", "head")
UNUSED_IN_DENSE_WHY = ("not used by the dense backbone: every pyramid level gets its own LayerNorm (the "
                       "ViT's final norm / pooled-feature norm / classifier is never run)")


def drop_unused_vit_parts(body: nn.Module) -> list[str]:
    """Remove from ``body.vit`` (in place) the modules a dense backbone never runs (:data:`UNUSED_IN_DENSE`).
    Returns the state-dict keys (relative to ``body.vit``) that went; the ViT's reuse report lists them as
    dropped rather than reused."""
    vit = body.vit
    sd = vit.state_dict()
    removed = [k for k in sd if k.split(".", 1)[0] in UNUSED_IN_DENSE]
    vit.norm = nn.Identity()
    vit.fc_norm = nn.Identity()
    vit.head = nn.Identity()
    vit.head_proj = None
    mark_dropped_in_report(vit, {k: sd[k].numel() for k in removed})
    return removed


def mark_dropped_in_report(vit: nn.Module, numel: dict[str, int]) -> None:
    """Move the model keys ``numel`` (key -> element count) from the reuse report's ``reused`` list to its
    ``dropped`` map (idempotent; also fixes reports stored in files saved before these parts were removed)."""
    report = getattr(vit, "_reuse_report", None)
    if report is None:
        return
    gone = lambda key: key.split(".", 1)[0] in UNUSED_IN_DENSE  # noqa: E731
    moved = [r for r in report.reused if gone(r[0])]
    fresh = [k for k in report.new if gone(k)]
    report.reused = [r for r in report.reused if not gone(r[0])]
    report.new = [k for k in report.new if not gone(k)]
    for _, source_key, _ in moved:
        report.dropped[source_key] = UNUSED_IN_DENSE_WHY
    n_moved, n_fresh = sum(numel.get(m, 0) for m, _, _ in moved), sum(numel.get(k, 0) for k in fresh)
    if report.numel:
        if n_moved:
            report.numel["reused"] = report.numel.get("reused", 0) - n_moved
            report.numel["dropped"] = report.numel.get("dropped", 0) + n_moved
        if n_fresh:
            report.numel["new"] = report.numel.get("new", 0) - n_fresh


def unused_dense_keys(sd: dict[str, torch.Tensor], vit_prefix: str) -> list[str]:
    """Keys of ``sd`` under ``vit_prefix`` that belong to :data:`UNUSED_IN_DENSE` (files saved before they
    were left out of dense models hold them)."""
    return [k for k in sd if k.startswith(vit_prefix) and k[len(vit_prefix):].split(".", 1)[0] in UNUSED_IN_DENSE]


def build_dense_backbone(init, config: "str | HPViTConfig | dict" = "paper-det", fmt: "str | None" = None,
                         **overrides: Any) -> nn.Module:
    """A dense backbone (4 maps at strides 4..32), without the ViT parts no dense backbone runs
(:data:`UNUSED_IN_DENSE`).

    ``init``: a plain checkpoint (path, ``timm:<name>``, state dict) built with ``config`` -- ``paper-det`` /
    ``paper-seg`` (or any 4-stage preset, JSON file, dict or HPViTConfig) for the transformed model,
    ``plain-det`` / ``plain-seg`` (any 1-stage config) for the paper's plain baselines -- or a
    :class:`HierarchicalViT` already built (e.g. loaded from ``hpvit adapt``'s output: its own config is the
    backbone's; ``config`` is then not used). ``overrides``: HPViTConfig fields (``drop_path_rate``...).
    """
    if isinstance(init, HierarchicalViT):
        vit = init.as_backbone()
        if "drop_path_rate" in overrides:
            vit.set_drop_path_rate(overrides["drop_path_rate"])
        if vit.keep_prefix or len(vit.feature_info) != 4:
            raise ConfigError(f"the given model's config has {len(vit.feature_info)} stage(s); dense tasks need a "
                              "4-stage config")
        return _dense(PyramidBackbone(vit))
    if isinstance(init, nn.Module):
        raise ConfigError("build_dense_backbone takes a plain checkpoint (path, timm:<name> or state dict) or an "
                          "hpvit HierarchicalViT")
    cfg = get_config(config, **overrides)
    if cfg.num_stages == 1 and not cfg.keep_prefix_tokens:
        plain = load_plain(init, format=fmt)
        vit = from_plain(plain, cfg)
        return _dense(PlainPyramidBackbone(vit, plain_out_indices(cfg.name, plain.spec.depth)))
    vit = from_plain(init, cfg, format=fmt)
    if vit.keep_prefix or len(vit.feature_info) != 4:
        raise ConfigError(
            f"config {cfg.name!r} has {len(vit.feature_info)} stage(s); dense tasks need a 4-stage config or a "
            f"plain baseline: choose from {DENSE_PRESETS}"
        )
    return _dense(PyramidBackbone(vit))


def _dense(body: nn.Module) -> nn.Module:
    drop_unused_vit_parts(body)
    return body


def backbone_from_config(spec, config: dict, kind: str, out_indices: "Sequence[int] | None" = None) -> nn.Module:
    """Rebuild an (untrained) dense backbone from a saved ``HPViTConfig`` dict and plain spec (for loading)."""
    vit = HierarchicalViT(spec, HPViTConfig.from_dict(config))
    if kind == "plain":
        return _dense(PlainPyramidBackbone(vit, out_indices))
    return _dense(PyramidBackbone(vit))
