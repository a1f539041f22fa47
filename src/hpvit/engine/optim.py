"""AdamW with layer-wise learning-rate decay (MAE/BEiT style) whose layer ids follow the model's hierarchy.

Layer ids come from the model's timm-style ``group_matcher()``: the stem (patch embedding, position
embedding, class token) is layer 0, block ``i`` is layer ``i + 1`` -- which includes the pooling
layer (``blocks.{i}.downsample``) and relative-position table (``blocks.{i}.attn.rel_pos_table``) of
the block they feed -- and the final norm and head are the last layer ``num_blocks + 1``. Layer ``l``
gets ``lr * layer_decay ** (num_blocks + 1 - l)``.

Parameters the transform adds (``model.new_parameter_names()``: pooling convs, relative-position
tables) start from zero and have no pre-trained value to protect; with ``new_param_lr_scale`` set they
train at that fraction of the base lr instead of the (up to 100x) decayed lr of the block they feed.

No weight decay on 1-d parameters (norm weights, biases) or on ``model.no_weight_decay()`` names
(position embeddings, class/register tokens, relative-position tables; task models that wrap a backbone
answer with the full names, prefix included).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn


def _matchers(model: nn.Module):
    gm = model.group_matcher() if hasattr(model, "group_matcher") else {}
    stem = gm.get("stem")
    blocks = gm.get("blocks", [])
    if isinstance(blocks, str):
        blocks = [(blocks, None)]
    return (re.compile(stem) if stem else None), [(re.compile(p), fixed) for p, fixed in blocks]


def num_layers(model: nn.Module) -> int:
    """Number of layer ids: stem + one per block + head (blocks counted by the model's ``group_matcher``)."""
    _, blocks = _matchers(model)
    top = -1
    for name, _ in model.named_parameters():
        for pat, fixed in blocks:
            m = pat.match(name)
            if m and fixed is None:
                top = max(top, int(m.group(1)))
                break
    return top + 3


def layer_id(name: str, model: nn.Module, n_layers: "int | None" = None) -> int:
    """Layer id of parameter ``name`` of ``model`` (see the module docstring): 0 for what the model's
    ``group_matcher`` calls the stem, ``i + 1`` for block ``i``, the last id for everything else (norms after
    the blocks, heads, necks of task models)."""
    n_layers = num_layers(model) if n_layers is None else n_layers
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
    return param.ndim <= 1 or name in skip


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    new_param_lr_scale: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for AdamW: one per (layer id, decay/no-decay, new), with ``lr_scale`` and ``layer_id``.

    Everything comes from the model's dense-backbone contract (timm's names): ``group_matcher()`` for the
    layer ids, ``no_weight_decay()`` for the parameters without weight decay (full names), and, when
    ``new_param_lr_scale`` is set, ``new_parameter_names()`` for the parameters the transform added. Task
    models that wrap a backbone (detection, segmentation, adaptation) answer with their own full names.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    n_layers = num_layers(model)
    new = set()
    if new_param_lr_scale is not None and hasattr(model, "new_parameter_names"):
        new = set(model.new_parameter_names())
    groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, model, n_layers)
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
