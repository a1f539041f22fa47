"""Identity check against the source's own library.

:func:`validate_identity` builds the model the checkpoint came from *with that model's own code* (timm,
transformers or open_clip), loads the source's weights into it, and compares its forward with
``hpvit.from_plain(plain, "identity")`` on one random batch. It is what ``hpvit convert --validate`` runs.

Which library checks which format:

==========  =========================================================================================
timm, mae,  ``timm.models.vision_transformer.VisionTransformer`` built from the spec (MAE's encoder is a
dinov2      timm ViT; official DINOv2 files are compared after timm's own DINOv2 conversion), DeiT
deit        distilled: ``timm.models.deit.VisionTransformerDistilled`` (class-token logits compared)
hf          ``transformers``: the folder's ``config.json`` + ``from_pretrained`` (a bare state dict gets a
            config built from the spec); ViTForImageClassification logits, otherwise the normalised
            class token ``last_hidden_state[:, 0]`` (ViTMAE with masking disabled)
clip        ``open_clip.transformer.VisionTransformer``: the projected image embedding
==========  =========================================================================================

``max_rel_diff`` is ``max|ours - theirs| / max|theirs|``.
"""

from __future__ import annotations

import functools
import importlib
import os
import tempfile
from typing import Any

import torch
from safetensors.torch import save_file
from timm.layers import QuickGELU as TimmQuickGELU
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .checkpoints import _from_hub, hf_format, load_plain
from .checkpoints.io import read_folder_or_file, unwrap_state_dict
from .errors import CheckpointError
from .models.build import from_plain

_LIBRARY = {"timm": "timm", "mae": "timm", "dinov2": "timm", "deit": "timm", "hf": "transformers", "clip": "open_clip"}


def _require(lib: str, fmt: str):
    try:
        return importlib.import_module(lib)
    except ImportError as e:
        pip = {"open_clip": "open-clip-torch"}.get(lib, lib)
        raise CheckpointError(
            f"cannot validate a {fmt!r} checkpoint: its library {lib!r} is not installed "
            f"(pip install {pip}, or pip install 'hpvit[peers]'); the conversion itself does not need it"
        ) from e


def _raw_state_dict(src: Any) -> dict[str, torch.Tensor]:
    if isinstance(src, dict):
        return unwrap_state_dict(src)
    if isinstance(src, str) and src.startswith("timm:"):
        return _from_hub(src[len("timm:"):])[0]
    return unwrap_state_dict(read_folder_or_file(os.fspath(src)), os.fspath(src))


def _act_module(act: str) -> type[nn.Module]:
    if act == "quick_gelu":
        return TimmQuickGELU
    if act == "gelu_tanh":
        return functools.partial(nn.GELU, approximate="tanh")
    return nn.GELU


def _timm_reference(plain, raw: dict[str, torch.Tensor]) -> tuple[nn.Module, str, Any]:
    """timm's own ViT with the source weights; returns (model, what is compared, fn(model, x) -> output)."""
    s = plain.spec
    if s.proj_dim:
        raise CheckpointError("timm validation does not cover a head projection (head_proj); validate with open_clip")
    gh, gw = s.pos_grid
    kw = dict(
        img_size=(gh * s.patch_size, gw * s.patch_size), patch_size=s.patch_size, in_chans=s.in_chans,
        num_classes=s.num_classes, global_pool=s.global_pool, embed_dim=s.embed_dim, depth=s.depth,
        num_heads=s.num_heads, mlp_ratio=s.mlp_hidden / s.embed_dim, qkv_bias=s.qkv_bias, qk_norm=s.qk_norm,
        proj_bias=s.proj_bias, init_values=1.0 if s.layerscale else None, class_token=s.class_token,
        pre_norm=s.norm_pre, final_norm=s.final_norm == "norm", fc_norm=s.final_norm == "fc_norm",
        norm_layer=functools.partial(nn.LayerNorm, eps=s.norm_eps), act_layer=_act_module(s.act),
    )
    if plain.format == "deit":
        model = VisionTransformerDistilled(**kw)
        model.load_state_dict(raw, strict=True)

        def run(m, x):
            return m.head(m.forward_features(x)[:, 0])

        return model, "class-token logits (the distillation head is dropped by design)", run
    model = VisionTransformer(**kw, reg_tokens=s.num_reg_tokens, no_embed_class=s.no_embed_class)
    model.load_state_dict(plain.state_dict, strict=True)
    what = "logits" if s.num_classes else "pooled feature"
    if plain.format in ("mae", "dinov2"):
        what += f" (timm ViT: the encoder {plain.format} is built on; source key layout mapped as timm does)"
    return model, what, lambda m, x: m(x)


_HF_CLASSES = {
    "ViTModel": "ViTModel", "ViTForImageClassification": "ViTForImageClassification",
    "ViTMAEModel": "ViTMAEModel", "ViTMAEForPreTraining": "ViTMAEModel",
    "Dinov2Model": "Dinov2Model", "Dinov2WithRegistersModel": "Dinov2WithRegistersModel",
}


def _hf_reference(plain, raw, src) -> tuple[nn.Module, str, Any]:
    import transformers as T


    folder = None
    if isinstance(src, (str, os.PathLike)) and not str(src).startswith("timm:"):
        p = os.fspath(src)
        folder = p if os.path.isdir(p) else os.path.dirname(p)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            folder = None
    kind = hf_format.model_kind(raw)
    s = plain.spec
    with tempfile.TemporaryDirectory() as tmp:
        if folder is not None:
            cfg = T.AutoConfig.from_pretrained(folder)
            arch = (getattr(cfg, "architectures", None) or [kind])[0]
            kind = arch if arch in _HF_CLASSES else kind
        else:
            common = dict(
                hidden_size=s.embed_dim, num_hidden_layers=s.depth, num_attention_heads=s.num_heads,
                intermediate_size=s.mlp_hidden, image_size=s.pos_grid[0] * s.patch_size, patch_size=s.patch_size,
                num_channels=s.in_chans, layer_norm_eps=s.norm_eps, qkv_bias=s.qkv_bias,
                hidden_act={"gelu_tanh": "gelu_pytorch_tanh"}.get(s.act, s.act),
            )
            if kind.startswith("Dinov2"):
                common.pop("intermediate_size")
                common["mlp_ratio"] = s.mlp_hidden / s.embed_dim
                if kind == "Dinov2WithRegistersModel":
                    cfg = T.Dinov2WithRegistersConfig(**common, num_register_tokens=s.num_reg_tokens)
                else:
                    cfg = T.Dinov2Config(**common)
            elif kind.startswith("ViTMAE"):
                cfg = T.ViTMAEConfig(**common)
            else:
                cfg = T.ViTConfig(**common, num_labels=max(s.num_classes, 1))
            getattr(T, kind)(cfg).save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in raw.items()}, os.path.join(tmp, "model.safetensors"))
            folder = tmp
        cls = _HF_CLASSES.get(kind, "ViTModel")
        if cls == "ViTMAEModel":
            cfg.mask_ratio = 0.0
        extra = {}
        if cls == "ViTModel":  # build the pooler only when the file has one (its output is not compared)
            extra["add_pooling_layer"] = any(".pooler." in k or k.startswith("pooler.") for k in raw)
        model = getattr(T, cls).from_pretrained(folder, config=cfg, **extra)
    if cls == "ViTForImageClassification":
        return model, "transformers ViTForImageClassification logits", lambda m, x: m(pixel_values=x).logits

    def run(m, x):
        kw = {}
        if cls == "ViTMAEModel":  # increasing noise keeps every patch in its original order
            n = (x.shape[-2] // s.patch_size) * (x.shape[-1] // s.patch_size)
            kw["noise"] = torch.arange(n, dtype=x.dtype).expand(x.shape[0], n)
        return m(pixel_values=x, **kw).last_hidden_state[:, 0]

    return model, f"transformers {cls} normalised class token (last_hidden_state[:, 0])", run


def _clip_reference(plain, raw) -> tuple[nn.Module, str, Any]:
    from open_clip.transformer import QuickGELU, VisionTransformer

    s = plain.spec
    pfx = "visual." if "visual.conv1.weight" in raw else ""
    vis = {k[len(pfx):]: v for k, v in raw.items() if k.startswith(pfx)}
    act = {"quick_gelu": QuickGELU, "gelu": nn.GELU}.get(s.act)
    if act is None:
        raise CheckpointError(f"open_clip validation supports act quick_gelu or gelu, not {s.act!r}")
    model = VisionTransformer(
        image_size=s.pos_grid[0] * s.patch_size, patch_size=s.patch_size, width=s.embed_dim, layers=s.depth,
        heads=s.num_heads, mlp_ratio=s.mlp_hidden / s.embed_dim, ls_init_value=1.0 if s.layerscale else None,
        output_dim=s.proj_dim or s.embed_dim, act_layer=act,
        norm_layer=functools.partial(nn.LayerNorm, eps=s.norm_eps),
    )
    if not s.proj_dim:
        model.proj = None
    model.load_state_dict(vis, strict=True)
    return model, "open_clip VisionTransformer image embedding (projected)", lambda m, x: m(x)


def validate_identity(src: Any, plain: Any = None, tol: float = 1e-4, batch: int = 2) -> dict[str, Any]:
    """Compare ``hpvit.from_plain(plain, "identity")`` with the source's own library on a random batch.

    Args:
        src: what :func:`hpvit.load_plain` read (path, folder, ``timm:<name>`` or state dict); re-read here
            so the reference model gets the source's own tensors, not hpvit's mapping of them.
        plain: the :class:`PlainViT` (``load_plain(src)`` when None; pass it to keep spec overrides).
        tol: relative tolerance for ``ok``.

    Returns ``{"library", "model", "compared", "max_abs_diff", "max_rel_diff", "ok"}``. Raises
    :class:`~hpvit.errors.CheckpointError` when the library is not installed.
    """

    if plain is None:
        plain = load_plain(src)
    lib = _LIBRARY.get(plain.format)
    if lib is None:
        raise CheckpointError(f"no reference library known for format {plain.format!r}")
    _require(lib, plain.format)
    raw = _raw_state_dict(src)
    if plain.format == "hf":
        ref, what, run = _hf_reference(plain, raw, src)
    elif plain.format == "clip":
        ref, what, run = _clip_reference(plain, raw)
    else:
        ref, what, run = _timm_reference(plain, raw)
    ours = from_plain(plain, "identity").eval()
    ref = ref.eval()
    s = plain.spec
    gh, gw = s.pos_grid or (224 // s.patch_size, 224 // s.patch_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, s.in_chans, gh * s.patch_size, gw * s.patch_size, generator=g)
    with torch.no_grad():
        a = ours(x).float()
        b = run(ref, x).float()
    if a.shape != b.shape:
        return dict(library=lib, model=type(ref).__name__, compared=what, max_abs_diff=float("inf"),
                    max_rel_diff=float("inf"), ok=False, note=f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a - b).abs().max().item()
    rel = diff / max(b.abs().max().item(), 1e-12)
    return dict(library=lib, model=type(ref).__name__, compared=what, max_abs_diff=diff, max_rel_diff=rel,
                ok=bool(rel <= tol))
