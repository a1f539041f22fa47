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

from .reuse import restore_reuse_report  # noqa: F401 (used by the detector / segmenter loaders)
from ..errors import CheckpointError

DENSE_LOADERS = {"det": "hpvit.models.detector:load_detector", "seg": "hpvit.models.segmenter:load_segmenter"}


def save_dense(model: nn.Module, path: "str | os.PathLike", meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights to ``path`` (.safetensors) and ``meta`` next to it (``path`` with .json)."""
    from safetensors.torch import save_model

    from ..checkpoints.io import atomic_write, write_text_atomic

    p = Path(path)
    atomic_write(p, lambda tmp: save_model(model, tmp, metadata={"hpvit_dense": json.dumps(meta)}), force=True)
    write_text_atomic(p.with_suffix(".json"), json.dumps(meta, indent=2))
    return p


def dense_meta_reuse(body: nn.Module) -> dict[str, Any]:
    """``{"reuse": report}`` for a dense backbone whose ViT was converted from a plain checkpoint (else empty)."""
    report = getattr(getattr(body, "vit", None), "_reuse_report", None)
    return {} if report is None else {"reuse": report.to_dict()}


def load_dense(path: "str | os.PathLike") -> nn.Module:
    """The detector or segmenter in ``path`` (whichever its metadata names), with ``model.hpvit_meta`` set."""
    import importlib

    _, meta = read_dense(path, None, tensors=False)
    task = meta.get("task")
    if task not in DENSE_LOADERS:
        raise CheckpointError(f"{path}: holds a {task!r} model, which this version of hpvit cannot load; upgrade hpvit")
    module, fn = DENSE_LOADERS[task].split(":")
    model, meta = getattr(importlib.import_module(module), fn)(path)
    model.hpvit_meta = meta
    return model


def read_dense(path: "str | os.PathLike", expect_task: "str | None",
               tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of a file written by :func:`save_dense`; ``path`` may be a training directory.
    ``expect_task`` None accepts any task; ``tensors=False`` reads only the metadata (empty state dict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise CheckpointError(f"{p}: no such model file; pass a `hpvit train {expect_task or 'det|seg'}` output "
                              "directory or its model.safetensors")
    try:
        with safe_open(str(p), framework="pt") as f:
            md = f.metadata() or {}
        sd = load_file(str(p)) if tensors else {}
    except Exception as e:
        raise CheckpointError(f"{p}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if "hpvit_dense" not in md:
        hint = " (it is an hpvit classifier/backbone file: load it with hpvit.load)" if "hpvit_config" in md else ""
        raise CheckpointError(f"{p}: not an hpvit dense-prediction model (no 'hpvit_dense' metadata){hint}; give the "
                              f"output of `hpvit train {expect_task or 'det|seg'}`")
    meta = json.loads(md["hpvit_dense"])
    if expect_task is not None and meta.get("task") != expect_task:
        raise CheckpointError(f"{p}: holds a {meta.get('task')!r} model, not a {expect_task!r} one; use "
                              f"`hpvit eval {meta.get('task')}`")
    return sd, meta
