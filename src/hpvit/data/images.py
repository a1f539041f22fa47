"""Opening image files safely: every failure becomes a :class:`~hpvit.errors.BadImageError` naming the file.

Covers files that are not images, truncated or corrupt files, and images over the pixel limit (PIL's
decompression-bomb guard, ``PIL.Image.MAX_IMAGE_PIXELS``; set ``HPVIT_MAX_IMAGE_PIXELS=<pixels>`` to
raise it for images you trust, ``0`` to switch it off).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import IO, Iterator

import numpy as np
from PIL import Image

from ..errors import BadImageError, ConfigError

FIX = "replace or delete the file (hpvit train can leave such images out with --skip-bad-images)"


def pixel_limit() -> int | None:
    """The pixel count above which an image is refused: ``HPVIT_MAX_IMAGE_PIXELS`` or PIL's default."""
    env = os.environ.get("HPVIT_MAX_IMAGE_PIXELS", "").strip()
    if env:
        try:
            n = int(float(env))
        except (ValueError, OverflowError):
            raise ConfigError(f"HPVIT_MAX_IMAGE_PIXELS={env!r} is not a number; set it to a pixel count (e.g. "
                              "200000000), to 0 to switch the limit off, or unset it for the default") from None
        return n if n > 0 else None
    return Image.MAX_IMAGE_PIXELS


@contextlib.contextmanager
def _guarded(name: str) -> Iterator[None]:
    """PIL's bomb guard at :func:`pixel_limit` as an error; any decoding failure -> BadImageError."""
    saved = Image.MAX_IMAGE_PIXELS
    limit = pixel_limit()
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(
            f"image {name} is too large ({e}); it is over the limit of {limit} pixels that guards against "
            f"decompression bombs. Shrink the image, {FIX.split(' (')[0]}, or raise the limit with "
            "HPVIT_MAX_IMAGE_PIXELS=<pixels> if you trust it", name) from e
    except BadImageError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad files
        text = str(e).splitlines()[0][:200] if str(e) else ""
        what = "is truncated" if "truncated" in text.lower() else "cannot be decoded"
        raise BadImageError(f"image {name} {what} ({type(e).__name__}: {text}); {FIX}", name) from e
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _source(src: "str | os.PathLike | bytes") -> "str | IO[bytes]":
    return io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src)


def decode_image(src: "str | os.PathLike | bytes", name: "str | None" = None, mode: str | None = "RGB") -> Image.Image:
    """Fully decode ``src`` (a path or the file's bytes) and convert it to ``mode`` (None keeps it)."""
    name = name or (os.fspath(src) if not isinstance(src, (bytes, bytearray)) else "<bytes>")
    with _guarded(name):
        with Image.open(_source(src)) as im:
            im.load()
            if not mode:
                return im.copy()
            return _to_8bit(im, name).convert(mode)


def _to_8bit(im: Image.Image, name: str) -> Image.Image:
    """16-bit grayscale (``I;16*``) scaled to 8 bits over its full range (PIL's ``convert`` would clip every value
    above 255 to white); 32-bit integer and float images, whose range a file does not declare, are refused."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):  # older PIL: 16-bit PNG as "I"
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.round(a / 257.0).astype(np.uint8), mode="L")
    if im.mode in ("I", "F"):
        kind = "32-bit integer" if im.mode == "I" else "32-bit float"
        raise BadImageError(
            f"image {name} holds {kind} grayscale pixels (PIL mode {im.mode}), whose value range the file does not "
            "declare, so it cannot be turned into 8-bit RGB without guessing; save it as an 8-bit or 16-bit image "
            "(e.g. PNG), or delete the file", name)
    return im


def probe_image(src: "str | os.PathLike | bytes", name: "str | None" = None) -> tuple[int, int, str]:
    """``(width, height, mode)`` from the file's header only (fast; no pixel data is decoded)."""
    name = name or (os.fspath(src) if not isinstance(src, (bytes, bytearray)) else "<bytes>")
    with _guarded(name):
        with Image.open(_source(src)) as im:
            return im.size[0], im.size[1], im.mode


def display_name(path: "str | os.PathLike", archive: "str | os.PathLike | None" = None) -> str:
    """``archive.zip!member`` for a zip member, else the path."""
    return f"{archive}!{path}" if archive is not None else os.fspath(path)
