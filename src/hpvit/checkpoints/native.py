"""Reading hpvit's own files: safetensors whose metadata holds the config and plain spec (classifiers and
backbones) or a dense-model description (detectors, segmenters). Writing and rebuilding models from these
files is :mod:`hpvit.export`'s job (``hpvit.save`` / ``hpvit.load``)."""

from __future__ import annotations

import os

from safetensors import safe_open

from ..errors import CheckpointError

FORMAT_VERSION = "1"


def read_metadata(path: "str | os.PathLike") -> dict[str, str]:
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


