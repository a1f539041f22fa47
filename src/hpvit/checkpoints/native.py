"""hpvit's own file format: safetensors with the config and plain spec in the metadata."""

from __future__ import annotations

import json
import os

import torch

from ..errors import CheckpointError
from .io import atomic_write

FORMAT_VERSION = "1"


def save(model, path: "str | os.PathLike", force: bool = True) -> str:
    """Write ``model`` (a HierarchicalViT) to ``path`` as safetensors, atomically.

    The metadata holds ``hpvit_config`` and ``hpvit_spec`` (JSON) and ``num_classes`` so
    :func:`load` rebuilds the same model. ``force=False`` refuses to replace an existing file.
    """
    from safetensors.torch import save_file

    meta = {
        "hpvit_format": FORMAT_VERSION,
        "hpvit_config": model.config.to_json(),
        "hpvit_spec": model.spec.to_json(),
        "num_classes": str(model.num_classes),
        "head_type": model.head_type,
    }
    report = getattr(model, "_reuse_report", None)
    if report is not None:
        meta["reuse_summary"] = json.dumps(
            dict(source=report.source, reused=len(report.reused), new=len(report.new), dropped=len(report.dropped))
        )
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta), force=force)
    return os.fspath(path)


def read_metadata(path: "str | os.PathLike") -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def is_hpvit_file(path: "str | os.PathLike") -> bool:
    p = os.fspath(path)
    if not (p.endswith(".safetensors") and os.path.isfile(p)):
        return False
    try:
        return "hpvit_config" in read_metadata(p)
    except CheckpointError:
        return False


def load(path: "str | os.PathLike", map_location: str = "cpu"):
    """Rebuild a model saved by :func:`save` (bit-identical outputs)."""
    from safetensors.torch import load_file

    from ..checkpoints.spec import PlainSpec
    from ..config import HPViTConfig
    from ..models.hierarchical import HierarchicalViT

    meta = read_metadata(path)
    if "hpvit_config" not in meta:
        raise CheckpointError(
            f"{path}: no hpvit metadata; this is not a file written by hpvit.save. For a plain ViT checkpoint use "
            "hpvit.from_plain(path, config=...) (or `hpvit convert`)"
        )
    try:
        cfg = HPViTConfig.from_dict(json.loads(meta["hpvit_config"]))
        spec = PlainSpec.from_dict(json.loads(meta["hpvit_spec"]))
        model = HierarchicalViT(spec, cfg, num_classes=int(meta.get("num_classes", "")))
    except Exception as e:  # bad JSON, unknown/invalid fields, impossible sizes: the metadata was altered
        raise CheckpointError(
            f"{path}: the hpvit metadata (config / spec / num_classes) is damaged and cannot rebuild the model "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); the file was edited or corrupted. "
            "Re-create it from the original checkpoint with `hpvit convert` (or save the model again with hpvit.save)"
        ) from e
    if meta.get("head_type") and meta["head_type"] != model.head_type:
        model.head_type = meta["head_type"]
    sd = load_file(os.fspath(path), device=map_location)
    missing, unexpected = model.load_state_dict(sd, strict=False) if _shapes_fit(model, sd, path) else ([], [])
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the stored config (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}); the file was edited or corrupted. Re-create it with `hpvit convert`")
    return model


def _shapes_fit(model, sd: dict, path) -> bool:
    """Raise CheckpointError naming the tensors whose shapes differ from what the stored config builds."""
    own = model.state_dict()
    flexible = set(getattr(model, "flexible_shape_keys", ()))  # e.g. a position embedding stored at any grid
    wrong = [f"{k} {tuple(v.shape)} (config needs {tuple(own[k].shape)})" for k, v in sd.items()
             if k in own and k not in flexible and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(
            f"{path}: {len(wrong)} tensor(s) have shapes the stored config does not build, e.g. {wrong[:3]}; the "
            "metadata or the tensors were edited. Re-create the file from the original checkpoint with `hpvit convert`"
        )
    return True
