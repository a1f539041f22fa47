"""Checkpoint format detection. Each format is one small module with ``NAME``, ``detect(sd)``,
``to_canonical(sd) -> (canonical_sd, dropped)`` and optionally ``spec_overrides(sd, config=None)`` (what
weights cannot show: activation, LayerNorm epsilon, head count). The first that detects wins, so the
more specific layouts come first (``format=`` overrides)."""

from __future__ import annotations

from types import ModuleType

import torch

from . import clip_format, deit_format, dinov2_format, hf_format, mae_format, timm_format
from .spec import is_canonical_key

FORMATS: list[ModuleType] = [clip_format, hf_format, mae_format, dinov2_format, deit_format, timm_format]


def register_format(module: ModuleType, first: bool = True) -> None:
    """Add a format module (``first``: try it before the others)."""
    if module in FORMATS:
        return
    FORMATS.insert(0, module) if first else FORMATS.append(module)


def format_names() -> list[str]:
    return [m.NAME for m in FORMATS]


def detect_format(sd: dict[str, torch.Tensor]) -> ModuleType | None:
    for m in FORMATS:
        if m.detect(sd):
            return m
    return None


def get_format(name: str) -> ModuleType | None:
    for m in FORMATS:
        if m.NAME == name:
            return m
    return None


def unplaced_keys(fmt: ModuleType, sd: dict[str, torch.Tensor]) -> list[str]:
    """Source keys ``fmt`` cannot map to the canonical layout (all of them if the mapping itself fails)."""
    try:
        canon, _ = fmt.to_canonical(sd)
    except Exception:
        return sorted(sd)
    return sorted(k for k in canon if not is_canonical_key(k))


def closest_format(sd: dict[str, torch.Tensor]) -> tuple[ModuleType, list[str]]:
    """The format that places the most keys of an unrecognised state dict, and the keys it cannot place
    (for error messages: "looked most like X; could not place ...")."""
    best = None
    for m in FORMATS:
        left = unplaced_keys(m, sd)
        if best is None or len(left) <= len(best[1]):  # ties go to the later, more generic format
            best = (m, left)
    assert best is not None
    return best
