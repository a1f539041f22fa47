"""Building blocks shared by the hierarchical model and the plain baseline."""

from .attention import (Attention, Block, Mlp, pad_partition, phase_partition, phase_unpartition, unpartition_crop,
                        valid_partition, window_partition, window_unpartition)
from .patch_embed import PatchEmbed
from .pooling import Downsample
from .pos_embed import resample_abs_pos_embed

__all__ = [
    "Attention",
    "Block",
    "Mlp",
    "PatchEmbed",
    "Downsample",
    "resample_abs_pos_embed",
    "window_partition",
    "window_unpartition",
    "pad_partition",
    "unpartition_crop",
    "phase_partition",
    "phase_unpartition",
    "valid_partition",
]
