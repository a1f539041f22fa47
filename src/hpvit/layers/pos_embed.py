"""Absolute position embedding resampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_abs_pos_embed(
    grid: torch.Tensor, new_hw: tuple[int, int], mode: str = "bicubic"
) -> torch.Tensor:
    """Resample a position-embedding grid ``(1, H, W, D)`` to ``(1, H', W', D)``.

    ``align_corners=False`` maps token centres onto token centres: a stride-4 token ``i`` whose patch
    is centred at pixel ``4i + 2`` reads the plain grid at ``(4i + 2) / 16 - 0.5``, i.e. exactly where
    the stride-16 token centred on that pixel would be. Computed in float32 for accuracy.
    """
    if tuple(grid.shape[1:3]) == tuple(new_hw):
        return grid
    dtype = grid.dtype
    g = grid.permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=new_hw, mode=mode, align_corners=False)
    return g.permute(0, 2, 3, 1).to(dtype)
