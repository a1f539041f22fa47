"""From a user's pictures to model inputs, with numpy and PIL only (no torch: ``hpvit predict`` on an ONNX
file runs where torch is not installed).

* :func:`expand_inputs`: ``IMAGE|FOLDER|GLOB`` arguments -> image paths, in a stable order;
* :func:`to_pil`: a path, a PIL image or an array -> an RGB PIL image (undecodable files: BadImageError);
* :class:`Preprocess`: the evaluation preprocessing of a classifier run (``model.json``: resize the shorter
  side to ``floor(img_size / crop_pct)``, centre-crop ``img_size``, scale to [0, 1], normalise with
  ``mean`` / ``std``), written out step for step as timm's ``create_transform(is_training=False)`` does it
  on a PIL image, so both give the same numbers.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError, InputError
from .images import _to_8bit, decode_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def expand_inputs(specs: Sequence["str | os.PathLike"]) -> list[str]:
    """Every image named by ``specs``: a file as given, a folder's image files (by suffix, recursively, sorted),
    a glob's matching files (sorted). Duplicates are kept once. A spec that names nothing is an InputError."""
    out: dict[str, None] = {}
    for spec in specs:
        s = os.fspath(spec)
        p = Path(s)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"folder {s} holds no image files ({', '.join(IMAGE_SUFFIXES[:4])}...); point at "
                                 "the folder that holds the pictures")
        elif p.is_file():
            found = [s]
        elif glob.has_magic(s):
            found = sorted(f for f in glob.glob(s, recursive=True) if os.path.isfile(f))
            if not found:
                raise InputError(f"the pattern {s} matches no file; check the pattern (quote it so the shell "
                                 "passes it on unexpanded)")
        else:
            raise InputError(f"{s}: no such image, folder or pattern; check the path")
        out.update(dict.fromkeys(found))
    if not out:
        raise InputError("no images given; pass image files, folders or patterns")
    return list(out)


def to_pil(item: Any, name: str) -> Image.Image:
    """An RGB PIL image of ``item``: a path (decoded with :func:`~hpvit.data.images.decode_image`), a PIL image,
    or an ``(H, W)`` / ``(H, W, 3|4)`` array (uint8 0..255, or float 0..1)."""
    if isinstance(item, (str, os.PathLike)):
        return decode_image(item, name)
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else _to_8bit(item, name).convert("RGB")
    if isinstance(item, np.ndarray):
        a = item
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or 0 in a.shape:
            raise InputError(f"{name}: an array of shape {tuple(item.shape)} is not an image; pass (H, W), (H, W, 3) "
                             "or (H, W, 4) pixels, RGB order")
        if a.dtype != np.uint8:
            if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise InputError(f"{name}: a {a.dtype} array must hold uint8 pixels 0..255 or floats in [0, 1]; "
                                 "convert it (e.g. arr.astype('uint8'))")
            a = np.round(a * 255.0).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")
    raise InputError(f"{name}: a {type(item).__name__} is not an image; pass a file path, a PIL image or a numpy array")


@dataclass
class Preprocess:
    """A classifier's evaluation preprocessing (the training run's ``model.json``; defaults: the recipe's)."""

    img_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    @classmethod
    def from_record(cls, record: "dict | None", **defaults: Any) -> "Preprocess":
        """From a ``model.json`` record (its other keys, e.g. ``classes``, are ignored); ``defaults`` fill what
        the record does not give."""
        keys = ("img_size", "crop_pct", "interpolation", "mean", "std")
        values = {**defaults, **{k: v for k, v in (record or {}).items() if k in keys and v is not None}}
        pre = cls(**values)
        pre.check()
        return pre

    def check(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation {self.interpolation!r} is none of {', '.join(INTERPOLATIONS)}; fix "
                              "model.json (or the recipe that wrote it)")
        if not (isinstance(self.img_size, int) and self.img_size > 0) or not 0 < float(self.crop_pct) <= 1:
            raise ConfigError(f"img_size {self.img_size!r} / crop_pct {self.crop_pct!r} cannot be used: img_size must "
                              "be a positive integer and crop_pct in (0, 1]; fix model.json")
        if len(self.mean) != 3 or len(self.std) != 3 or min(float(s) for s in self.std) <= 0:
            raise ConfigError(f"mean {list(self.mean)} / std {list(self.std)}: need 3 values each and std > 0; fix "
                              "model.json")

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """Shorter side to ``floor(img_size / crop_pct)`` (aspect kept), then the centre ``img_size`` square."""
        short = math.floor(self.img_size / self.crop_pct)
        w, h = img.size
        if w <= h:
            size = (short, int(short * h / w))
        else:
            size = (int(short * w / h), short)
        img = img.resize(size, INTERPOLATIONS[self.interpolation])
        w, h = img.size
        top, left = int(round((h - self.img_size) / 2.0)), int(round((w - self.img_size) / 2.0))
        return img.crop((left, top, left + self.img_size, top + self.img_size))

    def __call__(self, img: Image.Image) -> np.ndarray:
        """``(3, img_size, img_size)`` float32, normalised."""
        a = np.asarray(self.resize_crop(img), dtype=np.uint8).astype(np.float32) / np.float32(255)
        a = (a - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(a.transpose(2, 0, 1))

    def to_dict(self) -> dict:
        return {"img_size": self.img_size, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}
