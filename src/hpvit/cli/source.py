"""The model a describing or writing command reads (``convert``, ``info``, ``export``, ``demo``): a plain
checkpoint turned into a hierarchical model, or a file hpvit wrote with its own stored config."""

from __future__ import annotations

from pathlib import Path

from ..config import RECOMMENDED
from .common import Steps, parse_key_values


def size_note(path: str) -> str:
    """`` (12 MiB)`` for a file, ``""`` for anything else (a folder, a hub name)."""
    p = Path(path)
    if p.is_file():
        return f" ({p.stat().st_size / 2**20:,.0f} MiB)"
    return ""


def build_model(src: str, config: "str | None", num_classes: int | None = None, format: str | None = None,
                spec: list[str] | None = None, steps: "Steps | None" = None):
    """``(model, plain)`` from a plain checkpoint (``plain`` its :class:`PlainViT`), or ``(model, None)`` from a
    file hpvit wrote (whose stored config wins; see :func:`saved_backbone`). ``config`` may name any preset,
    the plain dense baselines (``plain-det``, ``plain-seg``) included; None: the recommended classifier."""
    from ..checkpoints import load_plain
    from ..checkpoints.native import is_hpvit_model_file
    from ..export import load
    from ..models.build import from_plain

    if is_hpvit_model_file(src):
        return load(src), None
    config = config or RECOMMENDED["cls"]
    if steps:
        steps.step(f"reading {src}{size_note(src)}")
    plain = load_plain(src, format=format, **parse_key_values(spec, "--spec"))
    if steps:
        steps.step(f"mapping its weights onto {config}")
    return from_plain(plain, config=config, num_classes=num_classes), plain


def saved_backbone(model, src: str, config: "str | None"):
    """The HierarchicalViT inside a loaded hpvit file, after printing what the file holds."""
    from ..models.build import stored_config_conflict

    meta = getattr(model, "hpvit_meta", None)
    vit = model.body.vit if meta is not None else model
    if meta is not None:
        what = {"det": "Mask R-CNN detector", "seg": "UperNet segmenter"}.get(meta.get("task"), meta.get("task"))
        print(f"{src}: hpvit {what} ({meta.get('num_classes')} classes), backbone {meta.get('config_name')} "
              f"({meta.get('backbone')}), trained at {meta.get('img_size') or meta.get('crop')} px")
    else:
        print(f"{src}: hpvit model file, config {vit.config.name}, {vit.num_classes} classes")
    conflict = stored_config_conflict(src, config, vit.config.name)
    if conflict:
        print(f"note: --config {config} ignored: {conflict}")
    return vit
