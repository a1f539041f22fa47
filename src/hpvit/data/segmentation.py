"""Semantic segmentation data: image / label-PNG pairs with an ignore index.

Layouts (``--layout``; see docs/dense.md):

* ``camvid`` (SegNet's 11-class CamVid): ``ROOT/{split}/NAME.png|jpg`` and
  ``ROOT/{split}annot/NAME.png``; labels 0..10, 11 = void (ignored). Splits ``train``, ``val``, ``test``.
* ``ade20k`` (ADEChallengeData2016): ``ROOT/images/{training,validation}/NAME.jpg`` and
  ``ROOT/annotations/{training,validation}/NAME.png``; labels 1..150, 0 = "other" (ignored; mmseg's
  ``reduce_zero_label``). Splits ``train`` -> training, ``val`` -> validation.
* ``cityscapes``: ``ROOT/leftImg8bit/{split}/CITY/X_leftImg8bit.png`` and
  ``ROOT/gtFine/{split}/CITY/X_gtFine_labelTrainIds.png`` (19 train ids, 255 ignored; create them with
  cityscapesscripts' ``createTrainIdLabelImgs``).

Each layout declares the raw label value of its first class and its *ignore value* (the raw value
meaning "not labelled"): camvid 0.. / 11, ade20k 1.. / 0, cityscapes 0.. / 255. ``--ignore-value N``
(``SegDataset(ignore_value=N)``) replaces the layout's ignore value, e.g. for a CamVid copy that marks
void as 255. Labels are read at their full bit depth (8- or 16-bit PNGs): any other value outside the
classes -- 16-bit values above 255 included -- is an error naming the file, never wrapped or ignored.
Inside hpvit every label map uses 0..K-1 for classes and :data:`IGNORE` (255) for ignored pixels.
Problems (a missing root or split, an image without its label, a label of another size, label values
outside the classes, unreadable files) raise :class:`SegDataError` (or
:class:`~hpvit.errors.BadImageError` for an image that cannot be decoded) naming the file and the fix.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .images import decode_image, probe_image

IGNORE = 255
IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp")


class SegDataError(DataError):
    """A segmentation dataset folder is missing, incomplete or holds invalid labels."""


def _palette(n: int, seed: int = 3) -> list[tuple[int, int, int]]:
    g = np.random.default_rng(seed)
    return [tuple(int(v) for v in g.integers(0, 256, 3)) for _ in range(n)]


CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
CITYSCAPES_PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
                      (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
                      (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))


@dataclass
class Layout:
    """How a dataset's files are arranged and what its label values mean."""

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    pairs: Callable[[Path, str], list[tuple[Path, Path]]]
    first_class: int  # raw label value of class 0
    ignore_value: int  # raw label value meaning "not labelled" (default of --ignore-value)
    splits: tuple[str, ...] = ("train", "val")

    @property
    def notes(self) -> str:
        k = len(self.classes)
        return f"labels {self.first_class}..{self.first_class + k - 1}, {self.ignore_value} = ignored"

    def map_labels(self, raw: np.ndarray, path: Path, ignore_value: int | None = None) -> np.ndarray:
        """Raw label values (any integer dtype) -> int64 0..K-1 with IGNORE; SegDataError naming ``path`` for
        any value that is neither a class nor the ignore value."""
        ign = self.ignore_value if ignore_value is None else ignore_value
        raw = raw.astype(np.int64)
        out = raw - self.first_class
        k = len(self.classes)
        ignored = raw == ign
        bad = np.unique(raw[((out < 0) | (out >= k)) & ~ignored])
        if len(bad):
            raise SegDataError(
                f"label {path} holds value(s) {bad[:8].tolist()} outside the {self.name} classes "
                f"{self.first_class}..{self.first_class + k - 1} (ignore value {ign}); fix the label, choose the right "
                "--layout, or declare the value to ignore with --ignore-value", str(path))
        out[ignored] = IGNORE
        return out


def _pair_by_stem(img_dir: Path, lab_dir: Path) -> list[tuple[Path, Path]]:
    """(image, label PNG of the same stem) pairs; every image must have its label."""
    out, missing = [], []
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() not in IMG_EXTS:
            continue
        lab = lab_dir / (p.stem + ".png")
        (out.append((p, lab)) if lab.is_file() else missing.append(p.name))
    if missing:
        raise SegDataError(f"{len(missing)} image(s) in {img_dir} have no label PNG in {lab_dir}, e.g. {missing[:3]}; "
                           "add the labels or remove those images")
    return out


def _camvid_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    img_dir, lab_dir = root / split, root / f"{split}annot"
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise SegDataError(f"CamVid layout: {d} does not exist; ROOT must hold {split}/ and {split}annot/ "
                               "(images and label PNGs of the same names)")
    return _pair_by_stem(img_dir, lab_dir)


def _ade_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    sub = {"train": "training", "val": "validation"}.get(split, split)
    img_dir, lab_dir = root / "images" / sub, root / "annotations" / sub
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise SegDataError(f"ADE20K layout: {d} does not exist; ROOT must hold images/{sub}/ and annotations/{sub}/")
    return _pair_by_stem(img_dir, lab_dir)


def _cityscapes_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    img_dir, lab_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise SegDataError(f"Cityscapes layout: {d} does not exist; ROOT must hold leftImg8bit/{split}/CITY/ and "
                               f"gtFine/{split}/CITY/")
    out, missing = [], []
    for p in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        lab = lab_dir / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
        (out.append((p, lab)) if lab.is_file() else missing.append(str(p.relative_to(img_dir))))
    if missing:
        raise SegDataError(f"{len(missing)} image(s) have no *_gtFine_labelTrainIds.png in {lab_dir}, e.g. {missing[:3]}; "
                           "create them with cityscapesscripts' createTrainIdLabelImgs")
    return out


LAYOUTS: dict[str, Layout] = {
    "camvid": Layout(
        "camvid",
        ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist"),
        ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0), (192, 128, 128),
         (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)),
        _camvid_pairs, 0, 11, ("train", "val", "test"),  # 11 = void
    ),
    # ADE20K: 0 = "other" (mmseg's reduce_zero_label)
    "ade20k": Layout("ade20k", tuple(f"ade_{i:03d}" for i in range(1, 151)), tuple(_palette(150)), _ade_pairs, 1, 0,
                     ("train", "val")),
    "cityscapes": Layout("cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, _cityscapes_pairs, 0, 255,
                         ("train", "val")),
}


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise SegDataError(f"unknown dataset layout {name!r}; choose from {sorted(LAYOUTS)}")
    return LAYOUTS[name]


LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def _check_label_mode(mode: str, lab_path: Path) -> None:
    if mode not in LABEL_MODES:
        raise SegDataError(f"label {lab_path} is a {mode} image; labels must be single-channel (8- or 16-bit) PNGs of "
                           "class ids", str(lab_path))


def _check_sizes(img_path: Path, img_wh: tuple[int, int], lab_path: Path, lab_wh: tuple[int, int]) -> None:
    if img_wh != lab_wh:
        raise SegDataError(f"image {img_path.name} is {img_wh[0]}x{img_wh[1]} but its label {lab_path} is "
                           f"{lab_wh[0]}x{lab_wh[1]}; labels must match their images pixel for pixel", str(lab_path))


def read_label(lab_path: Path) -> np.ndarray:
    """The raw label values of ``lab_path`` at full bit depth (8-bit, palette or 16-bit PNG)."""
    lab = decode_image(lab_path, str(lab_path), mode=None)
    _check_label_mode(lab.mode, lab_path)
    return np.asarray(lab).astype(np.int64)


def probe_pair(img_path: Path, lab_path: Path) -> None:
    """Header-only check of a pair: both files open, the label is single-channel, the sizes match."""
    iw, ih, _ = probe_image(img_path)
    lw, lh, mode = probe_image(lab_path)
    _check_label_mode(mode, lab_path)
    _check_sizes(img_path, (iw, ih), lab_path, (lw, lh))


def read_pair(img_path: Path, lab_path: Path, layout: Layout,
              ignore_value: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image float (3, H, W) in [0, 1], label int64 (H, W) with 0..K-1 and IGNORE)``."""
    img = np.asarray(decode_image(img_path), dtype=np.uint8).copy()
    lab = read_label(lab_path)
    _check_sizes(img_path, (img.shape[1], img.shape[0]), lab_path, (lab.shape[1], lab.shape[0]))
    lab = layout.map_labels(lab, lab_path, ignore_value)
    return torch.from_numpy(img).permute(2, 0, 1).float().div_(255), torch.from_numpy(lab)


def resize_pair(img: torch.Tensor, lab: torch.Tensor | None, size: tuple[int, int]):
    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if lab is not None:
        lab = F.interpolate(lab[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return img, lab


class SegDataset(torch.utils.data.Dataset):
    """One split of a layout.

    Training samples: the image resized so its longer side is ``base_size * U(scale_range)`` (original
    size when ``base_size`` is None), a random ``crop x crop`` crop (image zero-padded, label padded
    with IGNORE when smaller), a horizontal flip with probability ``flip``; returns ``(image (3, c, c),
    label (c, c))``. Evaluation samples: ``(image resized to base_size, label at the ORIGINAL size)``
    -- predictions are upsampled back and scored at full label resolution.
    """

    def __init__(self, root: "str | os.PathLike", layout: str, split: str, train: bool, crop: int = 512,
                 base_size: int | None = None, scale_range: tuple[float, float] = (0.5, 2.0), flip: float = 0.5,
                 indices: Sequence[int] | None = None, ignore_value: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SegDataError(f"dataset root {self.root} does not exist; pass --data ROOT")
        self.layout = get_layout(layout)
        self.split = split
        pairs = self.layout.pairs(self.root, split)
        if not pairs:
            raise SegDataError(f"{self.root}: the {split!r} split of the {layout} layout holds no images")
        self.pairs = pairs if indices is None else [pairs[i] for i in indices]
        self.train, self.crop, self.base_size = train, crop, base_size
        self.scale_range, self.flip = scale_range, flip
        self.ignore_value = ignore_value  # None: the layout's

    def check_item(self, i: int, full: bool) -> None:
        """Read pair ``i`` completely with every label check (``full``), or only the two headers."""
        if full:
            read_pair(*self.pairs[i], self.layout, self.ignore_value)
        else:
            probe_pair(*self.pairs[i])

    @property
    def classes(self) -> tuple[str, ...]:
        return self.layout.classes

    def __len__(self) -> int:
        return len(self.pairs)

    def _base(self, h: int, w: int, factor: float = 1.0) -> tuple[int, int]:
        s = (self.base_size / max(h, w) if self.base_size else 1.0) * factor
        return max(1, round(h * s)), max(1, round(w * s))

    def __getitem__(self, i: int):
        img, lab = read_pair(*self.pairs[i], self.layout, self.ignore_value)
        h, w = lab.shape
        if not self.train:
            img, _ = resize_pair(img, None, self._base(h, w))
            return img, lab
        img, lab = resize_pair(img, lab, self._base(h, w, random.uniform(*self.scale_range)))
        c = self.crop
        hh, ww = lab.shape
        if hh < c or ww < c:
            ph, pw = max(c - hh, 0), max(c - ww, 0)
            img = F.pad(img, (0, pw, 0, ph))
            lab = F.pad(lab, (0, pw, 0, ph), value=IGNORE)
            hh, ww = lab.shape
        y0, x0 = random.randint(0, hh - c), random.randint(0, ww - c)
        img, lab = img[:, y0:y0 + c, x0:x0 + c], lab[y0:y0 + c, x0:x0 + c]
        if self.flip > 0 and random.random() < self.flip:
            img, lab = img.flip(-1), lab.flip(-1)
        return img.contiguous(), lab.contiguous()


def collate_seg(batch):
    """Training crops share a size: stacked tensors. Evaluation images may differ: lists."""
    imgs, labs = [b[0] for b in batch], [b[1] for b in batch]
    if all(im.shape == imgs[0].shape for im in imgs) and all(l.shape == labs[0].shape for l in labs):
        return torch.stack(imgs), torch.stack(labs)
    return imgs, labs


def colorize(label: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """``(H, W)`` class ids (IGNORE -> black) -> ``(H, W, 3)`` uint8 RGB in the dataset's palette."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[np.clip(label, 0, 255).astype(np.uint8)]
