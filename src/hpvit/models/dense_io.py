"""Saving and loading dense-prediction models (detector / segmenter): safetensors weights plus a JSON
description (backbone kind, HPViTConfig, plain spec, head settings, class names), read back without
unpickling anything."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError


def save_dense(model: nn.Module, path: "str | os.PathLike", meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights to ``path`` (.safetensors) and ``meta`` next to it (``path`` with .json)."""
    from safetensors.torch import save_model

    from ..checkpoints.io import atomic_write, write_text_atomic

    p = Path(path)
    atomic_write(p, lambda tmp: save_model(model, tmp, metadata={"hpvit_dense": json.dumps(meta)}), force=True)
    write_text_atomic(p.with_suffix(".json"), json.dumps(meta, indent=2))
    return p


def read_dense(path: "str | os.PathLike", expect_task: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of a file written by :func:`save_dense`; ``path`` may be a training directory."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise CheckpointError(f"{p}: no such model file; pass a `hpvit train {expect_task}` output directory or its "
                              "model.safetensors")
    try:
        with safe_open(str(p), framework="pt") as f:
            md = f.metadata() or {}
        sd = load_file(str(p))
    except Exception as e:
        raise CheckpointError(f"{p}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if "hpvit_dense" not in md:
        raise CheckpointError(f"{p}: not an hpvit dense-prediction model (no 'hpvit_dense' metadata); give the output "
                              f"of `hpvit train {expect_task}`")
    meta = json.loads(md["hpvit_dense"])
    if meta.get("task") != expect_task:
        raise CheckpointError(f"{p}: holds a {meta.get('task')!r} model, not a {expect_task!r} one; use "
                              f"`hpvit eval {meta.get('task')}`")
    return sd, meta
