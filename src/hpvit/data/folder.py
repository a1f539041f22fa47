"""ImageFolder-layout datasets read from a directory or, in place, from a zip archive.

Layout: ``ROOT/<split>/<class>/<image>`` where ``ROOT`` is a directory or a ``.zip`` file; inside a
zip the split folders may sit under one top-level folder (``cifar10.zip`` holds
``cifar10/train/<class>/*.jpg``). Classes are the sorted sub-folder names of the training split,
so indices match ``torchvision.datasets.ImageFolder``.
"""

from __future__ import annotations

import os
import threading
import zipfile
from zlib import error as zlib_error
from pathlib import Path

import torch
from PIL import Image

from ..errors import BadImageError, ConfigError
from .images import FIX, decode_image, display_name, probe_image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EVAL_SPLITS = ("val", "test")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


class _ZipReader:
    """Reads members of one zip archive; re-opens the file in each process (safe with DataLoader workers)."""

    def __init__(self, path: Path):
        self.path = path
        self._zf: zipfile.ZipFile | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def _file(self) -> zipfile.ZipFile:
        if self._zf is None or self._pid != os.getpid():
            self._zf = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zf

    def names(self) -> list[str]:
        return self._file().namelist()

    def read(self, name: str) -> bytes:
        with self._lock:
            return self._file().read(name)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


class ImageFolderSource:
    """The file list of a dataset root (directory or zip), split by split name.

    ``splits()`` lists the splits found; ``samples(split)`` returns ``[(member, class_index)]``.
    """

    def __init__(self, root: "str | os.PathLike"):
        self.root = Path(root)
        if not self.root.exists():
            raise ConfigError(
                f"data path {self.root} does not exist; pass a directory or .zip archive in ImageFolder layout "
                "(ROOT/train/<class>/*.jpg plus ROOT/val/ or ROOT/test/)"
            )
        self.zip: _ZipReader | None = None
        self._by_split: dict[str, list[tuple[str, str]]] = {}
        if self.root.is_dir():
            self._scan_dir()
        elif zipfile.is_zipfile(self.root):
            self.zip = _ZipReader(self.root)
            self._scan_zip()
        elif _looks_like_zip(self.root):
            raise ConfigError(
                f"data path {self.root} is a zip archive that cannot be read (truncated or corrupt: its table of "
                "contents at the end is missing); copy or download it again and check its size"
            )
        else:
            raise ConfigError(f"data path {self.root} is neither a directory nor a zip archive; pass an ImageFolder "
                              "directory or a .zip of one")
        if "train" not in self._by_split and not any(s in self._by_split for s in EVAL_SPLITS):
            raise ConfigError(
                f"{self.root}: no train/, val/ or test/ split with <class>/<image> files found; expected ImageFolder "
                "layout ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg (or test/)"
            )
        ref = "train" if "train" in self._by_split else self.eval_split()
        self.classes = sorted({c for _, c in self._by_split[ref]})
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    # ---------------------------------------------------------------- scanning
    def _scan_dir(self) -> None:
        for split in ("train",) + EVAL_SPLITS:
            d = self.root / split
            if not d.is_dir():
                continue
            items = []
            for cdir in sorted(p for p in d.iterdir() if p.is_dir()):
                for dirpath, _, files in os.walk(cdir):
                    for f in sorted(files):
                        # regular files only: a FIFO or device named x.jpg would block or never end when read
                        if _is_image(f) and os.path.isfile(os.path.join(dirpath, f)):
                            items.append((os.path.join(dirpath, f), cdir.name))
            if items:
                self._by_split[split] = sorted(items)

    def _scan_zip(self) -> None:
        names = [n for n in self.zip.names() if not n.endswith("/") and _is_image(n)]
        unsafe = [n for n in names if unsafe_path_name(n)]
        if unsafe:
            raise ConfigError(
                f"data path {self.root}: {len(unsafe)} member name(s) of the zip point outside the archive's folders "
                f"(absolute paths or '..' parts), e.g. {unsafe[:3]}; such names never map onto a train/<class>/ folder. "
                "Re-create the zip from the dataset folder (cd ROOT && zip -r ../data.zip train val)")
        # find the prefix under which the split folders live ("" or "cifar10/")
        found: dict[str, dict[str, list[tuple[str, str]]]] = {}
        for n in names:
            parts = n.split("/")
            for i in range(len(parts) - 2):
                if parts[i] in ("train",) + EVAL_SPLITS:
                    prefix = "/".join(parts[:i])
                    found.setdefault(prefix, {}).setdefault(parts[i], []).append((n, parts[i + 1]))
                    break
        if not found:
            return
        # the shallowest prefix with a train split wins
        prefix = min(found, key=lambda p: (("train" not in found[p]), p.count("/") if p else -1, p))
        self._by_split = {k: sorted(v) for k, v in found[prefix].items()}

    # ---------------------------------------------------------------- access
    def splits(self) -> list[str]:
        return sorted(self._by_split)

    def eval_split(self) -> str:
        for s in EVAL_SPLITS:
            if s in self._by_split:
                return s
        raise ConfigError(
            f"{self.root}: no val/ or test/ split found (splits present: {self.splits()}); add ROOT/val/<class>/*.jpg"
        )

    def samples(self, split: str) -> list[tuple[str, int]]:
        if split not in self._by_split:
            hint = "ROOT/train/<class>/*.jpg" if split == "train" else f"ROOT/{split}/<class>/*.jpg"
            raise ConfigError(f"{self.root}: no {split!r} split found (splits present: {self.splits()}); expected {hint}")
        out = []
        for member, cname in self._by_split[split]:
            if cname not in self.class_to_idx:
                raise ConfigError(
                    f"{self.root}: class folder {cname!r} in split {split!r} is not a class of the training split "
                    f"({len(self.classes)} classes); every split must use the same class folders"
                )
            out.append((member, self.class_to_idx[cname]))
        return out

    def name_of(self, member: str) -> str:
        """How errors name ``member``: its path, or ``archive.zip!member``."""
        return display_name(member, self.root if self.zip is not None else None)

    def _bytes(self, member: str) -> bytes:
        try:
            return self.zip.read(member)
        except (zipfile.BadZipFile, OSError, EOFError, zlib_error) as e:
            name = self.name_of(member)
            raise BadImageError(f"image {name} cannot be read from the archive ({type(e).__name__}: {e}); the zip is "
                                f"damaged: copy it again, or {FIX}", name) from e

    def open_image(self, member: str) -> Image.Image:
        """The image ``member`` decoded to RGB; :class:`BadImageError` naming the file when it cannot be."""
        src = self._bytes(member) if self.zip is not None else member
        return decode_image(src, self.name_of(member))

    def probe(self, member: str) -> tuple[int, int, str]:
        """``(width, height, mode)`` from the header of ``member`` (fast; nothing decoded)."""
        src = self._bytes(member) if self.zip is not None else member
        return probe_image(src, self.name_of(member))


def unsafe_path_name(name: str) -> bool:
    """A name meant to be relative (a zip member, a COCO file_name) that is absolute (``/x``, ``C:/x``, ``\\x``) or
    has a ``..`` part, so it points outside its folder."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or (len(parts[0]) == 2 and parts[0][1] == ":") or ".." in parts


def _looks_like_zip(path: Path) -> bool:
    """A file that starts like a zip archive (``PK\\x03\\x04``) or is named ``.zip``."""
    if path.suffix.lower() == ".zip":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def balanced_subset(samples: list[tuple[str, int]], n: int | None, seed: int) -> list[tuple[str, int]]:
    """A fixed, class-balanced subset of ``n`` samples (all of them when ``n`` is None or too large)."""
    if n is None or n >= len(samples):
        return samples
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, c) in enumerate(samples):
        by_class.setdefault(c, []).append(i)
    classes = sorted(by_class)
    order = {c: [by_class[c][j] for j in torch.randperm(len(by_class[c]), generator=g).tolist()] for c in classes}
    chosen: list[int] = []
    k = 0
    while len(chosen) < n:  # round-robin over classes: balanced as far as the classes allow
        for c in classes:
            if k < len(order[c]) and len(chosen) < n:
                chosen.append(order[c][k])
        k += 1
    return [samples[i] for i in sorted(chosen)]


class ImageFolderDataset(torch.utils.data.Dataset):
    """``(image_tensor, class_index)`` pairs of one split of an :class:`ImageFolderSource`."""

    def __init__(self, source: ImageFolderSource, split: str, transform=None, max_samples: int | None = None, seed: int = 0):
        self.source = source
        self.split = split
        self.samples = balanced_subset(source.samples(split), max_samples, seed)
        if not self.samples:
            raise ConfigError(f"{source.root}: split {split!r} holds no images")
        self.transform = transform
        self.classes = source.classes

    def __len__(self) -> int:
        return len(self.samples)

    def check_item(self, idx: int, full: bool) -> None:
        """Decode sample ``idx`` (``full``) or read its header only; BadImageError naming the file."""
        member = self.samples[idx][0]
        if full:
            self.source.open_image(member)
        else:
            self.source.probe(member)

    def __getitem__(self, idx: int):
        member, target = self.samples[idx]
        img = self.source.open_image(member)
        if self.transform is not None:
            img = self.transform(img)
        return img, target
