"""What ``hpvit predict`` shares between its PyTorch and ONNX Runtime paths, with numpy and PIL only (no torch):
the loop over images in batches, top-k, and the output folder.

A *predictor* (:mod:`hpvit.tasks.predict` for PyTorch models, :mod:`hpvit.tasks.predict_onnx` for ONNX files)
has ``task`` (``cls``, ``det``, ``seg`` or ``features``), ``prepare(pil) -> input`` and
``run([(name, pil, input), ...]) -> [record, ...]``; detectors and segmenters also ``class_names`` /
``cat_ids`` / ``palette``. A record is a dict with ``image`` (the name), ``width``, ``height`` and:

* ``cls``: ``topk``: ``[{"class_id", "class", "score"}]``, best first (softmax probabilities);
* ``det``: ``image_id`` and ``detections``: COCO results entries (``image_id``, ``category_id``, ``bbox``
  ``[x, y, w, h]``, ``score``, ``segmentation`` as compressed RLE) in the image's pixels;
* ``seg``: ``label``: ``(H, W)`` uint8 class ids at the image's size, ``class_fractions``;
* ``features``: ``features``: one ``(D, h, w)`` float32 array per pyramid level.

Output folder (:func:`predict_to_folder`): ``predictions.json`` (cls, seg, features: one entry per image; det:
the COCO results list, with ``images.json`` naming each ``image_id``'s file), per image ``overlays/NAME.png``
(det, seg), ``labels/NAME.png`` (seg: class ids as pixel values, in the dataset's palette) or
``features/NAME.npz`` (features), and ``skipped.json`` when images were skipped. Everything is written into
a new folder first and put in place at the end: a failed run leaves ``--out`` as it was.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..data.images import FIX, BadImageError
from ..data.preprocess import to_pil
from ..errors import ConfigError, OutputError

PREDICT_FIX = "replace or delete the file, or pass --skip-bad-images to predict the other images"
OVERLAY_ALPHA = 0.45


def topk(probs: np.ndarray, names: Sequence[str], k: int, threshold: float = 0.0) -> list[dict]:
    """The ``k`` most probable classes of ``probs`` ``(K,)`` scoring at least ``threshold``, best first."""
    order = np.argsort(-probs, kind="stable")[: max(1, k)]
    return [{"class_id": int(i), "class": names[int(i)], "score": float(probs[i])} for i in order
            if probs[i] >= threshold]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def named_items(images: Any) -> list[tuple[str, Any]]:
    """``(name, item)`` pairs: a path is named by itself, an in-memory image as ``<image i>``."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    return [(os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"<image {i}>", x) for i, x in enumerate(images)]


def iter_records(predictor, items: Sequence[tuple[str, Any]], batch_size: int = 8, skip_bad: bool = False,
                 on_skip: "Callable[[str, str], None] | None" = None) -> Iterator[tuple[dict, Image.Image]]:
    """``(record, RGB image)`` for every decodable item, ``batch_size`` images per forward pass. An image that
    cannot be decoded raises BadImageError naming it, or with ``skip_bad`` is reported to ``on_skip(name, why)``."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        batch = []
        for name, item in items[start:start + batch_size]:
            try:
                pil = to_pil(item, name)
            except BadImageError as e:
                if not skip_bad:
                    raise BadImageError(str(e).replace(FIX, PREDICT_FIX), e.path) from e
                if on_skip is not None:
                    on_skip(name, str(e))
                continue
            batch.append((name, pil, predictor.prepare(pil)))
        if batch:
            yield from zip(predictor.run(batch), (b[1] for b in batch))


# ---------------------------------------------------------------------------------------------- output folder
class OutputFolder:
    """A new folder beside ``out`` that becomes ``out`` on :meth:`commit` (the old ``out`` is removed only then)."""

    def __init__(self, out: "str | os.PathLike", overwrite: bool, keep: Iterable[str] = ()):
        self.out = Path(out)
        self.check(out, overwrite, keep)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.predict-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self._stems: set[str] = set()

    @staticmethod
    def check(out: "str | os.PathLike", overwrite: bool, keep: Iterable[str] = ()) -> None:
        """Refuse an ``out`` that is a file, that holds something (without ``overwrite``), or that holds one of
        the files ``keep`` (the images and the model, which replacing the folder would delete)."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise OutputError(f"--out {out} is a file, not a folder; choose a folder path")
        inside = [k for k in keep if _inside(k, out)]
        if inside:
            raise OutputError(f"--out {out} holds {inside[0]}, which this command reads: the output would replace "
                              "it; choose another --out folder")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise OutputError(f"--out {out} exists; refusing to replace it (add --overwrite to replace it, or choose "
                              "another folder)")

    def unique_stem(self, name: str) -> str:
        """A file stem for image ``name`` that no earlier image got (``a.jpg`` -> ``a``, then ``a-2``...)."""
        base = Path(name).stem if not name.startswith("<") else "image-" + name.strip("<>").split()[-1]
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in base) or "image"
        stem, n = base, 1
        while stem in self._stems:
            n += 1
            stem = f"{base}-{n}"
        self._stems.add(stem)
        return stem

    def path(self, *parts: str) -> Path:
        p = self.tmp.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self) -> None:
        old = self.out.parent / f".{self.out.name}.replaced-{os.getpid()}"
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _inside(path: str, folder: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _blend(img: Image.Image, color_map: np.ndarray, where: np.ndarray) -> Image.Image:
    a = np.asarray(img, dtype=np.float32)
    a[where] = (1 - OVERLAY_ALPHA) * a[where] + OVERLAY_ALPHA * color_map[where]
    return Image.fromarray(np.round(a).astype(np.uint8))


def colors(n: int) -> np.ndarray:
    """``(n, 3)`` uint8: well-separated colours for detection classes (a fixed golden-ratio hue walk)."""
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)]
                     for i in range(max(n, 1))], dtype=np.uint8)


def draw_detections(img: Image.Image, dets: list[dict], names: dict[int, str]) -> Image.Image:
    """``img`` with each detection's mask blended in and its box labelled "class score"."""
    from pycocotools import mask as mask_utils  # optional peer (hpvit[dense])

    ids = sorted(names)
    palette = colors(len(ids))
    col = {c: tuple(int(v) for v in palette[i]) for i, c in enumerate(ids)}
    for d in dets:
        if "segmentation" in d:
            m = mask_utils.decode(d["segmentation"]).astype(bool)
            img = _blend(img, np.broadcast_to(np.asarray(col[d["category_id"]], np.float32), m.shape + (3,)), m)
    draw = ImageDraw.Draw(img)
    for d in dets:
        x, y, w, h = d["bbox"]
        c = col[d["category_id"]]
        draw.rectangle([x, y, x + w, y + h], outline=c, width=2)
        draw.text((x + 2, max(0, y - 11)), f"{names[d['category_id']]} {d['score']:.2f}", fill=c)
    return img


def write_record(folder: OutputFolder, rec: dict, img: Image.Image, predictor) -> dict:
    """Write one image's files; returns its entry in predictions.json (cls, seg, features) or images.json (det)."""
    task = predictor.task
    head = {k: rec[k] for k in ("image", "width", "height")}
    if task == "cls":
        return {**head, "topk": rec["topk"]}
    stem = folder.unique_stem(rec["image"])
    if task == "det":
        overlay = draw_detections(img.copy(), rec["detections"], dict(zip(predictor.cat_ids, predictor.class_names)))
        overlay.save(folder.path("overlays", f"{stem}.png"))
        return {"id": rec["image_id"], "file_name": rec["image"], "width": rec["width"], "height": rec["height"],
                "overlay": f"overlays/{stem}.png"}
    if task == "seg":
        h, w = rec["label"].shape
        lab = Image.frombytes("P", (w, h), np.ascontiguousarray(rec["label"], dtype=np.uint8).tobytes())
        pal = np.zeros((256, 3), np.uint8)
        pal[: len(predictor.palette)] = np.asarray(predictor.palette, np.uint8)
        lab.putpalette(pal.flatten().tolist())
        lab.save(folder.path("labels", f"{stem}.png"))
        _blend(img, pal[rec["label"]].astype(np.float32), np.ones(rec["label"].shape, bool)).save(
            folder.path("overlays", f"{stem}.png"))
        return {**head, "label_png": f"labels/{stem}.png", "overlay": f"overlays/{stem}.png",
                "class_fractions": rec["class_fractions"]}
    np.savez(folder.path("features", f"{stem}.npz"), **{f"p{i + 1}": f for i, f in enumerate(rec["features"])})
    return {**head, "features": f"features/{stem}.npz", "shapes": [list(f.shape) for f in rec["features"]]}


def predict_to_folder(predictor, inputs: Sequence[str], out: "str | os.PathLike", *, batch_size: int = 8,
                      overwrite: bool = False, skip_bad: bool = False, model: str = "") -> str:
    """``hpvit predict``: predict every image of ``inputs``, write the output folder (module docstring) and
    return the one-line summary. The folder is checked before any image is read."""
    folder = OutputFolder(out, overwrite, keep=list(inputs) + ([model] if model else []))
    skipped: list[dict] = []
    entries, dets = [], []
    bar = None
    t0 = time.perf_counter()
    try:
        if sys.stderr.isatty():
            bar = tqdm(total=len(inputs), desc="predict", unit="img", dynamic_ncols=True, leave=False)
        items = [(p, p) for p in inputs]
        for rec, img in iter_records(predictor, items, batch_size, skip_bad,
                                     on_skip=lambda name, why: skipped.append({"image": name, "error": why})):
            entries.append(write_record(folder, rec, img, predictor))
            dets.extend(rec.get("detections", ()))
            if bar is not None:
                bar.update(1)
        _write_json(folder.path("predictions.json"), dets if predictor.task == "det" else entries)
        if predictor.task == "det":
            cats = [{"id": c, "name": n} for c, n in zip(predictor.cat_ids, predictor.class_names)]
            _write_json(folder.path("images.json"), {"images": entries, "categories": cats})
        if skipped:
            _write_json(folder.path("skipped.json"), skipped)
        folder.commit()
    except BaseException:
        folder.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
    dt = time.perf_counter() - t0
    n = len(entries)
    skip = f"; {len(skipped)} undecodable image(s) skipped, listed in {Path(out) / 'skipped.json'}" if skipped else ""
    what = {"cls": "top-k classes", "det": "detections (COCO results)", "seg": "label maps",
            "features": "feature maps"}[predictor.task]
    return (f"hpvit predict: {n} image(s) in {dt:.1f}s ({n / max(dt, 1e-9):.1f} images/s), {what} in "
            f"{Path(out) / 'predictions.json'}{skip}")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))
