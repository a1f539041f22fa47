"""CLIP image towers in the OpenAI / open_clip layout (``visual.conv1``, ``visual.class_embedding``,
``visual.positional_embedding``, ``visual.ln_pre``, ``visual.transformer.resblocks.{i}``, ``visual.ln_post``,
``visual.proj``), as a full CLIP file (the text tower is dropped and reported) or the visual part alone.

Mapping: ``conv1`` -> ``patch_embed.proj`` (no bias), ``class_embedding (D,)`` -> ``cls_token (1, 1, D)``,
``positional_embedding (L, D)`` -> ``pos_embed (1, L, D)``, ``ln_pre`` -> ``norm_pre``, ``ln_1/ln_2`` ->
``norm1/norm2``, ``attn.in_proj_{weight,bias}`` (already q|k|v stacked, like timm) -> ``attn.qkv``,
``attn.out_proj`` -> ``attn.proj``, ``mlp.c_fc/c_proj`` -> ``mlp.fc1/fc2``, ``ls_1/ls_2`` -> ``ls1/ls2``,
``ln_post`` -> ``norm`` (a per-token LayerNorm, so before or after taking the class token is the same) and
``proj (D, E)`` -> ``head_proj.weight (E, D)`` (transposed: nn.Linear stores (out, in)).

The activation is not in the weights: QuickGELU (``x * sigmoid(1.702 x)``, what OpenAI trained with and
open_clip's ``*-quickgelu`` models use) is the default; pass ``act="gelu"`` for open_clip models trained with
nn.GELU (e.g. LAION ``ViT-B-32`` without ``-quickgelu``). LayerNorm epsilon: 1e-5 (PyTorch's default,
used by both).
"""

from __future__ import annotations

import re
from typing import Any

import torch

NAME = "clip"

_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_SUB = {
    "ln_1": "norm1", "ln_2": "norm2", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}


def _visual_prefix(sd: dict[str, torch.Tensor]) -> str | None:
    if "visual.conv1.weight" in sd:
        return "visual."
    if "conv1.weight" in sd and "class_embedding" in sd:
        return ""
    return None


def detect(sd: dict[str, torch.Tensor]) -> bool:
    p = _visual_prefix(sd)
    return p is not None and f"{p}transformer.resblocks.0.attn.in_proj_weight" in sd


def to_canonical(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    pfx = _visual_prefix(sd) or ""
    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    for key, v in sd.items():
        if not key.startswith(pfx):
            dropped[key] = "CLIP text tower / logit scale: not part of the image encoder"
            continue
        k = key[len(pfx):]
        if k == "conv1.weight":
            out["patch_embed.proj.weight"] = v
        elif k == "conv1.bias":
            out["patch_embed.proj.bias"] = v
        elif k == "class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            out["pos_embed"] = v.unsqueeze(0) if v.ndim == 2 else v
        elif k.startswith("ln_pre."):
            out["norm_pre." + k.split(".", 1)[1]] = v
        elif k.startswith("ln_post."):
            out["norm." + k.split(".", 1)[1]] = v
        elif k == "proj":
            out["head_proj.weight"] = v.t().contiguous()
        elif _BLOCK.match(k):
            i, rest = _BLOCK.match(k).groups()
            b = f"blocks.{i}."
            if rest == "attn.in_proj_weight":
                out[b + "attn.qkv.weight"] = v
            elif rest == "attn.in_proj_bias":
                out[b + "attn.qkv.bias"] = v
            elif rest in ("ls_1.gamma", "ls_2.gamma"):
                out[b + rest.replace("ls_", "ls")] = v
            else:
                sub, _, leaf = rest.rpartition(".")
                out[b + f"{_SUB[sub]}.{leaf}" if sub in _SUB else key] = v
        else:
            out[key] = v  # unplaced (e.g. attn_pool of CoCa): reported by the caller
    return out, dropped


def spec_overrides(sd: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"act": "quick_gelu", "norm_eps": 1e-5}
