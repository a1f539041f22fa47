"""Small shared helpers for tests (not fixtures)."""

from __future__ import annotations

import contextlib

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


def save_small_vit(path, img_size: int = 32):
    """A random 4-block, 64-wide timm ViT (patch 16, 10 classes) saved as a plain state dict at ``path``."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, embed_dim=64, num_heads=2,
                          img_size=img_size, num_classes=10)
    torch.save(m.state_dict(), path)
    return path


def fault_env(step: int, what: str = "FAULT") -> dict:
    """Environment for a subprocess that kills itself right after optimizer update ``step`` (``what="SIGINT"``:
    sends itself Ctrl-C's SIGINT instead), through the test-only seam in tests/fault_seam/sitecustomize.py (the
    library has no fault-injection code of its own)."""
    import os
    from pathlib import Path

    here = Path(__file__).resolve().parent
    path = [str(here / "fault_seam"), str(here.parent / "src"), os.environ.get("PYTHONPATH", "")]
    return {f"HPVIT_{what}_AT_STEP": str(step), "PYTHONPATH": os.pathsep.join(p for p in path if p)}


@contextlib.contextmanager
def update_hook(hook):
    """``hook(trainer, update)`` in the engine's ``Trainer.update_hooks`` for the ``with`` block (removed after it,
    also on an error)."""
    from hpvit.engine.loop import Trainer

    Trainer.update_hooks.append(hook)
    try:
        yield hook
    finally:
        Trainer.update_hooks.remove(hook)


def interrupt_after(update: int):
    """``with interrupt_after(n):`` a run in the block stops (KeyboardInterrupt, as Ctrl-C before the engine handled
    SIGINT) right after update ``n`` and the checkpoint that update may write."""
    def stop(trainer, u):
        if u == update:
            raise KeyboardInterrupt

    return update_hook(stop)
