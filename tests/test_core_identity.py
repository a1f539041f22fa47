"""The identity config must reproduce timm's own ViT forward: proof that every weight is wired right."""

from __future__ import annotations

import pytest
import torch

import hpvit
from helpers import random_timm_vit, rel_err

VARIANTS = {
    "vit_s16_cls": dict(name="vit_small_patch16_224"),
    "vit_b16_cls": dict(name="vit_base_patch16_224"),
    "vit_s16_no_cls_gap": dict(name="vit_small_patch16_224", class_token=False, global_pool="avg"),
    "vit_b16_no_cls_gap": dict(name="vit_base_patch16_224", class_token=False, global_pool="avg"),
    "vit_s16_layerscale": dict(name="vit_small_patch16_224", init_values=1e-5),
    "vit_b16_layerscale_gap": dict(name="vit_base_patch16_224", init_values=1e-5, global_pool="avg"),
    "vit_s16_gap_fcnorm": dict(name="vit_small_patch16_224", global_pool="avg", fc_norm=True),
    "vit_t16_reg4_no_embed_class": dict(name="vit_tiny_patch16_224", reg_tokens=4, no_embed_class=True),
    "vit_t16_reg2_embed_class": dict(name="vit_tiny_patch16_224", reg_tokens=2),
    "vit_t16_prenorm_noqkvbias": dict(name="vit_tiny_patch16_224", pre_norm=True, qkv_bias=False),
    "vit_t16_qknorm": dict(name="vit_tiny_patch16_224", qk_norm=True),
    "vit_t8_grid": dict(name="vit_tiny_patch16_224", patch_size=8, img_size=96),
    "vit_t32": dict(name="vit_tiny_patch16_224", patch_size=32, img_size=224),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_identity_matches_timm(variant):
    kw = dict(VARIANTS[variant])
    if variant != "vit_b16_cls":  # one full-depth ViT-B; the other variants keep widths but use 4 blocks
        kw.setdefault("depth", 4)
    ref = random_timm_vit(**kw)
    img = kw.get("img_size", 224)
    x = torch.randn(1 if "base" in kw["name"] else 2, 3, img, img)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    model = hpvit.from_plain(sd, config="identity").eval()
    with torch.no_grad():
        want_f, want = ref.forward_features(x), ref(x)
        got_f, got = model.forward_features(x), model(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4, variant
    assert rel_err(got, want) <= 1e-4
    assert (got_f - want_f).abs().max().item() <= 1e-4
    # the source state dict was not modified
    for k, v in ref.state_dict().items():
        assert torch.equal(v, sd[k])


def test_identity_spec_inference():
    ref = random_timm_vit(name="vit_small_patch16_224", reg_tokens=4, no_embed_class=True, init_values=1e-5)
    plain = hpvit.load_plain(ref.state_dict())
    s = plain.spec
    assert (s.embed_dim, s.depth, s.num_heads, s.patch_size) == (384, 12, 6, 16)
    assert s.layerscale and s.class_token and s.num_reg_tokens == 4 and s.no_embed_class
    assert s.pos_grid == (14, 14) and s.num_classes == 1000 and s.global_pool == "token"


def _load_imagenet_sample(root):
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([
        T.Resize(248, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    rows = [line.split("\t") for line in (root / "labels.tsv").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if not r[0].startswith("#") and r[1].strip().lstrip("-").isdigit()]
    imgs = torch.stack([tf(Image.open(root / "images" / r[0]).convert("RGB")) for r in rows])
    labels = torch.tensor([int(r[1]) for r in rows])
    return imgs, labels


def test_identity_real_deit_tiny_imagenet(deit_tiny_path):
    """Real pretrained DeiT-Tiny over the 100 ImageNet images: same logits as timm, same top-1."""
    import timm

    from conftest import shared_path

    root = shared_path("imagenet_sample")
    imgs, labels = _load_imagenet_sample(root)
    assert len(labels) == 100
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    ref.load_state_dict(torch.load(deit_tiny_path, map_location="cpu", weights_only=True))
    ref.eval()
    model = hpvit.from_plain(deit_tiny_path, config="identity").eval()
    with torch.no_grad():
        want = torch.cat([ref(b) for b in imgs.split(25)])
        got = torch.cat([model(b) for b in imgs.split(25)])
    assert (got - want).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(1), want.argmax(1))
    top1 = (got.argmax(1) == labels).float().mean().item()
    print(f"\nDeiT-Tiny identity top-1 on the 100-image ImageNet sample: {top1 * 100:.1f}% (timm: "
          f"{(want.argmax(1) == labels).float().mean().item() * 100:.1f}%)")
    assert top1 > 0.6  # a real pretrained model, not noise
