"""Safe reading of weight files. Nothing here ever unpickles arbitrary code (writing lives in
:mod:`hpvit.utils` and :mod:`hpvit.export`)."""

from __future__ import annotations

import argparse
import io as _io
import json
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
WRAPPER_KEYS = ("model", "state_dict", "model_state", "module", "model_ema", "teacher")


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load a weight file as a dict, safely.

    ``.safetensors`` goes through safetensors; anything else through ``torch.load(weights_only=True)``,
    which refuses pickles that would run code. Errors name the file and say what to do.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory; pass the weight file inside it (or a Hugging Face model folder)")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: the file is empty (interrupted download?); download it again")
    if p.suffix == ".safetensors":
        try:
            return dict(load_file(str(p)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({e}); the file is corrupt or truncated") from e
    try:
        # argparse.Namespace: the training arguments MAE, DeiT and many scripts store next to the weights;
        # rebuilding one only sets attributes (no code runs), so it is allowed alongside tensors.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refs = _pickle_globals(p)
        if refs is None:
            raise CheckpointError(
                f"{p}: cannot read the file (not a valid pickle/zip); it is corrupt, truncated or not a "
                "PyTorch/safetensors weight file"
            ) from e
        unsafe = [r for r in refs if not r.startswith(("torch.", "collections.", "_codecs.", "numpy."))] or refs
        raise CheckpointError(
            f"{p}: refusing to load: the pickle needs code execution (it references {unsafe[:3]}). hpvit only "
            "loads plain tensors (torch.load(weights_only=True)). If you trust the file, re-save its state_dict "
            "with torch.save(model.state_dict(), ...) or convert it to .safetensors"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, struct.error) as e:  # text or random bytes trip the pickle reader in many ways
        raise CheckpointError(
            f"{p}: cannot read the file ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
            "it is corrupt, truncated or not a PyTorch/safetensors weight file"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: expected a dict of tensors, found a {type(obj).__name__}; save model.state_dict() instead")
    return obj


def unwrap_state_dict(obj: dict[str, Any], source: str = "<state_dict>") -> dict[str, torch.Tensor]:
    """Find the tensor dict inside common wrappers (``model``, ``state_dict``, ...) and strip ``module.``."""
    sd: Any = obj
    for _ in range(3):
        if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            for k in WRAPPER_KEYS:
                if k in sd and isinstance(sd[k], dict):
                    sd = sd[k]
                    break
            else:
                break
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: no state dict found")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{source}: no tensors found (top-level keys: {sorted(map(str, obj))[:8]}); expected a state_dict, "
            f"possibly wrapped in one of {WRAPPER_KEYS}"
        )
    for prefix in ("module.", "_orig_mod.", "model."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def read_folder_or_file(path: str) -> dict[str, Any]:
    """A weight file, or a folder holding exactly one recognisable weight file."""
    p = Path(path)
    if p.is_dir():
        index = sorted(p.glob("*.index.json"))
        if index:
            return read_shards(index[0])
        for name in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if (p / name).is_file():
                return read_file(p / name)
        cands = sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
        if len(cands) == 1:
            return read_file(cands[0])
        if not cands:
            raise CheckpointError(
                f"{p}: the folder holds no weight file ({', '.join(WEIGHT_SUFFIXES)}); point at the checkpoint file itself"
            )
        raise CheckpointError(f"{p}: the folder holds several weight files {[c.name for c in cands]}; pass one of them")
    return read_file(p)


def read_shards(index: Path) -> dict[str, Any]:
    """The tensors of a sharded Hugging Face checkpoint (``model.safetensors.index.json`` /
    ``pytorch_model.bin.index.json`` next to its shard files), merged into one dict. Missing shard files are
    named before anything is read."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a readable shard index ({type(e).__name__}: {e}); it should be a JSON "
                              "object with a 'weight_map' {tensor name: shard file}; download the checkpoint again") from e
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index}: {len(missing)} of {len(shards)} shard file(s) it lists are missing from {index.parent}: "
            f"{missing[:4]}; the download is incomplete: download the missing shard(s) (or the whole folder) again")
    out: dict[str, Any] = {}
    for s in shards:
        out.update(unwrap_state_dict(read_file(index.parent / s), str(index.parent / s)))
    return out


def read_folder_config(path: str) -> dict[str, Any] | None:
    """``config.json`` of a Hugging Face model folder (or next to a weight file inside one), else None."""
    p = Path(path)
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg}: unreadable config.json ({e}); fix or remove it") from e
    return data if isinstance(data, dict) else None


def _pickle_globals(p: Path) -> list[str] | None:
    """The global names a pickle (or a torch zip's data.pkl) references, read with pickletools without
    executing anything; None when the bytes are not a readable pickle at all."""
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                data = z.read(name)
        else:
            data = p.read_bytes()
        refs: list[str] = []
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(_io.BytesIO(data)):
            if op.name == "GLOBAL":
                refs.append(str(arg).replace(" ", "."))
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                refs.append(f"{strings[-2]}.{strings[-1]}")
        return refs
    except Exception:
        return None
