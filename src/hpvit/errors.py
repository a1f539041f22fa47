"""Exception types raised by hpvit. Every message says what went wrong and what to do about it."""

from __future__ import annotations


class HPViTError(ValueError):
    """Base class of every error hpvit raises on bad input (a ValueError, so callers may catch either)."""


class CheckpointError(HPViTError):
    """A checkpoint could not be read, recognised or mapped onto a plain ViT."""


class ConfigError(HPViTError):
    """A configuration (preset, dataclass field, CLI flag) is invalid."""


class InputError(HPViTError):
    """An input tensor or image does not fit the model (too small, wrong channels...)."""


class OfflineError(HPViTError):
    """A hub download was needed but the network is not reachable."""
