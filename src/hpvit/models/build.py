"""from_plain: build a hierarchical model from a plain ViT and load every reusable weight."""

from __future__ import annotations

import numbers
import os
from typing import Any

from ..checkpoints import PlainViT, load_plain
from ..config import HPViTConfig, get_config
from ..errors import ConfigError
from .hierarchical import HierarchicalViT
from .reuse import convert_state_dict


def from_plain(
    src: "str | os.PathLike | dict | PlainViT",
    config: "str | HPViTConfig | dict" = "paper-cls",
    num_classes: int | None = None,
    format: str | None = None,
    spec_overrides: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> HierarchicalViT:
    """Transform a plain ViT into a hierarchical one.

    Args:
        src: a path, a Hugging Face-style folder, ``"timm:<name>"``, a state dict or a :class:`PlainViT`.
        config: a preset name (``paper-cls``, ``paper-det``, ``paper-seg``, ``identity``...), a dict or an
            :class:`HPViTConfig`; ``config_overrides`` change single fields (e.g. ``drop_path_rate=0.1``).
        num_classes: classifier size; ``None`` keeps the source's (its head is reused when it fits).
        format / spec_overrides: passed to :func:`hpvit.load_plain`.

    ``model.reuse_report()`` then lists reused, new and dropped tensors.
    """
    check_num_classes(num_classes)
    plain = load_plain(src, format=format, **(spec_overrides or {}))
    cfg = get_config(config, **config_overrides)  # resolved once, here; the model keeps this object
    model = HierarchicalViT(plain.spec, cfg, num_classes=num_classes)
    sd, report = convert_state_dict(plain, model)
    model.load_state_dict(sd, strict=True)
    model._reuse_report = report
    return model


def check_num_classes(num_classes: Any, what: str = "num_classes") -> None:
    """``num_classes`` must be None (keep the source's head) or an integer >= 0 (0: no head, pooled features)."""
    if num_classes is None:
        return
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
        raise ConfigError(f"{what} must be an integer >= 0 (0 builds no classifier head), got {num_classes!r}; pass "
                          "e.g. num_classes=10, or None to keep the source checkpoint's head")


def stored_config_conflict(src: "str | os.PathLike", config: "str | None", stored: str) -> "str | None":
    """The one rule for ``--config`` given with a file hpvit wrote: the file's stored config (``stored``, a preset
    name) describes the model, because its weights are laid out for it; a different ``config`` cannot apply.
    Returns the reason (``hpvit info`` prints it in a note, ``hpvit train cls`` refuses with it), or None when
    ``config`` is not given or names the stored config."""
    if not config or str(config) == stored:
        return None
    return (f"{src} is a file hpvit wrote, whose stored config {stored} describes the model (its weights are laid out "
            "for it)")
