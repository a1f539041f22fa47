"""The canonical plain-ViT description every checkpoint format is mapped onto.

Canonical layout = timm's ``VisionTransformer`` state-dict names:
``patch_embed.proj.{weight,bias}``, ``cls_token``, ``reg_token``, ``pos_embed``, ``norm_pre.*``,
``blocks.{i}.{norm1,attn.qkv,attn.q_norm,attn.k_norm,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*``,
``norm.*``, ``fc_norm.*``, ``head_proj.weight`` (a bias-free projection after pooling, e.g. CLIP's
``proj``) and ``head.{weight,bias}``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError
from ..utils import DictIO

CANONICAL_PATTERNS = [
    r"cls_token",
    r"reg_token",
    r"pos_embed",
    r"patch_embed\.proj\.(weight|bias)",
    r"norm_pre\.(weight|bias)",
    r"blocks\.\d+\.norm[12]\.(weight|bias)",
    r"blocks\.\d+\.attn\.(qkv|proj)\.(weight|bias)",
    r"blocks\.\d+\.attn\.[qk]_norm\.(weight|bias)",
    r"blocks\.\d+\.ls[12]\.gamma",
    r"blocks\.\d+\.mlp\.fc[12]\.(weight|bias)",
    r"norm\.(weight|bias)",
    r"fc_norm\.(weight|bias)",
    r"head_proj\.weight",
    r"head\.(weight|bias)",
]
_CANON_RE = re.compile("^(?:" + "|".join(CANONICAL_PATTERNS) + ")$")

# Heads are not stored in the weights. Standard widths use the standard head counts (ViT-H: 16 heads
# of 80 dims; DINOv2-g: 24 of 64); any other width assumes 64-dim heads. Override with num_heads=.
_HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24, 1664: 16}


def is_canonical_key(k: str) -> bool:
    return bool(_CANON_RE.match(k))


@dataclass
class PlainSpec(DictIO):
    """Architecture of a plain ViT, as far as the hierarchical transform needs it."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    in_chans: int = 3
    mlp_hidden: int = 0
    qkv_bias: bool = True
    qk_norm: bool = False
    proj_bias: bool = True
    mlp_bias: bool = True
    patch_bias: bool = True
    layerscale: bool = False
    class_token: bool = True
    num_reg_tokens: int = 0
    no_embed_class: bool = False
    pos_grid: tuple[int, int] | None = (14, 14)
    norm_pre: bool = False
    final_norm: str = "norm"  # "norm" (before pooling), "fc_norm" (after pooling) or "none"
    global_pool: str = "token"  # "token" or "avg": how the source model pools
    num_classes: int = 0
    proj_dim: int = 0  # bias-free projection after pooling (CLIP); 0 = none
    act: str = "gelu"
    norm_eps: float = 1e-6

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_reg_tokens

    _dict_error = CheckpointError
    _dict_what = "PlainSpec field"

    def describe(self) -> str:
        bits = [
            f"dim={self.embed_dim}", f"depth={self.depth}", f"heads={self.num_heads}", f"patch={self.patch_size}",
            f"mlp={self.mlp_hidden}", f"qkv_bias={self.qkv_bias}", f"layerscale={self.layerscale}",
            f"cls_token={self.class_token}", f"reg_tokens={self.num_reg_tokens}", f"pos_grid={self.pos_grid}",
            f"norm_pre={self.norm_pre}", f"final_norm={self.final_norm}", f"pool={self.global_pool}",
            f"classes={self.num_classes}", f"act={self.act}",
        ]
        if self.qk_norm:
            bits.append("qk_norm=True")
        if self.proj_dim:
            bits.append(f"proj_dim={self.proj_dim}")
        return ", ".join(bits)


def _square_side(n: int) -> int | None:
    s = int(math.isqrt(n))
    return s if s * s == n else None


def infer_spec(sd: dict[str, torch.Tensor], source: str = "<state_dict>", **overrides: Any) -> PlainSpec:
    """Infer a :class:`PlainSpec` from a canonical state dict; ``overrides`` win over inference."""
    def need(k: str) -> torch.Tensor:
        if k not in sd:
            raise CheckpointError(
                f"{source}: canonical key {k!r} is missing; the checkpoint is incomplete or not a plain ViT "
                f"(found keys like {sorted(sd)[:5]})"
            )
        return sd[k]

    pw = need("patch_embed.proj.weight")
    if pw.ndim != 4 or pw.shape[-1] != pw.shape[-2]:
        raise CheckpointError(f"{source}: patch_embed.proj.weight has shape {tuple(pw.shape)}, expected (D, C, P, P)")
    dim, in_chans, patch = pw.shape[0], pw.shape[1], pw.shape[-1]
    block_ids = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    if not block_ids:
        raise CheckpointError(f"{source}: no transformer blocks (blocks.N.*) found")
    depth = len(block_ids)
    if block_ids != list(range(depth)):
        raise CheckpointError(f"{source}: block indices are not contiguous: {block_ids}")
    qkv = need("blocks.0.attn.qkv.weight")
    if tuple(qkv.shape) != (3 * dim, dim):
        raise CheckpointError(f"{source}: blocks.0.attn.qkv.weight has shape {tuple(qkv.shape)}, expected {(3 * dim, dim)}")
    fc1 = need("blocks.0.mlp.fc1.weight")
    cls_token = "cls_token" in sd
    n_reg = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    n_prefix = int(cls_token) + n_reg
    pos_grid = None
    no_embed_class = False
    if "pos_embed" in sd:
        L = int(sd["pos_embed"].shape[1])
        side = _square_side(L - n_prefix) if n_prefix and L > n_prefix else None
        if side is not None:
            pos_grid = (side, side)
        elif _square_side(L) is not None:
            pos_grid = (_square_side(L),) * 2
            no_embed_class = n_prefix > 0
        else:
            raise CheckpointError(
                f"{source}: pos_embed has {L} tokens, which is not a square grid with or without {n_prefix} prefix "
                "token(s); pass pos_grid=(H, W) for non-square grids"
            )
    fc_norm = "fc_norm.weight" in sd
    norm = "norm.weight" in sd
    final_norm = "fc_norm" if fc_norm else ("norm" if norm else "none")
    num_classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
    spec = PlainSpec(
        embed_dim=dim,
        depth=depth,
        num_heads=_HEADS_BY_DIM.get(dim, max(1, dim // 64)),
        patch_size=patch,
        in_chans=in_chans,
        mlp_hidden=int(fc1.shape[0]),
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        mlp_bias="blocks.0.mlp.fc1.bias" in sd,
        patch_bias="patch_embed.proj.bias" in sd,
        layerscale="blocks.0.ls1.gamma" in sd,
        class_token=cls_token,
        num_reg_tokens=n_reg,
        no_embed_class=no_embed_class,
        pos_grid=pos_grid,
        norm_pre="norm_pre.weight" in sd,
        final_norm=final_norm,
        global_pool="avg" if (fc_norm or not cls_token) else "token",
        num_classes=num_classes,
        proj_dim=int(sd["head_proj.weight"].shape[0]) if "head_proj.weight" in sd else 0,
    )
    if overrides:
        names = {f.name for f in dataclasses.fields(PlainSpec)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise CheckpointError(f"unknown spec override(s) {bad}; valid: {sorted(names)}")
        spec = dataclasses.replace(spec, **overrides)
    if spec.embed_dim % spec.num_heads:
        raise CheckpointError(f"{source}: embed_dim {spec.embed_dim} is not divisible by num_heads {spec.num_heads}")
    return spec


def check_shapes(sd: dict[str, torch.Tensor], spec: PlainSpec, source: str) -> None:
    """Raise a CheckpointError naming the first tensor whose shape disagrees with ``spec``."""
    d, h = spec.embed_dim, spec.mlp_hidden
    expect = {
        "patch_embed.proj.weight": (d, spec.in_chans, spec.patch_size, spec.patch_size),
        "cls_token": (1, 1, d),
    }
    optional = {"patch_embed.proj.bias": (d,), "reg_token": (1, spec.num_reg_tokens, d)}
    for n in ("norm_pre", "norm", "fc_norm"):
        optional.update({f"{n}.weight": (d,), f"{n}.bias": (d,)})
    if spec.proj_dim:
        optional["head_proj.weight"] = (spec.proj_dim, d)
    if spec.num_classes:
        optional["head.weight"] = (spec.num_classes, spec.proj_dim or d)
        optional["head.bias"] = (spec.num_classes,)
    for i in range(spec.depth):
        p = f"blocks.{i}."
        expect.update({
            p + "norm1.weight": (d,), p + "norm2.weight": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.proj.weight": (d, d),
            p + "mlp.fc1.weight": (h, d), p + "mlp.fc2.weight": (d, h),
        })
        optional.update({
            p + "norm1.bias": (d,), p + "norm2.bias": (d,), p + "attn.proj.bias": (d,),
            p + "mlp.fc1.bias": (h,), p + "mlp.fc2.bias": (d,),
            p + "attn.q_norm.weight": (d // spec.num_heads,), p + "attn.k_norm.weight": (d // spec.num_heads,),
        })
        if spec.qkv_bias:
            expect[p + "attn.qkv.bias"] = (3 * d,)
        if spec.layerscale:
            expect[p + "ls1.gamma"] = (d,)
            expect[p + "ls2.gamma"] = (d,)
    for k, shape in expect.items():
        if k in sd and tuple(sd[k].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(sd[k].shape)} but the inferred spec needs {shape}; "
                "the checkpoint is inconsistent (mixed models?) or truncated"
            )
        if k not in sd and not k.startswith("cls_token"):
            raise CheckpointError(f"{source}: tensor {k!r} is missing; the checkpoint is incomplete")
    for k, shape in optional.items():
        if k in sd and tuple(sd[k].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(sd[k].shape)} but the inferred spec needs {shape}; "
                "the checkpoint is inconsistent (mixed models?) or its spec overrides are wrong"
            )
    if "pos_embed" in sd:
        pe = sd["pos_embed"]
        gh, gw = spec.pos_grid or (0, 0)
        n = gh * gw + (0 if spec.no_embed_class else spec.num_prefix_tokens)
        if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != d or (spec.pos_grid and pe.shape[1] != n):
            raise CheckpointError(
                f"{source}: tensor 'pos_embed' has shape {tuple(pe.shape)} but the inferred spec needs {(1, n, d)}; "
                "the checkpoint is inconsistent (mixed models?)"
            )
