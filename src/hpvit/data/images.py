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

from PIL import Image

from ..errors import BadImageError

FIX = "replace or delete the file (hpvit train can leave such images out with --skip-bad-images)"


def pixel_limit() -> int | None:
    """The pixel count above which an image is refused: ``HPVIT_MAX_IMAGE_PIXELS`` or PIL's default."""
    env = os.environ.get("HPVIT_MAX_IMAGE_PIXELS", "").strip()
    if env:
        n = int(float(env))
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
            return im.convert(mode) if mode else im.copy()


def probe_image(src: "str | os.PathLike | bytes", name: "str | None" = None) -> tuple[int, int, str]:
    """``(width, height, mode)`` from the file's header only (fast; no pixel data is decoded)."""
    name = name or (os.fspath(src) if not isinstance(src, (bytes, bytearray)) else "<bytes>")
    with _guarded(name):
        with Image.open(_source(src)) as im:
            return im.size[0], im.size[1], im.mode


def display_name(path: "str | os.PathLike", archive: "str | os.PathLike | None" = None) -> str:
    """``archive.zip!member`` for a zip member, else the path."""
    return f"{archive}!{path}" if archive is not None else os.fspath(path)
