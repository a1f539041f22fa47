"""DeiT distilled checkpoints (``deit_*_distilled_patch16_224``: ``dist_token`` and ``head_dist``).

Decision: the distillation token is kept as a second prefix token (canonical ``reg_token``: it sits right
after the class token and has its own position embedding, exactly like timm's register tokens with
``no_embed_class=False``), so every token of the encoder is reproduced exactly by the ``identity``
config. ``head_dist`` is dropped and reported: hpvit's classifier reads one token, so the converted
model's logits are the class-token head's, not DeiT's inference-time average of both heads. Hierarchical
configs drop both prefix tokens (they pool by average) like any register token.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "deit"


def detect(sd: dict[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in sd and "dist_token" in sd


def to_canonical(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out, dropped = {}, {}
    for k, v in sd.items():
        if k == "dist_token":
            out["reg_token"] = v
        elif k.startswith("head_dist."):
            dropped[k] = ("DeiT distillation head: hpvit classifies from the class token only (logits = the class "
                          "head's, not the average of both heads)")
        else:
            out[k] = v
    return out, dropped


def spec_overrides(sd: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"norm_eps": 1e-6, "act": "gelu"}
