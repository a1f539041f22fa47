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


class OutputError(HPViTError):
    """An output file or folder could not be written (read-only folder, disk full, folder in use...)."""


class RunDirError(OutputError):
    """A training output folder is in use by another run, or holds a finished run that must not be replaced."""


class DataError(HPViTError):
    """A dataset file (image, label, annotation) is missing, unreadable or holds invalid values.

    ``path`` names the offending file when there is one.
    """

    def __init__(self, message: str, path: "str | None" = None):
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # survives the trip from a DataLoader worker process
        return (type(self), (self.args[0] if self.args else "", self.path))


class BadImageError(DataError):
    """An image file cannot be decoded (truncated, corrupt, not an image, or larger than the pixel limit)."""
