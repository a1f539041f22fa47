"""Small shared helpers for tests (not fixtures)."""

from __future__ import annotations

import timm
import torch


def random_timm_vit(seed: int = 0, jitter: float = 0.02, **kwargs) -> torch.nn.Module:
    """A timm VisionTransformer with random weights, every tensor perturbed so that no parameter is
    at a trivial value (zero heads, unit layer-scale...), in eval mode."""
    torch.manual_seed(seed)
    m = timm.create_model(kwargs.pop("name", "vit_tiny_patch16_224"), pretrained=False, **kwargs)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(jitter * torch.randn_like(p))
    return m.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def randomize_new_params(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Give the freshly initialised tensors (pool convs, rel-pos tables) non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".downsample." in n or n.endswith("rel_pos_table"):
                p.copy_(scale * torch.randn(p.shape, generator=g))
