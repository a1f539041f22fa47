"""Unlabeled images: every image file under one or more folders or zip archives (``hpvit adapt``).

Folders are searched recursively; zips are read in place. Files are sorted by path, so the dataset
(and, with a seed, its order) is the same on every machine and every rank.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ConfigError
from .folder import IMG_EXTENSIONS, _looks_like_zip, unsafe_path_name, _ZipReader
from .images import decode_image, display_name, probe_image


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not os.path.basename(name).startswith(".")


class UnlabeledImages(torch.utils.data.Dataset):
    """``(image_tensor, index)`` for every image under ``roots`` (folders or zip archives).

    Raises :class:`~hpvit.errors.ConfigError` when a root does not exist or holds no image.
    """

    def __init__(self, roots: "Sequence[str | os.PathLike]", transform=None, max_samples: int | None = None,
                 seed: int = 0):
        if not roots:
            raise ConfigError("no image folder given: pass --data DIR_OR_ZIP (repeatable)")
        self.items: list[tuple[int, str]] = []  # (root index, member path or file path)
        self.roots: list[Path] = []
        self.zips: list[_ZipReader | None] = []
        for r in roots:
            root = Path(r)
            if not root.exists():
                raise ConfigError(f"--data {root}: no such folder or zip archive")
            k = len(self.roots)
            self.roots.append(root)
            if root.is_file():
                if not _looks_like_zip(root):
                    raise ConfigError(f"--data {root}: a file that is not a zip archive; give a folder of images or a .zip")
                z = _ZipReader(root)
                try:
                    names = z.names()
                except Exception as e:  # BadZipFile, truncated archive
                    raise ConfigError(f"--data {root}: the zip archive cannot be read ({e}); copy it again") from e
                self.zips.append(z)
                found = sorted(n for n in names if _is_image(n) and not n.endswith("/"))
                unsafe = [n for n in found if unsafe_path_name(n)]
                if unsafe:
                    raise ConfigError(f"--data {root}: {len(unsafe)} member name(s) of the zip point outside the "
                                      f"archive (absolute paths or '..' parts), e.g. {unsafe[:3]}; re-create the zip")
            else:
                self.zips.append(None)
                found = sorted(str(p) for p in root.rglob("*") if p.is_file() and _is_image(p.name))
            if not found:
                raise ConfigError(
                    f"--data {root}: no image files found (looked for {', '.join(IMG_EXTENSIONS)}"
                    f"{' inside the archive' if root.is_file() else ' in the folder and its subfolders'})"
                )
            self.items += [(k, f) for f in found]
        if max_samples is not None and max_samples < len(self.items):
            g = torch.Generator().manual_seed(seed)
            keep = sorted(torch.randperm(len(self.items), generator=g)[:max_samples].tolist())
            self.items = [self.items[i] for i in keep]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def name_of(self, idx: int) -> str:
        k, member = self.items[idx]
        return display_name(member, self.roots[k] if self.zips[k] is not None else None)

    def _src(self, idx: int):
        k, member = self.items[idx]
        z = self.zips[k]
        return z.read(member) if z is not None else member

    def check_item(self, idx: int, full: bool) -> None:
        """Decode image ``idx`` (``full``) or read its header; BadImageError naming the file."""
        if full:
            decode_image(self._src(idx), self.name_of(idx))
        else:
            probe_image(self._src(idx), self.name_of(idx))

    def __getitem__(self, idx: int):
        img = decode_image(self._src(idx), self.name_of(idx))
        if self.transform is not None:
            img = self.transform(img)
        return img, idx
