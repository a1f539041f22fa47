"""Registration with timm: ``timm.create_model("hpvit_base_patch16_224.mae", pretrained=True, ...)``.

Each registered model is a plain ViT architecture transformed by an hpvit config (``hpvit_config=``: a
preset name, a dict of :class:`~hpvit.HPViTConfig` fields or an ``HPViTConfig``; default ``paper-cls``;
single config fields may also be given as keywords, e.g. ``rel_pos=False``). Pretrained tags name the
*plain* weights timm already hosts (``hpvit_base_patch16_224.mae`` -> ``timm/vit_base_patch16_224.mae``)
and carry that source's data config (mean/std, crop), so ``timm.data.resolve_data_config`` matches the
weights. The checkpoint filter accepts either kind of state dict:

* a plain ViT (any layout :func:`hpvit.load_plain` reads): converted on load, as ``hpvit convert`` does;
* hpvit's own layout (``hpvit.save``, ``timm.models.save_for_hf`` / ``push_to_hub`` of a fine-tuned
  model, a training checkpoint): loaded as is.

so ``pretrained_cfg_overlay=dict(file=...)``, ``local-dir:`` and ``hf-hub:`` names all work for both.
timm models are classifiers: ``forward`` returns a tensor for every preset (the dense presets
``paper-det`` / ``paper-seg`` keep their block layout and get an average-pooling head); the 4-level
pyramid comes from ``forward_pyramid``, ``forward_intermediates`` or ``features_only=True``.
``import hpvit`` registers the models. See docs/timm.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from typing import Any, Iterable

import timm.models._registry as reg
import torch
from timm.layers import register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from torch import nn

from ..checkpoints import load_plain
from ..checkpoints.spec import PlainSpec
from ..config import HPViTConfig, get_config
from ..errors import CheckpointError, ConfigError, OfflineError
from .hierarchical import FX_LEAF_MODULES, HierarchicalViT
from .reuse import convert_state_dict

# name: (dim, depth, heads, patch)
ARCHS = {
    "hpvit_tiny_patch16_224": (192, 12, 3, 16),
    "hpvit_small_patch16_224": (384, 12, 6, 16),
    "hpvit_base_patch16_224": (768, 12, 12, 16),
    "hpvit_large_patch16_224": (1024, 24, 16, 16),
    "hpvit_huge_patch14_224": (1280, 32, 16, 14),
}

# PlainSpec fields a source family changes from a standard timm ViT (the model is built before the weights load)
_CLIP = dict(norm_pre=True, patch_bias=False, norm_eps=1e-5)
FAMILY_SPECS: dict[str, dict[str, Any]] = {
    "clip_laion2b_ft_in1k": _CLIP,
    "clip_openai": dict(_CLIP, act="quick_gelu"),
}

# tag -> timm name of the plain weights (its pretrained cfg supplies hub id, classes and data config).
# The first tag of each model is its default, used when a local file comes with pretrained_cfg_overlay.
PLAIN_WEIGHTS: dict[str, dict[str, str]] = {
    "hpvit_tiny_patch16_224": {
        "augreg_in21k_ft_in1k": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        "augreg_in21k": "vit_tiny_patch16_224.augreg_in21k",
        "deit_in1k": "deit_tiny_patch16_224.fb_in1k",
    },
    "hpvit_small_patch16_224": {
        "augreg_in21k_ft_in1k": "vit_small_patch16_224.augreg_in21k_ft_in1k",
        "augreg_in21k": "vit_small_patch16_224.augreg_in21k",
        "deit_in1k": "deit_small_patch16_224.fb_in1k",
        "dino": "vit_small_patch16_224.dino",
    },
    "hpvit_base_patch16_224": {
        "mae": "vit_base_patch16_224.mae",
        "augreg_in21k": "vit_base_patch16_224.augreg_in21k",
        "augreg2_in21k_ft_in1k": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "deit_in1k": "deit_base_patch16_224.fb_in1k",
        "dino": "vit_base_patch16_224.dino",
        "clip_laion2b_ft_in1k": "vit_base_patch16_clip_224.laion2b_ft_in1k",
        "clip_openai": "vit_base_patch16_clip_quickgelu_224.openai",
    },
    "hpvit_large_patch16_224": {
        "mae": "vit_large_patch16_224.mae",
        "augreg_in21k_ft_in1k": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    },
    "hpvit_huge_patch14_224": {
        "mae": "vit_huge_patch14_224.mae",
    },
}

# timm create_model / train.py keywords that mean "not used" at these values (accepted and ignored)
_IGNORED_IF = {"drop_block_rate": (None, 0, 0.0), "bn_momentum": (None,), "bn_eps": (None,)}
# PlainSpec fields that decide which tensors exist and how they are used; a pretrained file must agree
_STRUCTURAL = ("embed_dim", "depth", "patch_size", "mlp_hidden", "qkv_bias", "qk_norm", "proj_bias", "mlp_bias",
               "patch_bias", "layerscale", "norm_pre", "final_norm", "proj_dim")


def _spec_for(name: str, in_chans: int = 3, img_size: int = 224, family: str = "") -> PlainSpec:
    """The plain ViT of a registered name (``family``: a pretrained tag with its own spec, e.g. CLIP)."""
    dim, depth, heads, patch = ARCHS[name]
    g = img_size // patch
    spec = PlainSpec(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, in_chans=in_chans,
                     mlp_hidden=4 * dim, pos_grid=(g, g), num_classes=1000)
    return dataclasses.replace(spec, **FAMILY_SPECS.get(family, {}))


def _config_overrides(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validate keywords left after the timm ones: each must be an HPViTConfig field."""
    fields = {f.name for f in dataclasses.fields(HPViTConfig)}
    out = {}
    for k, v in kwargs.items():
        if k in _IGNORED_IF and v in _IGNORED_IF[k]:
            continue
        if k in fields:
            out[k] = v
            continue
        hint = "hpvit options go in hpvit_config= (a preset name, a dict or an HPViTConfig)"
        if k in ("config", "cfg", "preset", "hpvit_cfg"):
            hint = f"did you mean hpvit_config={v!r}? {hint}"
        else:
            close = difflib.get_close_matches(k, sorted(fields | {"hpvit_config", "global_pool", "drop_rate"}), n=1)
            if close:
                hint = f"did you mean {close[0]}=? {hint}"
        raise ConfigError(f"{name}: unknown keyword argument {k!r}; {hint}, or as HPViTConfig fields: {sorted(fields)}")
    return out


class TimmHierarchicalViT(HierarchicalViT):
    """``HierarchicalViT`` with the constructor timm's builder and scripts use.

    Keywords as timm's ``VisionTransformer``: ``num_classes``, ``in_chans``, ``img_size``, ``global_pool``
    (``avg`` | ``token`` | ``''``), ``drop_rate`` (dropout before the classifier), ``drop_path_rate``,
    ``attn_drop_rate``, ``proj_drop_rate`` (attention output and MLP), ``device``, ``dtype``; plus
    ``hpvit_config`` and single HPViTConfig fields. Unknown keywords raise ConfigError naming the right one.
    Unlike the presets, ``class_token`` defaults to ``drop`` (a spatial ``forward_features``, as timm expects
    of a hierarchical model) unless the keyword or a config dict sets it.
    """

    def __init__(self, arch: str, hpvit_config: Any = "paper-cls", num_classes: int = 1000, in_chans: int = 3,
                 img_size: int = 224, global_pool: str | None = None, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 family: str = "", device: "torch.device | str | None" = None, dtype: torch.dtype | None = None,
                 **kwargs: Any):
        overrides = _config_overrides(arch, kwargs)
        if isinstance(hpvit_config, (str, dict)) and "class_token" not in overrides and not (
                isinstance(hpvit_config, dict) and "class_token" in hpvit_config):
            # timm's contract for hierarchical models: forward_features is a spatial map (output_fmt NHWC), so
            # the class token is dropped unless asked for (class_token='auto'/'join': token output, NLC)
            overrides["class_token"] = "drop"
        if not isinstance(img_size, int):
            img_size = tuple(int(v) for v in img_size)
        cfg = get_config(hpvit_config, img_size=img_size, drop_path_rate=drop_path_rate, **overrides)
        if cfg.head == "none":  # dense presets: timm models return a tensor; the pyramid stays available
            cfg = cfg.replace(head="avg")
        # the position embedding keeps the source's 224-pixel grid and is resampled to each input at run time
        spec = _spec_for(arch, in_chans, 224, family)
        if device is not None and torch.device(device).type == "meta":  # no memory: shapes and metadata only
            with torch.device("meta"):
                super().__init__(spec, cfg, num_classes=num_classes)
        else:
            super().__init__(spec, cfg, num_classes=num_classes)
        if global_pool is not None:
            self.reset_classifier(self.num_classes, global_pool)
        if drop_rate:
            self.head_drop = nn.Dropout(drop_rate)
        for blk in self.blocks:
            blk.attn.attn_drop = float(attn_drop_rate)
            blk.attn.proj_drop.p = float(proj_drop_rate)
            blk.mlp.drop.p = float(proj_drop_rate)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def prune_intermediate_layers(self, indices: int | Iterable[int] | None = None, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm feature-extraction hook: nothing to prune structurally; drops the head if asked. Returns the
        stage ids ``indices`` selects (out-of-range ids raise ConfigError)."""
        take = self.take_indices(indices)
        if prune_head:
            self.reset_classifier(0, "")
        return take


def _is_hpvit_layout(sd: dict[str, torch.Tensor], model: HierarchicalViT) -> bool:
    """True when ``sd`` already uses the hierarchical model's names (a file hpvit or timm saved from an hpvit
    model), False for a plain ViT. Raises CheckpointError for hpvit weights of another config."""
    own = set(model.state_dict())
    keys = {k for k in sd if not k.startswith("head.")}
    hpvit_only = [k for k in keys if k.endswith("rel_pos_table") or ".downsample." in k or k.startswith("empty_stages.")]
    if not hpvit_only:
        return keys <= own and not (own - keys - {k for k in own if k.startswith("head.")})
    missing = sorted(k for k in own - keys if not k.startswith("head."))
    unexpected = sorted(keys - own)
    if missing or unexpected:
        raise CheckpointError(
            f"these are hpvit weights for another config or model size (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}); create the model with the hpvit_config= (and size) they were trained with, or "
            "load the file with hpvit.load(path)"
        )
    return True


def _check_spec(src: PlainSpec, model: HierarchicalViT) -> None:
    bad = [f"{f}={getattr(src, f)!r} (model: {getattr(model.spec, f)!r})" for f in _STRUCTURAL
           if getattr(src, f) != getattr(model.spec, f)]
    if bad:
        raise CheckpointError(
            f"the plain checkpoint does not fit {type(model).__name__} as built: {', '.join(bad)}. Pick the hpvit "
            "model and pretrained tag of the same size and family (docs/timm.md lists them, e.g. "
            "hpvit_base_patch16_224.clip_openai for OpenAI CLIP), or use hpvit.from_plain(path), which builds the "
            "model from the file"
        )


def pretrained_filter(state_dict: dict[str, torch.Tensor], model: HierarchicalViT) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: a state dict -> the hierarchical model's state dict.

    hpvit-layout weights pass through unchanged; plain ViT weights are converted (and the reuse report kept on
    the model). The patch projection keeps the file's input channels, so timm can then adapt it to ``in_chans``.
    """
    sd = state_dict.get("state_dict", state_dict.get("model", state_dict)) if isinstance(state_dict, dict) else state_dict
    if isinstance(sd, dict) and _is_hpvit_layout(sd, model):
        return dict(sd)
    plain = load_plain(sd)
    _check_spec(plain.spec, model)
    proj = "patch_embed.proj.weight"
    src_proj = plain.state_dict.get(proj)
    if src_proj is not None and src_proj.shape[1] != model.spec.in_chans:
        plain.state_dict.pop(proj)  # timm adapts the input conv after this filter (in_chans != 3)
    out, report = convert_state_dict(plain, model)
    if src_proj is not None and proj not in [r[0] for r in report.reused]:
        out[proj] = src_proj
        report.new.remove(proj)
        report.reused.append((proj, proj, f"{src_proj.shape[1]} -> {model.spec.in_chans} input channels (timm adapts)"))
    model._reuse_report = report
    return out


plain_to_hpvit_filter = pretrained_filter  # the name before fine-tuned hpvit weights were accepted


def _is_network_error(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    if mod.startswith(("huggingface_hub", "requests", "httpx", "urllib3")):
        return True
    return isinstance(e, (ConnectionError, TimeoutError)) or (isinstance(e, OSError) and not isinstance(e, FileNotFoundError))


def _family(variant: str, pretrained_cfg: Any) -> str:
    """The pretrained tag when it names a source family with its own spec (CLIP), else ''. The tag comes from
    the name (``arch.tag``), from timm's ``pretrained_cfg=`` (a tag string) or from a saved cfg (``local-dir:``)."""
    tag = variant.partition(".")[2]
    if not tag and isinstance(pretrained_cfg, str):
        tag = pretrained_cfg
    elif not tag and pretrained_cfg is not None:
        tag = (pretrained_cfg.get("tag") if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, "tag", None)) or ""
    return tag if tag in FAMILY_SPECS else ""


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalViT:
    arch = variant.split(".")[0]
    kwargs.setdefault("family", _family(variant, kwargs.get("pretrained_cfg")))
    try:
        return build_model_with_cfg(
            TimmHierarchicalViT, variant, pretrained, arch=arch,
            pretrained_filter_fn=pretrained_filter,
            feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
            **kwargs,
        )
    except Exception as e:
        if pretrained and _is_network_error(e):
            raise OfflineError(
                f"{variant}: downloading the weights failed ({type(e).__name__}: {str(e)[:160]}). Offline? "
                f"Use a local file: timm.create_model('{variant}', pretrained=True, "
                "pretrained_cfg_overlay=dict(file='/path/to/weights.pth'), num_classes=...) (a plain ViT or an "
                "hpvit file) or hpvit.from_plain('/path/to/plain_vit.pth', config='paper-cls')"
            ) from e
        raise


def _pretrained_cfgs() -> dict[str, dict]:
    """One cfg per (model, tag): hub id, classes and data config copied from timm's cfg of the plain weights."""
    cfgs = {}
    for arch, tags in PLAIN_WEIGHTS.items():
        patch = ARCHS[arch][3]
        for tag, source in tags.items():
            src = get_pretrained_cfg(source)
            cfgs[f"{arch}.{tag}"] = dict(
                hf_hub_id=src.hf_hub_id if src is not None else f"timm/{source}",
                num_classes=src.num_classes if src is not None else 1000,
                input_size=(3, 224, 224), pool_size=(7, 7), min_input_size=(3, 32, 32),
                crop_pct=src.crop_pct if src is not None else 0.9,
                interpolation=src.interpolation if src is not None else "bicubic",
                mean=tuple(src.mean) if src is not None else (0.485, 0.456, 0.406),
                std=tuple(src.std) if src is not None else (0.229, 0.224, 0.225),
                first_conv="patch_embed.proj", classifier="head", license=getattr(src, "license", None),
                notes=(f"plain weights {source} (patch {patch}) converted on load; a fine-tuned hpvit file loads as is",),
            )
    return cfgs


def _register() -> None:
    for cls in FX_LEAF_MODULES:  # timm's FX tracer (feature_cls='fx', FX tools) calls these as leaves
        register_notrace_module(cls)
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
