"""Datasets (ImageFolder directories and zip archives read in place) and transforms.

The names below load on first use, so the torch-free modules of this package (:mod:`.images`,
:mod:`.preprocess`) can be imported where torch is not installed (``hpvit predict`` on an ONNX file).
"""

from ..lazy import lazy_getattr

# public name -> the submodule that defines it
_NAMES = {
    "ImageFolderSource": ".folder", "ImageFolderDataset": ".folder", "balanced_subset": ".folder",
    "ResumableSampler": ".seeded", "SeededDataset": ".seeded",
    "build_transform": ".transforms", "build_mixup": ".transforms",
}

__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES, globals())
