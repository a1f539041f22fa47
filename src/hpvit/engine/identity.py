"""What a run trains on, recorded in its checkpoint so that ``--resume`` refuses to continue it on something else:
the task's description (data, classes, config...), the init checkpoint's content fingerprint and the model's
resolved config(s). The recipe is checked separately (:meth:`hpvit.engine.loop.Trainer._check_resume`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError

CHUNK = 1 << 20  # the fingerprint reads the first and last MiB of each file (and its size): fast on any file


def _plain(x: Any) -> Any:
    """``x`` as JSON values (tuples -> lists, paths -> strings), so that old and new compare as equals."""
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def fingerprint(src: Any) -> Any:
    """A content fingerprint of a checkpoint file (size + SHA-256 of its first and last MiB), of each weight file in
    a folder, or ``src`` itself when it is not a path (``timm:<name>``, None)."""
    p = Path(str(src)) if src is not None else None
    if p is None or not p.exists():
        return src
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    out = {}
    for f in files:
        h = hashlib.sha256()
        size = f.stat().st_size
        with open(f, "rb") as fh:
            h.update(fh.read(CHUNK))
            if size > 2 * CHUNK:
                fh.seek(size - CHUNK)
                h.update(fh.read(CHUNK))
        out[f.name] = f"{size} bytes, {h.hexdigest()[:16]}"
    return out if p.is_dir() else out[p.name]  # a file by its content only: a moved copy is the same init


def run_identity(task: Any, model: nn.Module) -> dict[str, Any]:
    """The identity of a run: ``task`` (its name and ``describe()``, with ``init`` as a content fingerprint so a
    moved file stays the same) and every resolved model config found in ``model``."""
    desc = dict(task.describe())
    init = desc.pop("init", None)
    configs = [m.config.to_dict() for m in model.modules()
               if hasattr(getattr(m, "config", None), "to_dict") and not isinstance(m.config, dict)]
    return _plain({"task": getattr(task, "name", type(task).__name__), **{f"task.{k}": v for k, v in desc.items()},
                   "init": fingerprint(init), "model_config": configs})


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


def _diff(old: Any, new: Any, key: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{key}.{k}" if key else k)]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and all(isinstance(o, dict) for o in old):
        return [d for i, (o, n) in enumerate(zip(old, new)) for d in _diff(o, n, key)]
    return [] if old == new else [f"{key}: {_short(old)} -> {_short(new)}"]


def check_identity(ckpt: dict[str, Any], identity: dict[str, Any], out: "str | os.PathLike") -> None:
    """ConfigError listing the differences when the checkpoint's run trained on something else (checkpoints
    written before identities were recorded are not checked, nor for entries added to the identity since)."""
    old = json.loads(ckpt["identity"]) if ckpt.get("identity") else None
    if old is None:
        return
    diffs = _diff(old, {k: v for k, v in identity.items() if k in old}, "")
    if diffs:
        raise ConfigError(
            f"cannot resume {out}: the run was started on something else ({len(diffs)} difference(s)): "
            + "; ".join(diffs[:8]) + ("; ..." if len(diffs) > 8 else "")
            + ". Resume with the original --data, --model, --config and task flags, or start over with --overwrite "
            "or in another --out")


# the keys of ``Task.describe()`` that name where a task reads its data (folders, zips, image lists); the other
# values (the config preset, the layout, a split's name...) are not paths even when a folder of that name exists
DATA_KEYS = ("data", "images", "eval_data", "eval_images")


def data_paths(task: Any) -> list[tuple[str, str]]:
    """``(key, path)`` for every data folder or file ``task`` reads (the :data:`DATA_KEYS` entries of its
    ``describe()``)."""
    desc = task.describe()
    return [(k, v) for k in DATA_KEYS for v in (desc[k] if isinstance(desc.get(k), (list, tuple)) else [desc.get(k)])
            if isinstance(v, str) and v]


def check_out_outside_data(task: Any, out: "str | os.PathLike") -> None:
    """ConfigError when the run's folder lies inside a folder the task reads its data from (its files would
    become data: ``DATA/train/NEW/curves.png`` is an image of a new class ``NEW``). Only the task's data paths
    (:func:`data_paths`) count; ``hpvit train`` runs this before the output folder is claimed or a model loads."""
    o = Path(out).resolve()
    for k, v in data_paths(task):
        if Path(v).is_dir() and o.is_relative_to(Path(v).resolve()):
            raise ConfigError(f"--out {out} is inside the data folder {v} ({k}): the run's files (curves.png, "
                              "model files...) would be read as data by the next run. Choose an --out outside it")
