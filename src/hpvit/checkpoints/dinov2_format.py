"""Official DINOv2 checkpoints (facebookresearch/dinov2 ``dinov2_vit{s,b,l}14[_reg4]_pretrain.pth``).

Layout: timm names plus ``mask_token (1, D)`` (masked pre-training only: dropped), optional
``register_tokens (1, R, D)`` and, for models built with ``block_chunks > 0``, block keys
``blocks.{chunk}.{i}.*`` (flattened to ``blocks.{i}.*``). Patch 14, layerscale, LayerNorm eps 1e-6, GELU.

Registers: DINOv2 adds the position embedding to the class token and patches and *then* inserts the
registers (which get no position). That is timm's ``no_embed_class`` layout once the class token's
position is folded into the class token: ``cls_token += pos_embed[:, :1]``, ``pos_embed = pos_embed[:, 1:]``
(the same transform timm applies). The SwiGLU MLP of ViT-g/14 (``mlp.w12``/``mlp.w3``) is not supported.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..errors import CheckpointError

NAME = "dinov2"

_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")


def detect(sd: dict[str, torch.Tensor]) -> bool:
    if "patch_embed.proj.weight" not in sd:
        return False
    mask = sd.get("mask_token")
    return "register_tokens" in sd or (mask is not None and mask.ndim == 2) or any(_CHUNKED.match(k) for k in sd)


def to_canonical(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out, dropped = {}, {}
    for k, v in sd.items():
        m = _CHUNKED.match(k)
        if m:
            k = f"blocks.{m.group(1)}.{m.group(2)}"
        if k == "mask_token":
            dropped[k] = "DINOv2 mask token: only used by masked (iBOT) pre-training"
        elif k == "register_tokens":
            out["reg_token"] = v
        elif re.match(r"blocks\.\d+\.mlp\.w(12|3)\.", k):
            raise CheckpointError(
                f"key {k!r}: SwiGLU MLP (DINOv2 ViT-g/14) is not supported; hpvit's blocks use fc1-GELU-fc2 MLPs")
        else:
            out[k] = v
    if "reg_token" in out and "pos_embed" in out and "cls_token" in out:
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out, dropped


def spec_overrides(sd: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> dict[str, Any]:
    ov: dict[str, Any] = {"norm_eps": 1e-6, "act": "gelu"}
    if "register_tokens" in sd and "pos_embed" in sd:
        n = sd["pos_embed"].shape[1] - 1
        side = math.isqrt(n)
        if side * side == n:
            ov.update(no_embed_class=True, pos_grid=(side, side))
    return ov
