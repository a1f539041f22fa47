"""timm ``VisionTransformer`` state dicts: already the canonical layout."""

from __future__ import annotations

import torch

NAME = "timm"

# Keys that timm-format files may carry but that are not part of the plain encoder we transform.
DROPPABLE = {
    "mask_token": "MAE/BEiT mask token: only used in masked pre-training",
}


def detect(sd: dict[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in sd and any(k.startswith("blocks.0.attn.qkv") for k in sd)


def to_canonical(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (canonical state dict, {dropped key: reason}). Unplaceable keys are left in the dict for the
    caller to report."""
    out, dropped = {}, {}
    for k, v in sd.items():
        if k in DROPPABLE:
            dropped[k] = DROPPABLE[k]
        else:
            out[k] = v
    return out, dropped
