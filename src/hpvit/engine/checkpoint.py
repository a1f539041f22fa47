"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds everything needed to continue bit-exactly: model, optimizer, schedule, AMP
scaler, EMA, position (epoch, step within the epoch, update count), the RNG states of ``torch``,
``numpy`` and ``random`` (stored as tensors and plain Python values, never pickled objects) and the
data-order seed. ``resume`` rebuilds the identical sampler position from (seed, epoch, step).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils import atomic_write
from ..errors import CheckpointError

CKPT_VERSION = 1
LAST = "checkpoint-last.pt"
# what every checkpoint the engine writes holds (later additions, e.g. the run's identity, are optional)
REQUIRED = ("model", "optimizer", "scheduler", "scaler", "ema", "epoch", "step_in_epoch", "global_step", "rng",
            "world_size", "recipe", "train_time", "images_seen", "wall_time", "history")


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save_checkpoint(path: "str | os.PathLike", state: dict[str, Any]) -> Path:
    state = dict(state, version=CKPT_VERSION)
    return atomic_write(path, lambda tmp: torch.save(state, tmp), force=True)


def load_checkpoint(path: "str | os.PathLike") -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no checkpoint to resume from; run without --resume to start a new run")
    try:
        st = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{p}: cannot read the training checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it is corrupt or not written by hpvit; delete it to start over"
        ) from e
    if not isinstance(st, dict) or st.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{p}: not an hpvit training checkpoint (version {st.get('version') if isinstance(st, dict) else None})")
    return st


def check_complete(st: dict[str, Any], p: "str | os.PathLike") -> None:
    """CheckpointError naming what is missing or invalid in a checkpoint that was edited (or cut by another tool)."""
    missing = [k for k in REQUIRED if k not in st]
    bad = [k for k in ("epoch", "step_in_epoch", "global_step") if k in st and not (
        isinstance(st[k], int) and not isinstance(st[k], bool) and st[k] >= 0)]
    if missing or bad:
        raise CheckpointError(
            f"{p}: the training checkpoint is incomplete or edited ("
            + (f"missing {missing}" if missing else "") + ("; " if missing and bad else "")
            + (f"invalid {', '.join(f'{k}={st[k]!r}' for k in bad)}" if bad else "")
            + "); it cannot continue the run exactly. Delete it and start over (--overwrite)")
