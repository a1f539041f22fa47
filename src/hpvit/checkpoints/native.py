"""hpvit's own file format: safetensors with the config and plain spec in the metadata.

:func:`load` reads every model file hpvit writes: classifiers and backbones (``hpvit.save``, ``hpvit
convert``, ``hpvit train cls``, ``hpvit adapt``) and the detectors and segmenters of ``hpvit train det`` /
``hpvit train seg`` (their metadata says which; see :mod:`hpvit.models.dense_io`). The conversion's reuse
report (which source tensors were reused, which are new, which were dropped) travels in the metadata, so
``reuse_report()`` on a loaded model describes that file's conversion.
"""

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
    report = reuse_report_meta(model)
    if report is not None:
        meta["reuse_report"] = report
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta), force=force)
    return os.fspath(path)


def reuse_report_meta(model) -> "str | None":
    """The model's conversion reuse report as JSON for a file's metadata (None for a model not converted)."""
    report = getattr(model, "_reuse_report", None)
    return None if report is None else report.to_json()


def restore_reuse_report(model, stored: "str | dict | None", path: "str | os.PathLike") -> None:
    """Give ``model`` back the reuse report ``stored`` in ``path``'s metadata (JSON text or dict).

    Files written before full reports were kept hold only counts (``reuse_summary``): the report then lists
    no tensors and its source says so."""
    from ..models.reuse import ReuseReport

    if stored is None:
        return
    d = json.loads(stored) if isinstance(stored, str) else dict(stored)
    src = f"{d.get('source', '<unknown>')} (recorded in {os.fspath(path)} at conversion)"
    if isinstance(d.get("reused"), int):  # old count-only summary
        model._reuse_report = ReuseReport(reused=[], new=[], dropped={}, source=(
            f"{src}: only counts were kept: {d['reused']} reused, {d.get('new', 0)} new, {d.get('dropped', 0)} dropped"))
        return
    model._reuse_report = ReuseReport(
        reused=[(r["model"], r["source"], r.get("note", "")) for r in d.get("reused", [])], new=list(d.get("new", [])),
        dropped=dict(d.get("dropped", {})), source=src, numel=dict(d.get("numel", {})))


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


def model_file(path: "str | os.PathLike") -> str:
    """``path`` itself, or for a training output folder its ``model.safetensors``; a clear error for the other
    files a run writes (``checkpoint-last.pt`` is a resume point, not a model file)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        f = os.path.join(p, "model.safetensors")
        if not os.path.isfile(f):
            raise CheckpointError(f"{p}: a folder without model.safetensors; pass a finished `hpvit train` output "
                                  "folder or a .safetensors file hpvit wrote")
        return f
    if not os.path.isfile(p):
        raise CheckpointError(f"{p}: no such file or folder")
    if p.endswith(".pt") and os.path.basename(p).startswith("checkpoint"):
        raise CheckpointError(f"{p}: a training checkpoint (resume point), not a model file; load the run's "
                              "model.safetensors (written when training finishes), or continue with `--resume`")
    return p


def is_hpvit_model_file(path: "str | os.PathLike") -> bool:
    """True for any model file hpvit writes (classifier/backbone, detector, segmenter), or a folder holding one."""
    try:
        p = model_file(path)
        meta = read_metadata(p) if p.endswith(".safetensors") else {}
    except CheckpointError:
        return False
    return "hpvit_config" in meta or "hpvit_dense" in meta


def load(path: "str | os.PathLike", map_location: str = "cpu"):
    """Rebuild any model hpvit wrote (bit-identical outputs): a classifier/backbone saved by :func:`save`
    (a :class:`~hpvit.models.HierarchicalViT`), or a detector / segmenter written by ``hpvit train det|seg``
    (``MaskRCNNModel`` / ``UperNetSegmenter``, with the file's description in ``model.hpvit_meta``).
    ``path`` may also be a training output folder (its ``model.safetensors`` is loaded)."""
    from safetensors.torch import load_file

    from ..checkpoints.spec import PlainSpec
    from ..config import HPViTConfig
    from ..models.hierarchical import HierarchicalViT

    path = model_file(path)
    meta = read_metadata(path)
    if "hpvit_dense" in meta:
        from ..models.dense_io import load_dense

        return load_dense(path)
    if "hpvit_config" not in meta:
        raise CheckpointError(
            f"{path}: no hpvit metadata; this is not a file written by hpvit. For a plain ViT checkpoint use "
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
    restore_reuse_report(model, meta.get("reuse_report") or meta.get("reuse_summary"), path)
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
