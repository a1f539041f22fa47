"""Datasets (ImageFolder directories and zip archives read in place) and transforms."""

from .folder import ImageFolderDataset, ImageFolderSource, balanced_subset
from .seeded import ResumableSampler, SeededDataset
from .transforms import build_mixup, build_transform

__all__ = [
    "ImageFolderSource", "ImageFolderDataset", "balanced_subset", "ResumableSampler", "SeededDataset",
    "build_transform", "build_mixup",
]
