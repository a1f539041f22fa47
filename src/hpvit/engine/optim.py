"""AdamW with layer-wise learning-rate decay (MAE/BEiT style) whose layer ids follow the model's hierarchy.

Layer ids come from the model's timm-style ``group_matcher()``: the stem (patch embedding, position
embedding, class token) is layer 0, block ``i`` is layer ``i + 1`` -- which includes the pooling
layer (``blocks.{i}.downsample``) and relative-position table (``blocks.{i}.attn.rel_pos_table``) of
the block they feed -- and the final norm and head are the last layer ``num_blocks + 1``. Layer ``l``
gets ``lr * layer_decay ** (num_blocks + 1 - l)``.

Parameters the transform adds (``model.new_parameter_names()``: pooling convs, relative-position
tables) start from zero and have no pre-trained value to protect; with ``new_param_lr_scale`` set they
train at that fraction of the base lr instead of the (up to 100x) decayed lr of the block they feed.

No weight decay on 1-d parameters (norm weights, biases), on ``model.no_weight_decay()`` names
(position embeddings, class/register tokens, relative-position tables) or on any parameter whose
name ends with one of them (detection/segmentation wrappers prefix the backbone's names).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn


def _matchers(model: nn.Module):
    gm = model.group_matcher() if hasattr(model, "group_matcher") else {}
    stem = gm.get("stem")
    blocks = gm.get("blocks", [(r"^blocks\.(\d+)", None)])
    if isinstance(blocks, str):
        blocks = [(blocks, None)]
    return (re.compile(stem) if stem else None), [(re.compile(p), fixed) for p, fixed in blocks]


def num_layers(model: nn.Module) -> int:
    """Number of layer ids: stem + one per block + head."""
    depth = len(model.blocks) if hasattr(model, "blocks") else 0
    return depth + 2


def layer_id(name: str, model: nn.Module, prefix: str = "") -> int:
    """Layer id of parameter ``name`` (see the module docstring)."""
    n_layers = num_layers(model)
    if prefix:
        if not name.startswith(prefix):
            return n_layers - 1  # a task head outside the backbone: the last layer
        name = name[len(prefix):]
    stem, blocks = _matchers(model)
    if stem is not None and stem.match(name):
        return 0
    for pat, fixed in blocks:
        m = pat.match(name)
        if m:
            if fixed is not None:  # e.g. (r"^norm", (99999,)): after every block
                return n_layers - 1
            return min(int(m.group(1)) + 1, n_layers - 1)
    return n_layers - 1


def no_decay(name: str, param: torch.Tensor, skip: set[str]) -> bool:
    if param.ndim <= 1:
        return True
    base = name.split(".")[-1]
    return name in skip or any(name.endswith("." + s) or name == s for s in skip) or base in skip


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    backbone: nn.Module | None = None,
    backbone_prefix: str = "",
    new_param_lr_scale: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for AdamW: one per (layer id, decay/no-decay), with ``lr_scale`` and ``layer_id``.

    ``backbone``/``backbone_prefix``: for task models that wrap a backbone (detection, segmentation), the
    backbone module whose ``group_matcher`` defines layer ids and the attribute prefix of its
    parameters (e.g. ``"backbone."``); every other parameter is a head parameter (last layer).
    """
    bb = backbone if backbone is not None else model
    skip = set(bb.no_weight_decay()) if hasattr(bb, "no_weight_decay") else set()
    if backbone is not None and hasattr(model, "no_weight_decay") and model is not backbone:
        skip |= set(model.no_weight_decay())
    n_layers = num_layers(bb)
    new = set()
    if new_param_lr_scale is not None and hasattr(bb, "new_parameter_names"):
        new = {backbone_prefix + n for n in bb.new_parameter_names()}
    groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, bb, backbone_prefix)
        nd = no_decay(name, p, skip)
        is_new = name in new
        key = (lid, nd, is_new)
        if key not in groups:
            scale = new_param_lr_scale if is_new else layer_decay ** (n_layers - 1 - lid)
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if nd else weight_decay,
                "lr_scale": float(scale),
                "layer_id": lid,
                "new_params": is_new,
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, recipe, lr: float, **kw) -> torch.optim.AdamW:
    kw.setdefault("new_param_lr_scale", getattr(recipe, "new_param_lr_scale", None))
    groups = param_groups(model, recipe.weight_decay, recipe.layer_decay, **kw)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(recipe.betas))
