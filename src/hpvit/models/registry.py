"""Registration with timm: ``timm.create_model("hpvit_base_patch16_224", pretrained=True, ...)``.

Each registered model is a plain ViT architecture transformed by an hpvit config (``hpvit_config=``,
default ``paper-cls``). Pretrained tags name the *plain* weights timm already hosts (e.g.
``hpvit_base_patch16_224.mae`` -> ``timm/vit_base_patch16_224.mae``); the conversion runs as the
model's checkpoint filter, so ``pretrained_cfg_overlay=dict(file="plain_vit.pth")`` also works with a
local plain checkpoint. ``import hpvit`` registers the models.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoints import load_plain
from ..checkpoints.spec import PlainSpec
from ..config import get_config
from ..errors import CheckpointError, OfflineError
from .hierarchical import HierarchicalViT
from .reuse import convert_state_dict

# name: (dim, depth, heads, patch)
ARCHS = {
    "hpvit_tiny_patch16_224": (192, 12, 3, 16),
    "hpvit_small_patch16_224": (384, 12, 6, 16),
    "hpvit_base_patch16_224": (768, 12, 12, 16),
    "hpvit_large_patch16_224": (1024, 24, 16, 16),
    "hpvit_huge_patch14_224": (1280, 32, 16, 14),
}

# tag -> (timm hub id of the plain weights, classes of that checkpoint)
PLAIN_WEIGHTS = {
    "hpvit_tiny_patch16_224": {
        "augreg_in21k_ft_in1k": ("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", 1000),
        "augreg_in21k": ("timm/vit_tiny_patch16_224.augreg_in21k", 21843),
        "deit_in1k": ("timm/deit_tiny_patch16_224.fb_in1k", 1000),
    },
    "hpvit_small_patch16_224": {
        "augreg_in21k_ft_in1k": ("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", 1000),
        "augreg_in21k": ("timm/vit_small_patch16_224.augreg_in21k", 21843),
        "deit_in1k": ("timm/deit_small_patch16_224.fb_in1k", 1000),
    },
    "hpvit_base_patch16_224": {
        "mae": ("timm/vit_base_patch16_224.mae", 0),
        "augreg_in21k": ("timm/vit_base_patch16_224.augreg_in21k", 21843),
        "augreg2_in21k_ft_in1k": ("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", 1000),
        "deit_in1k": ("timm/deit_base_patch16_224.fb_in1k", 1000),
    },
    "hpvit_large_patch16_224": {
        "mae": ("timm/vit_large_patch16_224.mae", 0),
        "augreg_in21k_ft_in1k": ("timm/vit_large_patch16_224.augreg_in21k_ft_in1k", 1000),
    },
    "hpvit_huge_patch14_224": {
        "mae": ("timm/vit_huge_patch14_224.mae", 0),
    },
}


def _spec_for(name: str, in_chans: int = 3, img_size: int = 224) -> PlainSpec:
    dim, depth, heads, patch = ARCHS[name]
    g = img_size // patch
    return PlainSpec(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, in_chans=in_chans,
                     mlp_hidden=4 * dim, pos_grid=(g, g), num_classes=1000)


class TimmHierarchicalViT(HierarchicalViT):
    """``HierarchicalViT`` with the constructor signature timm's builder expects."""

    def __init__(self, arch: str, hpvit_config: Any = "paper-cls", num_classes: int = 1000, in_chans: int = 3,
                 img_size: int = 224, drop_path_rate: float = 0.0, **kwargs: Any):
        cfg = get_config(hpvit_config, img_size=img_size, drop_path_rate=drop_path_rate, **kwargs)
        super().__init__(_spec_for(arch, in_chans), cfg, num_classes=num_classes)

    def prune_intermediate_layers(self, indices=None, prune_norm: bool = False, prune_head: bool = True):
        """timm feature-extraction hook: nothing to prune structurally; drops the head if asked."""
        if prune_head:
            self.reset_classifier(0)
        n = self.layout.num_stages
        if indices is None:
            return list(range(n))
        if isinstance(indices, int):
            return list(range(n - indices, n))
        return [i % n for i in indices]


def plain_to_hpvit_filter(state_dict: dict[str, torch.Tensor], model: HierarchicalViT) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: a plain ViT state dict -> the hierarchical model's state dict."""
    plain = load_plain(state_dict)
    s, m = plain.spec, model.spec
    for field in ("embed_dim", "depth", "patch_size"):
        if getattr(s, field) != getattr(m, field):
            raise CheckpointError(
                f"the plain checkpoint has {field}={getattr(s, field)} but {type(model).__name__} was built with "
                f"{getattr(m, field)}; pick the hpvit model of the same size, or use hpvit.from_plain(path)"
            )
    sd, report = convert_state_dict(plain, model)
    model._reuse_report = report
    return sd


def _is_network_error(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    if mod.startswith(("huggingface_hub", "requests", "httpx", "urllib3")):
        return True
    return isinstance(e, (ConnectionError, TimeoutError)) or (isinstance(e, OSError) and not isinstance(e, FileNotFoundError))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalViT:
    from timm.models import build_model_with_cfg

    arch = variant.split(".")[0]
    try:
        return build_model_with_cfg(
            TimmHierarchicalViT, variant, pretrained, arch=arch,
            pretrained_filter_fn=plain_to_hpvit_filter,
            feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
            **kwargs,
        )
    except Exception as e:
        if pretrained and _is_network_error(e):
            raise OfflineError(
                f"{variant}: downloading the plain ViT weights failed ({type(e).__name__}: {str(e)[:160]}). Offline? "
                f"Use a local plain checkpoint: timm.create_model('{arch}', pretrained=True, "
                "pretrained_cfg_overlay=dict(file='/path/to/plain_vit.pth'), num_classes=...) or "
                "hpvit.from_plain('/path/to/plain_vit.pth', config='paper-cls')"
            ) from e
        raise


def _pretrained_cfgs() -> dict[str, dict]:
    cfgs = {}
    for arch, tags in PLAIN_WEIGHTS.items():
        for tag, (hub_id, ncls) in tags.items():
            inception = "augreg" in tag  # Google's augreg weights normalise with mean = std = 0.5
            cfgs[f"{arch}.{tag}"] = dict(
                hf_hub_id=hub_id, num_classes=ncls, input_size=(3, 224, 224), crop_pct=0.9, interpolation="bicubic",
                mean=(0.5, 0.5, 0.5) if inception else (0.485, 0.456, 0.406),
                std=(0.5, 0.5, 0.5) if inception else (0.229, 0.224, 0.225),
                first_conv="patch_embed.proj", classifier="head",
            )
    return cfgs


def _register() -> None:
    import sys

    import timm.models._registry as reg
    from timm.models import generate_default_cfgs, register_model

    mod = sys.modules[__name__]
    mod.default_cfgs = generate_default_cfgs(_pretrained_cfgs())
    for arch in ARCHS:
        if arch in reg._model_entrypoints:
            continue

        def entry(pretrained: bool = False, _arch: str = arch, **kwargs: Any) -> HierarchicalViT:
            return _create(_arch, pretrained=pretrained, **kwargs)

        entry.__name__ = entry.__qualname__ = arch
        entry.__module__ = __name__
        entry.__doc__ = f"{arch}: plain ViT (dim, depth, heads, patch) = {ARCHS[arch]} transformed by an hpvit config."
        setattr(mod, arch, entry)
        register_model(entry)


_register()
