"""Every supported checkpoint format converts exactly.

Each test builds the peer's own model with random weights using the peer library itself (timm,
transformers, open_clip; for MAE pre-training a module with MAE's layout on timm blocks), saves it the way
its users save it, converts it with hpvit and requires the ``identity`` config to reproduce the peer's
own forward (logits, or the pooled / projected feature of headless models) to 1e-4 relative. The
``paper-*`` configs must reuse every encoder tensor of the source, and the source file must be unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import hpvit
from hpvit.checkpoints import load_plain
from hpvit.verify import validate_identity
from hpvit.errors import CheckpointError, OfflineError

timm = pytest.importorskip("timm")

TOL = 1e-4
PAPER_CONFIGS = ("paper-cls", "paper-det", "paper-seg")


# ---------------------------------------------------------------- helpers
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter so nothing sits at a trivial init (LN weight 1, zero biases, tiny gammas)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def check_identity(src, ref_out: torch.Tensor, x: torch.Tensor, fmt: str | None = None, **spec_overrides):
    """Convert ``src`` with the identity config and compare with the peer's output. Returns the PlainViT."""
    is_file = isinstance(src, Path) or (isinstance(src, str) and not src.startswith("timm:"))
    before = digest(Path(src)) if is_file else None
    plain = load_plain(src, **spec_overrides)
    if fmt is not None:
        assert plain.format == fmt, plain.summary()
    model = hpvit.from_plain(plain, "identity").eval()
    with torch.no_grad():
        ours = model(x)
    assert ours.shape == ref_out.shape
    err = rel_err(ours, ref_out)
    print(f"[identity] {plain.format}: max relative difference {err:.2e}")  # shown with pytest -s
    assert err < TOL, f"identity differs from the peer by {err:.2e} (relative)\n{plain.summary()}"
    if before is not None:
        assert digest(Path(src)) == before, "the source was modified"
    return plain


def check_paper_reuse(plain) -> None:
    for cfg in PAPER_CONFIGS:
        model = hpvit.from_plain(plain, cfg)
        report = model.reuse_report()
        used = set(report.reused_keys)
        missing = [k for k in plain.state_dict if not k.startswith(("head.", "cls_token", "reg_token")) and k not in used]
        assert not missing, f"{cfg}: encoder tensors not reused: {missing[:5]}"
        assert report.encoder_fully_reused(plain)


def image(side: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- timm
def timm_vit(**kw) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=64, patch_size=16, embed_dim=128, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=10)
    args.update(kw)
    return randomize(VisionTransformer(**args))


TIMM_VARIANTS = {
    "plain": {},
    "layerscale": dict(init_values=0.1),
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "reg_tokens_no_embed_class": dict(reg_tokens=4, no_embed_class=True),
    "reg_tokens_embed_class": dict(reg_tokens=2),
    "fc_norm_avgpool": dict(global_pool="avg", fc_norm=True),
    "pre_norm": dict(pre_norm=True),
    "qk_norm": dict(qk_norm=True),
    "patch8": dict(patch_size=8, img_size=48),
    "patch14": dict(patch_size=14, img_size=56),
    "patch32": dict(patch_size=32, img_size=96),
    "grid_6x6": dict(img_size=96),
    "headless": dict(num_classes=0),
    "dim192_3heads": dict(embed_dim=192, num_heads=3),
}


@pytest.mark.parametrize("variant", sorted(TIMM_VARIANTS))
def test_timm_variants(variant, tmp_path):
    m = timm_vit(**TIMM_VARIANTS[variant])
    path = tmp_path / "vit.pth"
    torch.save({"model": m.state_dict(), "epoch": 3}, path)
    x = image(m.patch_embed.img_size[0])
    with torch.no_grad():
        ref = m(x)
    plain = check_identity(path, ref, x, fmt="timm")
    if m.patch_embed.patch_size[0] == 16 and variant != "grid_6x6":
        check_paper_reuse(plain)


@pytest.mark.parametrize("wrapper", ["bare", "state_dict", "module", "model_ema", "safetensors", "bin", "pt"])
def test_timm_wrappers_and_suffixes(wrapper, tmp_path):
    m = timm_vit(depth=2)
    sd = m.state_dict()
    if wrapper == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "vit.safetensors"
        save_file(sd, path)
    else:
        obj = {
            "bare": sd,
            "state_dict": {"state_dict": sd, "optimizer": {}},
            "module": {"model": {"module." + k: v for k, v in sd.items()}},
            "model_ema": {"model_ema": sd},
            "bin": sd,
            "pt": {"model": sd},
        }[wrapper]
        path = tmp_path / ("vit." + {"bin": "bin", "pt": "pt"}.get(wrapper, "pth"))
        torch.save(obj, path)
    x = image(64)
    with torch.no_grad():
        ref = m(x)
    check_identity(path, ref, x, fmt="timm")


def test_timm_in_memory_state_dict():
    m = timm_vit(depth=2)
    x = image(64)
    with torch.no_grad():
        ref = m(x)
    check_identity(m.state_dict(), ref, x, fmt="timm")


def test_real_deit_tiny(deit_tiny_path):
    before = digest(deit_tiny_path)
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    raw = torch.load(deit_tiny_path, map_location="cpu", weights_only=True)
    m.load_state_dict(raw["model"] if "model" in raw else raw)
    m.eval()
    x = image(224, batch=1)
    with torch.no_grad():
        ref = m(x)
    plain = check_identity(deit_tiny_path, ref, x, fmt="timm")
    assert plain.spec.num_heads == 3 and plain.spec.num_classes == 1000
    check_paper_reuse(plain)
    assert digest(deit_tiny_path) == before


# ---------------------------------------------------------------- DeiT distilled
def test_deit_distilled(tmp_path):
    from timm.models.deit import VisionTransformerDistilled

    m = randomize(VisionTransformerDistilled(img_size=64, patch_size=16, embed_dim=128, depth=4, num_heads=2,
                                             mlp_ratio=2.0, num_classes=10))
    path = tmp_path / "deit_distilled.pth"
    torch.save({"model": m.state_dict(), "epoch": 300}, path)
    x = image(64)
    with torch.no_grad():
        tokens = m.forward_features(x)
        ref_cls_logits = m.head(tokens[:, 0])
    plain = check_identity(path, ref_cls_logits, x, fmt="deit")
    assert set(plain.dropped) == {"head_dist.weight", "head_dist.bias"}
    assert plain.spec.num_reg_tokens == 1  # the distillation token rides along as a prefix token
    model = hpvit.from_plain(plain, "identity").eval()
    with torch.no_grad():
        ours_tokens = model.forward_features(x)
    assert rel_err(ours_tokens, tokens) < TOL  # every token, including the distillation token, is exact
    check_paper_reuse(plain)


# ---------------------------------------------------------------- MAE
def _sincos_2d(dim: int, side: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding, with a zero row for the class token."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    gy, gx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    emb = torch.cat([one_d(dim // 2, gy), one_d(dim // 2, gx)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float().unsqueeze(0)


class MAEPretrain(nn.Module):
    """A module with the official MAE pre-training layout (facebookresearch/mae models_mae.py names),
    built from timm's PatchEmbed and Block like the original; forward_encoder does MAE's random masking."""

    def __init__(self, img=64, patch=16, dim=128, depth=4, heads=2, dec_dim=64, dec_depth=1, dec_heads=2):
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        side = img // patch
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(_sincos_2d(dim, side), requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(dim)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(_sincos_2d(dec_dim, side), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(dec_dim, dec_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                             for _ in range(dec_depth)])
        self.decoder_norm = norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch * patch * 3)

    def forward_encoder(self, x, mask_ratio):
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        b, n, d = x.shape
        keep = int(n * (1 - mask_ratio))
        order = torch.argsort(torch.rand(b, n), dim=1)
        x = torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, d))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def test_mae_pretrain_checkpoint(tmp_path):
    import argparse

    m = randomize(MAEPretrain())
    path = tmp_path / "mae_pretrain.pth"
    # what main_pretrain.py's save_model writes (the released files hold only "model")
    torch.save({"model": m.state_dict(), "epoch": 799, "args": argparse.Namespace(model="mae_vit_base_patch16")}, path)
    x = image(64)
    with torch.no_grad():
        latent = m.forward_encoder(x, mask_ratio=0.0)  # all patches kept (shuffled: attention does not care)
    plain = check_identity(path, latent[:, 0], x, fmt="mae")
    assert "mask_token" in plain.dropped and any(k.startswith("decoder_blocks.") for k in plain.dropped)
    assert not any(k.startswith("decoder") or k == "mask_token" for k in plain.state_dict)
    model = hpvit.from_plain(plain, "identity").eval()
    with torch.no_grad():  # the patch tokens agree too (as a set: MAE's masking shuffles them)
        ours = model.forward_features(x)[:, 1:].mean(1)
    assert rel_err(ours, latent[:, 1:].mean(1)) < TOL
    check_paper_reuse(plain)


def test_mae_finetuned_checkpoint(tmp_path):
    # MAE fine-tuning (models_vit.VisionTransformer, global_pool=True): timm ViT with fc_norm and no norm
    m = timm_vit(global_pool="avg", fc_norm=True)
    assert not any(k.startswith("norm.") for k in m.state_dict())
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": m.state_dict()}, path)
    x = image(64)
    with torch.no_grad():
        ref = m(x)
    plain = check_identity(path, ref, x, fmt="timm")
    assert plain.spec.final_norm == "fc_norm" and plain.spec.global_pool == "avg"


# ---------------------------------------------------------------- DINOv2 (official layout)
def _dinov2_official(m: nn.Module, registers: bool, chunks: int = 0) -> dict[str, torch.Tensor]:
    """The state dict facebookresearch/dinov2 would hold for timm model ``m`` (inverse of timm's conversion)."""
    sd = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("head.")}
    dim = sd["cls_token"].shape[-1]
    if registers:
        pos_cls = 0.05 * torch.randn(1, 1, dim, generator=torch.Generator().manual_seed(3))
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - pos_cls
        sd["pos_embed"] = torch.cat([pos_cls, sd["pos_embed"]], dim=1)
    sd["mask_token"] = torch.zeros(1, dim)
    if chunks:
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        per = depth // chunks
        sd = {(f"blocks.{int(k.split('.')[1]) // per}.{k.split('.', 1)[1]}" if k.startswith("blocks.") else k): v
              for k, v in sd.items()}
    return sd


@pytest.mark.parametrize("registers,chunks", [(False, 0), (True, 0), (True, 2)])
def test_dinov2_official(registers, chunks, tmp_path):
    from timm.models.vision_transformer import checkpoint_filter_fn

    kw = dict(patch_size=14, img_size=56, init_values=1e-1, num_classes=0)
    if registers:
        kw.update(reg_tokens=4, no_embed_class=True)
    m = timm_vit(**kw)
    official = _dinov2_official(m, registers, chunks)
    if not chunks:  # timm's own reading of the official layout gives back the model: the file is right
        back = checkpoint_filter_fn(dict(official), m)
        assert all(torch.allclose(back[k], v, atol=1e-6) for k, v in m.state_dict().items())
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)
    x = image(56)
    with torch.no_grad():
        ref = m(x)
    plain = check_identity(path, ref, x, fmt="dinov2")
    assert "mask_token" in plain.dropped and plain.spec.layerscale and plain.spec.patch_size == 14
    assert plain.spec.num_reg_tokens == (4 if registers else 0)
    check_paper_reuse(plain)


# ---------------------------------------------------------------- Hugging Face transformers
def _missing(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is None


needs_transformers = pytest.mark.skipif(_missing("transformers"), reason="transformers not installed (pip install 'hpvit[test]')")
needs_open_clip = pytest.mark.skipif(_missing("open_clip"), reason="open_clip not installed (pip install 'hpvit[test]')")

HF_COMMON = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=16)


def hf_model(cls_name: str, **kw):
    import transformers as T

    cfg_kw = dict(HF_COMMON, **kw)
    if cls_name.startswith("ViTMAE"):
        cfg = T.ViTMAEConfig(intermediate_size=256, mask_ratio=0.0, decoder_hidden_size=64,
                             decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=128,
                             **cfg_kw)
    elif cls_name == "Dinov2Model":
        cfg = T.Dinov2Config(mlp_ratio=2, layerscale_value=0.1, **dict(cfg_kw, patch_size=14, image_size=56))
    elif cls_name == "Dinov2WithRegistersModel":
        cfg = T.Dinov2WithRegistersConfig(mlp_ratio=2, layerscale_value=0.1, num_register_tokens=4,
                                          **dict(cfg_kw, patch_size=14, image_size=56))
    else:
        cfg = T.ViTConfig(intermediate_size=256, num_labels=7, **cfg_kw)
    torch.manual_seed(0)
    return randomize(getattr(T, cls_name)(cfg)), cfg


def hf_reference(m, x):
    name = type(m).__name__
    with torch.no_grad():
        if name == "ViTForImageClassification":
            return m(pixel_values=x).logits
        enc = m.vit if name == "ViTMAEForPreTraining" else m
        kw = {}
        if name.startswith("ViTMAE"):
            n = (x.shape[-1] // 16) ** 2
            kw["noise"] = torch.arange(n, dtype=x.dtype).expand(x.shape[0], n)  # no shuffling
        return enc(pixel_values=x, **kw).last_hidden_state[:, 0]


HF_CLASSES = ["ViTModel", "ViTForImageClassification", "ViTMAEModel", "ViTMAEForPreTraining", "Dinov2Model",
              "Dinov2WithRegistersModel"]


@needs_transformers
@pytest.mark.parametrize("save", ["folder", "bare_in_memory_names", "bare_on_disk_names"])
@pytest.mark.parametrize("cls_name", HF_CLASSES)
def test_hf(cls_name, save, tmp_path):
    m, cfg = hf_model(cls_name)
    x = image(cfg.image_size)
    ref = hf_reference(m, x)
    folder = tmp_path / "hf_model"
    m.save_pretrained(folder)
    if save == "folder":
        src = folder
    elif save == "bare_in_memory_names":  # transformers 5 names: layers.{i}.attention.q_proj, mlp.fc1
        src = tmp_path / "vit_state_dict.pth"
        torch.save(m.state_dict(), src)
        assert any(".q_proj." in k for k in m.state_dict())
    else:  # the on-disk (transformers 4) names, without config.json
        from safetensors.torch import load_file, save_file

        sd = load_file(folder / "model.safetensors")
        assert any(".attention.attention.query." in k for k in sd)
        src = tmp_path / "vit_on_disk_names.safetensors"
        save_file(sd, src)
    plain = check_identity(src, ref, x, fmt="hf")
    if cls_name.startswith("ViTMAE"):
        assert all(not k.startswith("decoder") for k in plain.state_dict)
    if "ForPreTraining" in cls_name:
        assert any(k.startswith("decoder.") for k in plain.dropped)
    if cls_name == "ViTModel":
        assert any("pooler" in k for k in plain.dropped)
    if save == "folder":
        check_paper_reuse(plain)


@needs_transformers
def test_hf_folder_config_is_read(tmp_path):
    """Heads, epsilon and activation come from config.json (none can be read from weights)."""
    m, cfg = hf_model("ViTForImageClassification", num_attention_heads=4, layer_norm_eps=1e-5,
                      hidden_act="gelu_pytorch_tanh")
    m.save_pretrained(tmp_path)
    x = image(64)
    plain = check_identity(tmp_path, hf_reference(m, x), x, fmt="hf")
    assert (plain.spec.num_heads, plain.spec.norm_eps, plain.spec.act) == (4, 1e-5, "gelu_tanh")


@needs_transformers
def test_hf_pytorch_model_bin_folder(tmp_path):
    m, cfg = hf_model("ViTForImageClassification")
    m.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "pytorch_model.bin")  # older transformers' default
    x = image(64)
    check_identity(tmp_path, hf_reference(m, x), x, fmt="hf")


# ---------------------------------------------------------------- CLIP (OpenAI / open_clip layout)
def clip_model(quick_gelu=True, ls=None):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    m = CLIP(embed_dim=96, vision_cfg=CLIPVisionCfg(layers=4, width=128, head_width=64, patch_size=16, image_size=64,
                                                     ls_init_value=ls),
             text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=64, heads=1, layers=1), quick_gelu=quick_gelu)
    return randomize(m)


@needs_open_clip
@pytest.mark.parametrize("save", ["full_bin_folder", "training_checkpoint", "visual_only_safetensors"])
def test_clip(save, tmp_path):
    m = clip_model()
    x = image(64)
    with torch.no_grad():
        ref = m.encode_image(x)
    sd = m.state_dict()
    if save == "full_bin_folder":  # the hub layout open_clip reads
        src = tmp_path / "clip"
        src.mkdir()
        torch.save(sd, src / "open_clip_pytorch_model.bin")
    elif save == "training_checkpoint":  # open_clip's training loop: DDP names under "state_dict"
        src = tmp_path / "epoch_32.pt"
        torch.save({"epoch": 32, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}, src)
    else:
        from safetensors.torch import save_file

        src = tmp_path / "visual.safetensors"
        save_file({k[len("visual."):]: v.contiguous() for k, v in sd.items() if k.startswith("visual.")}, src)
    plain = check_identity(src, ref, x, fmt="clip")
    assert plain.spec.act == "quick_gelu" and plain.spec.proj_dim == 96 and not plain.spec.patch_bias
    if save != "visual_only_safetensors":
        assert "token_embedding.weight" in plain.dropped and "logit_scale" in plain.dropped
    check_paper_reuse(plain)


@needs_open_clip
def test_clip_gelu_model_needs_override(tmp_path):
    m = clip_model(quick_gelu=False, ls=0.1)
    x = image(64)
    with torch.no_grad():
        ref = m.encode_image(x)
    path = tmp_path / "laion_clip.pt"
    torch.save(m.state_dict(), path)
    plain = check_identity(path, ref, x, fmt="clip", act="gelu")
    assert plain.spec.layerscale
    # the default (QuickGELU, OpenAI's activation) is measurably different for a GELU-trained model
    model = hpvit.from_plain(load_plain(path), "identity").eval()
    with torch.no_grad():
        assert rel_err(model(x), ref) > 1e-3


# ---------------------------------------------------------------- timm:<name>
def test_timm_hub_offline_names_local_alternative(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError) as e:
        load_plain("timm:vit_tiny_patch16_224")
    assert isinstance(e.value, ValueError)
    assert "local path" in str(e.value) and "vit_tiny_patch16_224" in str(e.value)


def test_timm_hub_unknown_model():
    with pytest.raises(CheckpointError, match="no model named"):
        load_plain("timm:not_a_vit_at_all_xyz")


# ---------------------------------------------------------------- validate_identity
@needs_transformers
@needs_open_clip
def test_validate_identity_per_library(tmp_path):
    """validate_identity (behind `hpvit convert --validate`) agrees with each peer on the formats it covers."""
    sources = {}
    m = timm_vit(depth=2, init_values=0.1)
    sources["timm"] = tmp_path / "timm.pth"
    torch.save({"model": m.state_dict()}, sources["timm"])
    mae = randomize(MAEPretrain(depth=2))
    sources["mae"] = tmp_path / "mae.pth"
    torch.save({"model": mae.state_dict()}, sources["mae"])
    hf, _ = hf_model("ViTForImageClassification", num_hidden_layers=2)
    sources["hf"] = tmp_path / "hf"
    hf.save_pretrained(sources["hf"])
    hf_mae, _ = hf_model("ViTMAEForPreTraining", num_hidden_layers=2)
    sources["hf-bare"] = tmp_path / "vitmae.pth"
    torch.save(hf_mae.state_dict(), sources["hf-bare"])
    sources["clip"] = tmp_path / "clip.pt"
    torch.save(clip_model().state_dict(), sources["clip"])
    from timm.models.deit import VisionTransformerDistilled

    deit = randomize(VisionTransformerDistilled(img_size=64, patch_size=16, embed_dim=128, depth=2, num_heads=2,
                                                num_classes=5))
    sources["deit"] = tmp_path / "deit.pth"
    torch.save({"model": deit.state_dict()}, sources["deit"])
    for name, src in sources.items():
        res = validate_identity(src)
        assert res["ok"] and res["max_rel_diff"] < TOL, (name, res)
    # for a folder, the reference follows config.json, so a wrong head-count override is caught
    bad = validate_identity(sources["hf"], plain=load_plain(sources["hf"], num_heads=4))
    assert not bad["ok"] and bad["max_rel_diff"] > 1e-3


@needs_open_clip
def test_validate_identity_missing_library(monkeypatch, tmp_path):
    import sys

    path = tmp_path / "clip.pt"
    torch.save(clip_model().state_dict(), path)
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed: importing it fails
    with pytest.raises(CheckpointError, match="open-clip-torch"):
        validate_identity(path)


def test_timm_hub_name_reads_instance_settings(monkeypatch):
    """timm:<name> takes heads, LayerNorm eps and activation from the timm instance (a CLIP-style ViT with
    QuickGELU, eps 1e-5, 4 heads of 32 dims here). The hub download is replaced by a local build."""
    m = randomize(timm.create_model("vit_base_patch32_clip_quickgelu_224", pretrained=False, img_size=64,
                                    embed_dim=128, depth=2, num_heads=4, num_classes=5))
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: m)
    x = image(64)
    with torch.no_grad():
        ref = m(x)
    plain = check_identity("timm:vit_base_patch32_clip_quickgelu_224", ref, x, fmt="timm")
    assert (plain.spec.num_heads, plain.spec.norm_eps, plain.spec.act) == (4, 1e-5, "quick_gelu")
