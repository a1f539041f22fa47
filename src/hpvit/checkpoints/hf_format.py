"""Hugging Face ``transformers`` ViT-family state dicts: ViTModel, ViTForImageClassification, ViTMAEModel,
ViTMAEForPreTraining, Dinov2Model and Dinov2WithRegistersModel.

Both naming schemes are read:

* on disk (``save_pretrained`` files of every transformers version, transformers 4 in memory):
  ``[vit.]encoder.layer.{i}.attention.attention.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense``, ``layernorm_before/after`` (Dinov2: ``norm1/2``,
  ``layer_scale{1,2}.lambda1``, ``mlp.fc1/2``);
* transformers 5 in memory (``model.state_dict()``): ``[vit.]layers.{i}.attention.{q,k,v,o}_proj``,
  ``mlp.fc1/fc2`` (Dinov2 keeps ``encoder.layer.{i}`` with ``attention.{q,k,v,o}_proj``).

q, k and v are concatenated into timm's fused ``qkv``. Weights cannot show the layer-norm epsilon, the
activation or the head count: they come from ``config.json`` when the source is a model folder;
for a bare state dict ViT/ViTMAE use transformers' default ``layer_norm_eps=1e-12`` and Dinov2
(recognised by its layer-scale tensors) ``1e-6``; ``hidden_act`` defaults to exact GELU.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..errors import CheckpointError
from ._mapping import merge_qkv

NAME = "hf"

_PFX = r"(?:vit\.|dinov2\.|dinov2_with_registers\.|model\.)?"
_EMB = re.compile(r"^" + _PFX + r"embeddings\.(.+)$")
_BLOCK = re.compile(r"^" + _PFX + r"(?:encoder\.layer|encoder\.layers|layers)\.(\d+)\.(.+)$")
_FINAL = re.compile(r"^" + _PFX + r"layernorm\.(weight|bias)$")
_POOLER = re.compile(r"^" + _PFX + r"pooler\.")

# block sub-module (source name without .weight/.bias) -> canonical name, or q/k/v for merging
_SUB = {
    "attention.attention.query": "q", "attention.q_proj": "q",
    "attention.attention.key": "k", "attention.k_proj": "k",
    "attention.attention.value": "v", "attention.v_proj": "v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1", "norm1": "norm1",
    "layernorm_after": "norm2", "norm2": "norm2",
}
_LAYERSCALE = {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}

_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
         "gelu_fast": "gelu_tanh"}


def detect(sd: dict[str, torch.Tensor]) -> bool:
    return any(_EMB.match(k) and k.endswith("patch_embeddings.projection.weight") for k in sd)


def is_dinov2(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("layer_scale1.lambda1") or ".norm1." in k for k in sd)


def model_kind(sd: dict[str, torch.Tensor]) -> str:
    """Which transformers class wrote ``sd`` (used for messages and validation)."""
    if is_dinov2(sd):
        return "Dinov2WithRegistersModel" if any(k.endswith("register_tokens") for k in sd) else "Dinov2Model"
    if any(k.startswith("decoder.") for k in sd):
        return "ViTMAEForPreTraining"
    if any(k.startswith("classifier.") for k in sd):
        return "ViTForImageClassification"
    return "ViTModel"


def to_canonical(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    qkv: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    qkv_names: dict[tuple[int, str, str], str] = {}
    dim = None
    for k, v in sd.items():
        if k.endswith("patch_embeddings.projection.weight"):
            dim = v.shape[0]
    for k, v in sd.items():
        m = _EMB.match(k)
        if m:
            rest = m.group(1)
            if rest == "cls_token":
                out["cls_token"] = v
            elif rest == "position_embeddings":
                out["pos_embed"] = v
            elif rest == "register_tokens":
                out["reg_token"] = v
            elif rest.startswith("patch_embeddings.projection."):
                out["patch_embed.proj." + rest.rsplit(".", 1)[1]] = v
            elif rest == "mask_token":
                dropped[k] = "mask token: only used by masked-image pre-training"
            else:
                out[k] = v  # unplaced: reported by the caller
            continue
        m = _BLOCK.match(k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if rest in _LAYERSCALE:
                out[f"blocks.{i}.{_LAYERSCALE[rest]}"] = v
                continue
            sub, _, leaf = rest.rpartition(".")
            tgt = _SUB.get(sub)
            if tgt is None or leaf not in ("weight", "bias"):
                out[k] = v
            elif tgt in ("q", "k", "v"):
                qkv.setdefault(i, {}).setdefault(leaf, {})[tgt] = v
                qkv_names[(i, tgt, leaf)] = k
            else:
                out[f"blocks.{i}.{tgt}.{leaf}"] = v
            continue
        m = _FINAL.match(k)
        if m:
            out["norm." + m.group(1)] = v
        elif _POOLER.match(k):
            dropped[k] = ("ViTModel pooler (dense + tanh on the class token, used by no ViT classifier): not part of "
                          "the encoder; hpvit's headless output is the normalised class token (last_hidden_state[:, 0])")
        elif k.startswith("decoder."):
            dropped[k] = "ViTMAE pre-training decoder: reconstructs masked pixels, not part of the encoder"
        elif k.startswith("classifier."):
            if dim is not None and v.ndim == 2 and v.shape[1] != dim:
                dropped[k] = (f"classifier takes {v.shape[1]} inputs (Dinov2 concatenates class token and mean patch "
                              "token), which hpvit's heads do not: a new head is trained")
            else:
                out["head." + k.split(".", 1)[1]] = v
        else:
            out[k] = v
    merge_qkv(qkv, out, out, qkv_names)
    if "reg_token" in out and "pos_embed" in out and "cls_token" in out:
        _fold_register_positions(out, dropped)
    return out, dropped


def _fold_register_positions(out: dict[str, torch.Tensor], dropped: dict[str, str]) -> None:
    """DINOv2 with registers adds position embeddings to the class token and patches *before* inserting the
    register tokens (which get none). timm expresses that as ``no_embed_class``: the class token's position
    is added into the token itself and ``pos_embed`` keeps the patch grid only (what timm's own DINOv2
    conversion does). Exact up to one float addition."""
    pos = out["pos_embed"]
    out["cls_token"] = out["cls_token"] + pos[:, :1]
    out["pos_embed"] = pos[:, 1:]


def spec_overrides(sd: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> dict[str, Any]:
    dino = is_dinov2(sd)
    ov: dict[str, Any] = {"norm_eps": 1e-6 if dino else 1e-12, "act": "gelu"}
    if config:
        if "layer_norm_eps" in config:
            ov["norm_eps"] = float(config["layer_norm_eps"])
        act = config.get("hidden_act", "gelu")
        if act not in _ACTS:
            raise CheckpointError(f"config.json hidden_act={act!r} is not supported (supported: {sorted(_ACTS)})")
        ov["act"] = _ACTS[act]
        if "num_attention_heads" in config:
            ov["num_heads"] = int(config["num_attention_heads"])
        if config.get("use_swiglu_ffn"):
            raise CheckpointError("Dinov2 with use_swiglu_ffn=True (ViT-g) is not supported: hpvit's MLP is fc1-act-fc2")
    pos = next((v for k, v in sd.items() if k.endswith("embeddings.position_embeddings")), None)
    if pos is not None and any(k.endswith("embeddings.register_tokens") for k in sd):
        side = math.isqrt(pos.shape[1] - 1)
        if side * side == pos.shape[1] - 1:  # registers carry no position: see _fold_register_positions
            ov.update(no_embed_class=True, pos_grid=(side, side))
    return ov
