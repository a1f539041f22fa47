"""Reading plain-ViT checkpoints of every supported format into one canonical layout."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hub_constants

from ..errors import CheckpointError, OfflineError
from .detect import closest_format, detect_format, format_names, get_format
from .io import read_folder_config, read_folder_or_file, unwrap_state_dict
from .native import is_hpvit_model_file, model_file, read_metadata
from .spec import PlainSpec, check_shapes, infer_spec, is_canonical_key

__all__ = ["PlainViT", "PlainSpec", "load_plain", "infer_spec"]


@dataclass
class PlainViT:
    """A plain ViT in canonical (timm) layout, with its inferred spec and provenance."""

    state_dict: dict[str, torch.Tensor]
    spec: PlainSpec
    source: str = "<state_dict>"
    format: str = "timm"
    dropped: dict[str, str] = field(default_factory=dict)
    dropped_numel: int = 0  # values in the tensors dropped while reading the source

    def summary(self) -> str:
        lines = [f"source: {self.source}", f"format: {self.format}", f"spec:   {self.spec.describe()}"]
        n = sum(v.numel() for v in self.state_dict.values())
        lines.append(f"tensors: {len(self.state_dict)} ({n / 1e6:.2f}M values)")
        if self.dropped:
            lines.append(f"dropped from the source ({len(self.dropped)}):")
            for k, why in list(self.dropped.items())[:10]:
                lines.append(f"  - {k}: {why}")
            if len(self.dropped) > 10:
                lines.append(f"  ... and {len(self.dropped) - 10} more")
        return "\n".join(lines)


HUB_PROBE_TIMEOUT_S = 3.0


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within ``timeout`` seconds (True behind a proxy,
    which cannot be probed this way). Lets an offline machine fail in seconds instead of retrying for a minute."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    u = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((u.hostname or "huggingface.co", u.port or (443 if u.scheme != "http" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_cache_only() -> Iterator[None]:
    """huggingface_hub in offline mode: weights come from the local cache or fail at once."""
    saved = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


def _from_hub(name: str) -> tuple[dict[str, torch.Tensor], str]:
    offline = not _hub_reachable()
    try:
        with _hub_cache_only() if offline else contextlib.nullcontext():
            m = timm.create_model(name, pretrained=True)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise CheckpointError(f"timm:{name}: timm has no model named {name!r} (see timm.list_models('vit_*'))") from e
        if not offline:
            raise
        raise _offline_error(name, e, offline) from e
    except Exception as e:  # network errors come in many types (OSError, requests, huggingface_hub...)
        raise _offline_error(name, e, offline) from e
    _HUB_OVERRIDES[f"timm:{name}"] = timm_model_overrides(m)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}, f"timm:{name}"


def _offline_error(name: str, e: Exception, offline: bool) -> OfflineError:
    why = ("the Hugging Face Hub cannot be reached from this machine and the weights are not in the local cache"
           if offline else f"downloading the pretrained weights failed ({type(e).__name__}: {str(e)[:200]})")
    return OfflineError(
        f"timm:{name}: {why}. If this machine is offline, download the file elsewhere and pass its local path instead "
        f"(e.g. `hpvit convert /path/to/{name}.safetensors ...` or hpvit.load_plain('/path/to/file.pth'))"
    )


_HUB_OVERRIDES: dict[str, dict[str, Any]] = {}


def timm_model_overrides(model: Any) -> dict[str, Any]:
    """What a timm ViT *instance* shows beyond its weights: head count, LayerNorm epsilon, activation
    (e.g. timm's OpenAI-CLIP ViTs use eps 1e-5 and QuickGELU). Empty when the model is not ViT-shaped."""
    try:
        blk = model.blocks[0]
        ov: dict[str, Any] = {"num_heads": int(blk.attn.num_heads), "norm_eps": float(blk.norm1.eps)}
        act = blk.mlp.act
    except (AttributeError, IndexError, TypeError):
        return {}
    name = type(act).__name__.lower()
    if "quick" in name:
        ov["act"] = "quick_gelu"
    elif name == "gelu":
        ov["act"] = "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    elif "tanh" in name:
        ov["act"] = "gelu_tanh"
    return ov


def load_plain(
    src: "str | os.PathLike | dict[str, Any] | PlainViT",
    format: str | None = None,
    **spec_overrides: Any,
) -> PlainViT:
    """Read a plain ViT from a file, a folder, ``"timm:<model name>"`` or an in-memory state dict.

    The format is detected from the key layout (``format=`` forces one; see
    ``hpvit.checkpoints.detect.format_names()``), keys are mapped to the canonical layout and the
    architecture is inferred. ``spec_overrides`` (e.g. ``num_heads=16``, ``act="gelu"``) override
    what cannot be read from weights. The source is never modified.
    """
    if isinstance(src, PlainViT):
        return src
    folder_config = None
    if isinstance(src, dict):
        obj, source = src, "<state_dict>"
    elif isinstance(src, str) and src.startswith("timm:"):
        obj, source = _from_hub(src[len("timm:"):])
        hub_overrides = _HUB_OVERRIDES.pop(source, {})
        spec_overrides = {**hub_overrides, **spec_overrides}
    else:
        source = os.fspath(src)
        if is_hpvit_model_file(source):
            _refuse_dense_file(source)
            raise CheckpointError(
                f"{source}: a model file hpvit wrote (already transformed), not a plain ViT checkpoint; load it with "
                "hpvit.load(path) (dense backbones: build_dense_backbone(hpvit.load(path), ...); the commands take "
                "such files as --init directly)")
        obj = read_folder_or_file(source)
        folder_config = read_folder_config(source)
    sd = unwrap_state_dict(obj, source)
    if format is not None:
        fmt = get_format(format)
        if fmt is None:
            raise CheckpointError(f"unknown format {format!r}; supported formats: {format_names()}")
        if not fmt.detect(sd):
            found = detect_format(sd)
            raise CheckpointError(
                f"{source}: format={format!r} was requested, but the file does not have that layout (it looked like "
                f"format {found.NAME if found else None!r}; first keys: {sorted(sd)[:6]}); see docs/formats.md"
            )
    else:
        fmt = detect_format(sd)
        if fmt is None:
            like, left = closest_format(sd)
            raise CheckpointError(
                f"{source}: not a recognised plain-ViT checkpoint (tried formats {format_names()}); it looked most "
                f"like format {like.NAME!r}, which could not place {len(left)} of {len(sd)} key(s), first: "
                f"{left[:6]}. If it is a ViT in another layout, map its keys to timm's VisionTransformer names "
                "(docs/formats.md) or pass format=... explicitly"
            )
    try:
        canon, dropped = fmt.to_canonical(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: looked like format {fmt.NAME!r}, but {e}") from e
    _refuse_non_float(canon, source)
    unplaced = sorted(k for k in canon if not is_canonical_key(k))
    if unplaced:
        raise CheckpointError(
            f"{source}: looked like format {fmt.NAME!r}, but {len(unplaced)} key(s) could not be placed in a plain "
            f"ViT, first: {unplaced[:6]}. Is this a plain ViT? If the format was mis-detected, pass format=..."
        )
    so = getattr(fmt, "spec_overrides", None)
    try:
        fmt_overrides = {} if so is None else (so(sd, folder_config) if folder_config is not None else so(sd))
        spec = infer_spec(canon, source, **{**fmt_overrides, **spec_overrides})
        check_shapes(canon, spec, source)
    except CheckpointError as e:
        raise CheckpointError(f"{e} [read as format {fmt.NAME!r}]") from e
    dropped_numel = sum(sd[k].numel() for k in dropped if k in sd)
    return PlainViT(state_dict=canon, spec=spec, source=source, format=fmt.NAME, dropped=dropped,
                    dropped_numel=dropped_numel)


def _refuse_non_float(canon: dict[str, torch.Tensor], source: str) -> None:
    """A ViT's weights are floating point; integer (or bool) tensors would be cast to garbage or zeros."""
    bad = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in canon.items() if not v.is_floating_point()]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} weight tensor(s) are not floating point, e.g. {bad[:3]}; a ViT's weights are "
            "float32/float16/bfloat16 (an integer tensor is a quantised or edited file, whose values cannot be used "
            "as weights). Use the original floating-point checkpoint")


def _refuse_dense_file(source: str) -> None:
    """A detector / segmenter file hpvit wrote is not a plain ViT: say how to reach its backbone."""
    meta = read_metadata(model_file(source))
    if "hpvit_dense" not in meta:
        return
    task = json.loads(meta["hpvit_dense"]).get("task")
    what = {"det": "Mask R-CNN detector", "seg": "UperNet segmenter"}.get(task, f"{task!r} model")
    raise CheckpointError(
        f"{source}: a {what} file hpvit wrote (`hpvit train {task}`), not a plain ViT checkpoint or a classifier/"
        "backbone file; convert and export take those. To export its backbone's pyramid, take the backbone out in "
        f"Python: vit = hpvit.load('{source}').body.vit; hpvit.export.export_onnx(vit, 'backbone.onnx', pyramid=True)")
