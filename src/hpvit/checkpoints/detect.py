"""Checkpoint format detection. Each format is one small module with ``NAME``, ``detect(sd)`` and
``to_canonical(sd) -> (canonical_sd, dropped)``; the first that detects wins (``format=`` overrides)."""

from __future__ import annotations

from types import ModuleType

import torch

from . import timm_format

FORMATS: list[ModuleType] = [timm_format]


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
