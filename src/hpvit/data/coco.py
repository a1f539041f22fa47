"""COCO-format instance data (a json + an image folder) for Mask R-CNN.

:class:`CocoSource` reads and *validates* an annotation file once: every problem (unreadable json,
missing sections, no annotations, image files that do not exist, annotations pointing at unknown
images or categories, malformed boxes, polygons with fewer than 3 points or an odd number of
coordinates, degenerate polygons (zero area, or entirely outside the image), RLE masks whose size
differs from the image) raises :class:`CocoFormatError` naming the
file, the annotation/image id and what to fix. Nothing is skipped silently: images without any
annotation are kept as negatives and crowd regions are left out of the training targets (pycocotools
ignores them in evaluation); both are counted in :meth:`CocoSource.summary`.

:class:`CocoInstances` yields ``(image, target)``: ``image`` float ``(3, h, w)`` in [0, 1] (resized),
``target`` = ``boxes`` ``(N, 4)`` xyxy pixels of the resized image, ``labels`` ``(N,)`` in 1..K,
``masks`` uint8 ``(N, h, w)``, ``image_id``, ``scale`` (resized / original) and ``orig_size``.
Resizing: the longer side becomes ``img_size`` (evaluation), times a random factor in ``scale_range``
for training, plus horizontal flips; ``lsj=True`` is large-scale jitter (factor 0.1..2.0, then a random
``img_size x img_size`` crop, zero-padded when smaller).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError, HPViTError
from .folder import unsafe_path_name
from .images import decode_image, probe_image


class CocoFormatError(DataError):
    """A COCO annotation file or image folder is malformed or inconsistent."""


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_range(spec: str | None, n: int, what: str = "--train-images") -> list[int]:
    """``"a:b"`` (python slice of the image list, sorted by id), ``"a:"``, ``":b"``, or None for all."""
    if spec is None or spec == "":
        return list(range(n))
    if ":" not in spec:
        raise CocoFormatError(f"{what} expects START:STOP (a slice of the images sorted by id, e.g. 0:100), got {spec!r}")
    a, b = spec.split(":", 1)
    try:
        start = int(a) if a.strip() else 0
        stop = int(b) if b.strip() else n
    except ValueError:
        raise CocoFormatError(f"{what} expects integers START:STOP, got {spec!r}") from None
    idx = list(range(n))[start:stop]
    if not idx:
        raise CocoFormatError(f"{what} {spec!r} selects no image out of {n}; give a non-empty START:STOP")
    return idx


class CocoSource:
    """A validated COCO instance-annotation file plus its image folder.

    Attributes: ``images`` (list of image dicts sorted by id), ``anns_by_image`` (id -> annotations),
    ``cat_ids`` (sorted COCO category ids; label ``i + 1`` is ``cat_ids[i]``), ``cat_names``.
    """

    def __init__(self, ann_file: "str | os.PathLike", images_dir: "str | os.PathLike"):
        self.ann_file, self.images_dir = Path(ann_file), Path(images_dir)
        where = str(self.ann_file)
        if not self.ann_file.is_file():
            raise CocoFormatError(f"annotation file {where} does not exist; pass --ann PATH/TO/instances.json")
        if not self.images_dir.is_dir():
            raise CocoFormatError(f"image folder {self.images_dir} does not exist; pass --data DIR holding the files "
                                  f"named by the json's file_name fields")
        try:
            d = json.loads(self.ann_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CocoFormatError(f"{where}: not valid JSON ({e}); give a COCO instances json") from e
        if not isinstance(d, dict):
            raise CocoFormatError(f"{where}: expected a JSON object with 'images', 'annotations' and 'categories'")
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(d.get(k), list)]
        if missing:
            raise CocoFormatError(f"{where}: missing or non-list section(s) {missing}; a COCO instances json needs "
                                  "'images', 'annotations' and 'categories' lists")
        self.raw = d
        self._check_categories(d["categories"], where)
        self._check_images(d["images"], where)
        self._check_annotations(d["annotations"], where)

    # ---------------------------------------------------------------- validation
    def _check_categories(self, cats: list, where: str) -> None:
        if not cats:
            raise CocoFormatError(f"{where}: 'categories' is empty; list the object classes (id, name)")
        ids = []
        for c in cats:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
                raise CocoFormatError(f"{where}: category {c!r} needs an integer 'id' and a 'name'")
            ids.append(c["id"])
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise CocoFormatError(f"{where}: duplicate category id(s) {dup}")
        self.cat_ids = sorted(ids)
        names = {c["id"]: str(c["name"]) for c in cats}
        self.cat_names = [names[i] for i in self.cat_ids]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}

    def _check_images(self, imgs: list, where: str) -> None:
        if not imgs:
            raise CocoFormatError(f"{where}: 'images' is empty; nothing to train or evaluate on")
        by_id: dict[int, dict] = {}
        missing = []
        for im in imgs:
            if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
                raise CocoFormatError(f"{where}: image entry {str(im)[:120]} needs an integer 'id' and a 'file_name'")
            if not (isinstance(im.get("width"), int) and isinstance(im.get("height"), int)
                    and im["width"] > 0 and im["height"] > 0):
                raise CocoFormatError(f"{where}: image id {im['id']} ({im['file_name']}) needs positive integer "
                                      "'width' and 'height'")
            if im["id"] in by_id:
                raise CocoFormatError(f"{where}: duplicate image id {im['id']}")
            if unsafe_path_name(im["file_name"]):
                raise CocoFormatError(f"{where}: image id {im['id']} has file_name {im['file_name']!r}, which points "
                                      f"outside --data {self.images_dir} (an absolute path or '..' parts); give "
                                      "file names relative to the image folder")
            by_id[im["id"]] = im
            if not (self.images_dir / im["file_name"]).is_file():
                missing.append(im["file_name"])
        if missing:
            raise CocoFormatError(
                f"{where}: {len(missing)} of {len(imgs)} image file(s) are missing from {self.images_dir}, e.g. "
                f"{missing[:3]}; point --data at the folder that holds them (or remove those images from the json)"
            )
        self.images = sorted(by_id.values(), key=lambda im: im["id"])
        self.image_by_id = by_id

    def _check_annotations(self, anns: list, where: str) -> None:
        if not anns:
            raise CocoFormatError(f"{where}: 'annotations' is empty; Mask R-CNN needs at least one annotated object")
        self.anns_by_image: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        self.num_crowd = 0
        seen: set = set()
        for a in anns:
            if not isinstance(a, dict):
                raise CocoFormatError(f"{where}: annotation {str(a)[:80]} is not an object")
            aid = a.get("id", "?")
            if "id" in a and aid in seen:  # COCO evaluation matches by annotation id: a duplicate scores wrongly
                raise CocoFormatError(f"{where}: duplicate annotation id {aid}; give every annotation its own id")
            seen.add(aid)
            img = self.image_by_id.get(a.get("image_id"))
            if img is None:
                raise CocoFormatError(f"{where}: annotation id {aid} refers to image_id {a.get('image_id')!r}, which is "
                                      "not in 'images'; fix the image_id or add the image")
            if a.get("category_id") not in self.label_of:
                raise CocoFormatError(f"{where}: annotation id {aid} (image {img['file_name']}) has category_id "
                                      f"{a.get('category_id')!r}, which is not in 'categories'")
            box = a.get("bbox")
            if not (isinstance(box, list) and len(box) == 4 and all(_is_num(v) for v in box)):
                raise CocoFormatError(f"{where}: annotation id {aid} (image {img['file_name']}) has bbox {box!r}; "
                                      "expected [x, y, width, height] numbers")
            if box[2] <= 0 or box[3] <= 0:
                raise CocoFormatError(f"{where}: annotation id {aid} (image {img['file_name']}) has an empty bbox "
                                      f"{box} (width and height must be > 0); fix or delete the annotation")
            x, y, bw, bh = box
            if x >= img["width"] or y >= img["height"] or x + bw <= 0 or y + bh <= 0:
                raise CocoFormatError(f"{where}: annotation id {aid} (image {img['file_name']}) has bbox {box}, which "
                                      f"lies entirely outside the {img['width']}x{img['height']} image; fix the box (COCO "
                                      "boxes are [x, y, width, height] in pixels) or delete the annotation")
            if x < -img["width"] or y < -img["height"] or x + bw > 2 * img["width"] or y + bh > 2 * img["height"]:
                raise CocoFormatError(f"{where}: annotation id {aid} (image {img['file_name']}) has bbox {box}, which "
                                      f"reaches far outside the {img['width']}x{img['height']} image (more than the "
                                      "image's own size beyond an edge); fix the box (COCO boxes are [x, y, width, "
                                      "height] in pixels) or delete the annotation")
            self._check_segmentation(a, img, where)
            if a.get("iscrowd", 0) not in (0, 1):  # (False and True compare equal to 0 and 1)
                raise CocoFormatError(f"{where}: annotation id {aid} (image {img['file_name']}) has iscrowd "
                                      f"{a.get('iscrowd')!r}; it must be 0 or 1")
            if a.get("iscrowd", 0):
                self.num_crowd += 1
            self.anns_by_image[img["id"]].append(a)
        self.num_negative = sum(1 for v in self.anns_by_image.values() if not v)

    @staticmethod
    def _check_segmentation(a: dict, img: dict, where: str) -> None:
        aid, name = a.get("id", "?"), img["file_name"]
        seg = a.get("segmentation")
        if isinstance(seg, list):
            if not seg:
                raise CocoFormatError(f"{where}: annotation id {aid} (image {name}) has an empty 'segmentation'; Mask "
                                      "R-CNN needs a polygon or RLE mask for every object")
            for k, poly in enumerate(seg):
                if not isinstance(poly, list) or not all(_is_num(v) for v in poly):
                    raise CocoFormatError(f"{where}: annotation id {aid} (image {name}): polygon {k} is not a flat list "
                                          "of numbers [x1, y1, x2, y2, ...]")
                if len(poly) % 2 or len(poly) < 6:
                    raise CocoFormatError(
                        f"{where}: annotation id {aid} (image {name}): invalid polygon {k} with {len(poly)} coordinates "
                        "(needs an even count and at least 3 points = 6 numbers); fix or delete the annotation")
                problem = _polygon_problem(poly, img["width"], img["height"])
                if problem:
                    raise CocoFormatError(f"{where}: annotation id {aid} (image {name}): polygon {k} {problem}; fix or "
                                          "delete the annotation")
        elif isinstance(seg, dict):
            size, counts = seg.get("size"), seg.get("counts")
            if not (isinstance(size, list) and len(size) == 2 and isinstance(counts, (list, str))):
                raise CocoFormatError(f"{where}: annotation id {aid} (image {name}): RLE mask needs 'size' [h, w] and "
                                      "'counts' (list or compressed string)")
            if list(size) != [img["height"], img["width"]]:
                raise CocoFormatError(f"{where}: annotation id {aid} (image {name}): RLE size {size} differs from the "
                                      f"image's [height, width] [{img['height']}, {img['width']}]")
            if isinstance(counts, str):
                try:
                    counts = rle_counts(counts)
                except ValueError as e:
                    raise CocoFormatError(f"{where}: annotation id {aid} (image {name}): its compressed RLE 'counts' "
                                          f"string is malformed ({e}); re-encode the mask (pycocotools.mask.encode) "
                                          "or delete the annotation") from None
            if not all(isinstance(c, int) and c >= 0 for c in counts):
                raise CocoFormatError(f"{where}: annotation id {aid} (image {name}): RLE counts must be run lengths >= 0; "
                                      "re-encode the mask (pycocotools.mask.encode) or delete the annotation")
            if sum(counts) != size[0] * size[1]:
                raise CocoFormatError(f"{where}: annotation id {aid} (image {name}): RLE counts sum to {sum(counts)}, "
                                      f"not height*width = {size[0] * size[1]}; re-encode the mask for the "
                                      f"{img['width']}x{img['height']} image or delete the annotation")
        else:
            raise CocoFormatError(f"{where}: annotation id {aid} (image {name}) has no 'segmentation' (polygon list or "
                                  "RLE dict); Mask R-CNN needs a mask for every object")

    # ---------------------------------------------------------------- access
    def summary(self, indices: Sequence[int] | None = None) -> str:
        imgs = self.images if indices is None else [self.images[i] for i in indices]
        n_ann = sum(len(self.anns_by_image[im["id"]]) for im in imgs)
        neg = sum(1 for im in imgs if not self.anns_by_image[im["id"]])
        crowd = sum(1 for im in imgs for a in self.anns_by_image[im["id"]] if a.get("iscrowd", 0))
        return (f"{self.ann_file.name}: {len(imgs)} images, {n_ann} annotations, {len(self.cat_ids)} categories; "
                f"{neg} image(s) without annotations kept as negatives; {crowd} crowd region(s) not used as training targets")

    def masks_of(self, img: dict) -> tuple[np.ndarray, list[dict]]:
        """Non-crowd annotations of ``img`` and their masks ``(N, H, W)`` uint8 at the original size."""
        _pycocotools()
        from pycocotools import mask as mask_utils

        h, w = img["height"], img["width"]
        anns = [a for a in self.anns_by_image[img["id"]] if not a.get("iscrowd", 0)]
        masks = np.zeros((len(anns), h, w), dtype=np.uint8)
        for i, a in enumerate(anns):
            seg = a["segmentation"]
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg if isinstance(seg["counts"], bytes) else {"size": seg["size"], "counts": seg["counts"].encode()}
            masks[i] = mask_utils.decode(rle)
        return masks, anns

    def coco_gt(self, indices: Sequence[int] | None = None):
        """A pycocotools ``COCO`` object over the images ``indices`` (all when None)."""
        _pycocotools()
        from pycocotools.coco import COCO

        imgs = self.images if indices is None else [self.images[i] for i in indices]
        ids = {im["id"] for im in imgs}
        d = {"images": imgs, "categories": self.raw["categories"],
             "annotations": [dict(a, area=float(a.get("area", a["bbox"][2] * a["bbox"][3])))
                             for a in self.raw["annotations"] if a["image_id"] in ids]}
        gt = COCO()
        gt.dataset = d
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt


def rle_counts(s: str) -> list[int]:
    """The run lengths held in COCO's compressed RLE string ``s`` (the ``counts`` of ``pycocotools.mask.encode``).

    Each run length is a signed number written 5 bits per character (offset 48), a set 0x20 bit meaning that
    more characters follow; from the third run on, the number is the difference to the run two places back.
    ValueError names what is malformed: a character outside the alphabet, a number cut short, a negative run."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError(f"run {len(counts)} is cut short at the end of the string")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {s[p]!r} at position {p} is not in the RLE alphabet '0'..'o'")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # sign-extend
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            raise ValueError(f"run {len(counts)} has a negative length {x}")
        counts.append(x)
    return counts


def _polygon_problem(poly: list, width: int, height: int) -> str | None:
    """Why a flat ``[x1, y1, x2, y2, ...]`` polygon cannot be a mask in a ``width x height`` image, or None.

    Zero area is decided by the rasterised mask (pycocotools, as training draws it): a self-intersecting "bow tie"
    has zero signed area but covers pixels, and is kept."""
    xs, ys = poly[0::2], poly[1::2]
    area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))
    if area <= 0 and _mask_area(poly, width, height) == 0:
        return "has zero area (its points are identical or on one line)"
    if max(xs) <= 0 or max(ys) <= 0 or min(xs) >= width or min(ys) >= height:
        return (f"lies entirely outside the {width}x{height} image (x {min(xs):g}..{max(xs):g}, "
                f"y {min(ys):g}..{max(ys):g})")
    return None


def _mask_area(poly: list, width: int, height: int) -> int:
    """Pixels of ``poly`` rasterised in a ``width x height`` image (0 without pycocotools: nothing to draw with)."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        return 0
    return int(mask_utils.area(mask_utils.frPyObjects([list(map(float, poly))], height, width))[0])


def _pycocotools():
    try:
        import pycocotools  # noqa: F401
    except ImportError as e:
        raise HPViTError("COCO masks and evaluation need pycocotools: pip install 'hpvit[dense]' "
                         "(or pip install pycocotools)") from e


def load_rgb(path: Path):
    """The image at ``path`` as RGB; :class:`~hpvit.errors.BadImageError` naming it when it cannot be decoded."""
    return decode_image(path)


class CocoInstances(torch.utils.data.Dataset):
    """Images ``indices`` of ``source`` as Mask R-CNN samples (see the module docstring)."""

    def __init__(self, source: CocoSource, indices: Sequence[int] | None, train: bool, img_size: int = 512,
                 scale_range: tuple[float, float] = (0.75, 1.25), flip: float = 0.5, lsj: bool = False,
                 lsj_range: tuple[float, float] = (0.1, 2.0), short_sides: "Sequence[int] | None" = None,
                 max_long_side: "int | None" = None):
        self.source = source
        self.indices = list(range(len(source.images))) if indices is None else list(indices)
        self.train, self.img_size, self.scale_range, self.flip = train, img_size, scale_range, flip
        self.lsj, self.lsj_range = lsj, lsj_range
        # the 1x protocol (mmdet's multi-scale resize): shorter side drawn from short_sides (one value at
        # test), longer side at most max_long_side; replaces the longer-side img_size + jitter resizing
        self.short_sides, self.max_long_side = (tuple(short_sides) if short_sides else None), max_long_side
        if self.short_sides and lsj:
            raise ConfigError("--lsj and the recipe's train_short_sides (multi-scale resizing) are two resizing "
                              "schemes; drop --lsj or use a recipe without train_short_sides")

    def __len__(self) -> int:
        return len(self.indices)

    def image_info(self, i: int) -> dict:
        return self.source.images[self.indices[i]]

    def _check_size(self, info: dict, size: tuple[int, int]) -> None:
        if size != (info["width"], info["height"]):
            path = self.source.images_dir / info["file_name"]
            raise CocoFormatError(f"image {path} is {size[0]}x{size[1]} but {self.source.ann_file} says "
                                  f"{info['width']}x{info['height']}; fix its width/height in the json", str(path))

    def check_item(self, i: int, full: bool) -> None:
        """Decode image ``i`` and build its masks (``full``), or only compare its header size with the json."""
        info = self.image_info(i)
        path = self.source.images_dir / info["file_name"]
        if full:
            self._check_size(info, load_rgb(path).size)
            self.source.masks_of(info)
        else:
            w, h, _ = probe_image(path)
            self._check_size(info, (w, h))

    def __getitem__(self, i: int):
        src = self.source
        info = self.image_info(i)
        pil = load_rgb(src.images_dir / info["file_name"])
        self._check_size(info, pil.size)
        masks_np, anns = src.masks_of(info)
        img = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        masks = torch.from_numpy(masks_np)
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([src.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        h, w = img.shape[-2:]
        base = self.img_size / max(h, w)
        if self.short_sides:
            short = random.choice(self.short_sides) if self.train else self.short_sides[0]
            scale = short / min(h, w)
            if self.max_long_side:
                scale = min(scale, self.max_long_side / max(h, w))
        elif self.train:
            lo, hi = self.lsj_range if self.lsj else self.scale_range
            scale = base * random.uniform(lo, hi)
        else:
            scale = base
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        if len(masks):
            masks = F.interpolate(masks[None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
        else:
            masks = torch.zeros((0, nh, nw), dtype=torch.uint8)
        boxes = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        if self.train and self.lsj:
            img, boxes, masks, labels = self._crop_pad(img, boxes, masks, labels)
        if self.train and self.flip > 0 and random.random() < self.flip:
            img, masks = img.flip(-1), masks.flip(-1)
            W = img.shape[-1]
            boxes = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {"boxes": boxes, "labels": labels, "masks": masks, "image_id": info["id"],
                  "scale": (nh / h, nw / w), "orig_size": (h, w)}
        return img, target

    def _crop_pad(self, img, boxes, masks, labels):
        s = self.img_size
        _, h, w = img.shape
        y0 = random.randint(0, max(h - s, 0))
        x0 = random.randint(0, max(w - s, 0))
        img, masks = img[:, y0:y0 + s, x0:x0 + s], masks[:, y0:y0 + s, x0:x0 + s]
        ch, cw = img.shape[-2:]
        boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
        # objects cut away by the crop are augmentation, not data loss: keep those with a box and mask left
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1) & (masks.flatten(1).sum(1) > 0)
        boxes, masks, labels = boxes[keep], masks[keep], labels[keep]
        if ch < s or cw < s:
            img = F.pad(img, (0, s - cw, 0, s - ch))
            masks = F.pad(masks, (0, s - cw, 0, s - ch))
        return img, boxes, masks, labels


def collate_detection(batch):
    """List of ``(image, target)`` -> ``(list of images, list of targets)`` (sizes differ)."""
    return [b[0] for b in batch], [b[1] for b in batch]
