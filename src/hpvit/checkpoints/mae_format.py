"""Official MAE pre-training checkpoints (``{"model": ...}`` from facebookresearch/mae ``main_pretrain.py``).

The encoder is a timm ViT (same names); ``decoder_*`` (embed, blocks, norm, pred, pos_embed) and
``mask_token`` serve pixel reconstruction only and are dropped and reported. MAE fine-tuned
checkpoints are plain timm layouts (``fc_norm`` + ``head`` when fine-tuned with global pooling) and are
read by the ``timm`` format.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "mae"


def detect(sd: dict[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in sd and any(k.startswith("decoder_") for k in sd)


def to_canonical(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out, dropped = {}, {}
    for k, v in sd.items():
        if k.startswith("decoder_"):
            dropped[k] = "MAE pre-training decoder: reconstructs masked pixels, not part of the encoder"
        elif k == "mask_token":
            dropped[k] = "MAE mask token: only used by the pre-training decoder"
        else:
            out[k] = v
    return out, dropped


def spec_overrides(sd: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"norm_eps": 1e-6, "act": "gelu"}  # MAE builds its encoder with LayerNorm(eps=1e-6) and nn.GELU
