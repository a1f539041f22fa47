"""Hierarchical model: shapes, re-parameterisation, padding, gradients, save/load, timm integration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hpvit
from hpvit.config import detection_global_blocks, default_depth_split
from hpvit.errors import ConfigError, InputError
from hpvit.layers import Attention, Downsample
from helpers import randomize_new_params, random_timm_vit, rel_err

HIER_PRESETS = ["paper-cls", "paper-det", "paper-seg"]


def tiny_plain(depth: int = 4, dim: int = 64, seed: int = 0):
    ref = random_timm_vit(seed=seed, name="vit_tiny_patch16_224", embed_dim=dim, depth=depth, num_heads=2, num_classes=7)
    return ref.state_dict()


@pytest.fixture(scope="module")
def sd4():
    return tiny_plain()


@pytest.mark.parametrize("preset", HIER_PRESETS)
@pytest.mark.parametrize("hw", [(224, 224), (250, 333), (32, 32), (64, 96)])
def test_pyramid_shapes(sd4, preset, hw):
    m = hpvit.from_plain(sd4, config=preset, num_classes=5).eval()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        maps = m.forward_pyramid(x)
    assert len(maps) == 4 and m.strides == [4, 8, 16, 32]
    h, w = hw[0] // 4, hw[1] // 4
    for fm in maps:
        assert fm.shape == (1, 64, h, w)
        h, w = (h + 1) // 2, (w + 1) // 2
    if preset == "paper-cls":
        assert m(x).shape == (1, 5)


def test_min_input_and_channel_errors(sd4):
    m = hpvit.from_plain(sd4, "paper-cls").eval()
    with pytest.raises(InputError, match="smaller than the minimum 32x32"):
        m(torch.randn(1, 3, 31, 64))
    with pytest.raises(InputError, match="3 input channels"):
        m(torch.randn(1, 1, 64, 64))
    with pytest.raises(InputError, match=r"\(B, C, H, W\)"):
        m(torch.randn(3, 64, 64))


def test_fresh_model_pools_like_average_pooling(sd4):
    """A freshly transformed model (zero convs) equals the avg-pool-only model exactly."""
    a = hpvit.from_plain(sd4, "paper-cls").eval()
    b = hpvit.from_plain(sd4, "paper-cls", pools=("avg", "avg", "avg")).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        for fa, fb in zip(a.forward_pyramid(x), b.forward_pyramid(x)):
            assert torch.equal(fa, fb)


@pytest.mark.parametrize("pool_conv", ["depthwise", "full"])
@pytest.mark.parametrize("hw", [(224, 224), (250, 333)])
def test_reparameterize_exact(sd4, pool_conv, hw):
    m = hpvit.from_plain(sd4, "paper-cls", pool_conv=pool_conv).eval()
    randomize_new_params(m)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        before = m.forward_pyramid(x)
        logits = m(x)
        m.reparameterize()
        after = m.forward_pyramid(x)
        logits2 = m(x)
    assert all(blk.downsample is None or blk.downsample.kind == "conv" for blk in m.blocks)
    for a, b in zip(after, before):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(logits2, logits) <= 1e-5
    assert m.config.reparameterized


def test_reparameterize_real_images(deit_tiny_path):
    from conftest import shared_path
    from PIL import Image
    from torchvision import transforms as T

    files = sorted((shared_path("imagenet_sample") / "images").iterdir())[:4]
    tf = T.Compose([T.Resize((250, 333)), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    m = hpvit.from_plain(deit_tiny_path, "paper-cls").eval()
    randomize_new_params(m)
    with torch.no_grad():
        before = m(x)
        after = m.reparameterize()(x)
    assert rel_err(after, before) <= 1e-5


@pytest.mark.parametrize("hw", [(7, 7), (8, 9), (13, 6)])
def test_avgpool_border_equals_conv(hw):
    """count_include_pad=True makes the 3x3/2 average pool a conv with weight 1/9 at every border;
    count_include_pad=False would not (which is why the merge relies on the former)."""
    x = torch.randn(1, 4, *hw)
    w = torch.full((4, 1, 3, 3), 1 / 9)
    conv = F.conv2d(x, w, stride=2, padding=1, groups=4)
    inc = F.avg_pool2d(x, 3, 2, 1, count_include_pad=True)
    exc = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    assert torch.allclose(inc, conv, atol=1e-6)
    assert not torch.allclose(exc, conv, atol=1e-3)
    d = Downsample("avgconv", 4, "full")
    torch.nn.init.normal_(d.conv.weight, std=0.1)
    y0 = d(x.permute(0, 2, 3, 1))
    d.reparameterize()
    assert torch.allclose(d(x.permute(0, 2, 3, 1)), y0, atol=1e-6)


@pytest.mark.parametrize("hw", [(9, 10), (7, 7), (15, 8)])
def test_window_padding_is_masked_not_cropped(hw):
    """Window attention over a padded map equals global attention restricted to each window's real tokens."""
    torch.manual_seed(0)
    win = Attention(32, 4, window_size=7, rel_pos=True).eval()
    glob = Attention(32, 4, window_size=None).eval()
    glob.load_state_dict({k: v for k, v in win.state_dict().items() if k != "rel_pos_table"})
    x = torch.randn(2, *hw, 32)
    with torch.no_grad():
        out = win(x)
        assert out.shape == x.shape
        ref = torch.empty_like(x)
        for r in range(0, hw[0], 7):
            for c in range(0, hw[1], 7):
                ref[:, r:r + 7, c:c + 7] = glob(x[:, r:r + 7, c:c + 7].contiguous())
    assert (out - ref).abs().max().item() < 1e-5


def test_rel_pos_bias_changes_window_attention():
    torch.manual_seed(0)
    a = Attention(32, 4, window_size=7).eval()
    x = torch.randn(1, 14, 14, 32)
    with torch.no_grad():
        y0 = a(x)
        a.rel_pos_table.normal_()
        y1 = a(x)
        a.fused = False
        y2 = a(x)
    assert not torch.allclose(y0, y1)
    assert torch.allclose(y1, y2, atol=1e-5)  # fused SDPA with the bias as mask == explicit softmax


def test_gradients_reach_every_new_parameter(sd4):
    m = hpvit.from_plain(sd4, "paper-cls", num_classes=3).train()
    x = torch.randn(2, 3, 64, 64)
    F.cross_entropy(m(x), torch.tensor([0, 2])).backward()
    new = set(m.reuse_report().new)
    assert any(k.endswith("rel_pos_table") for k in new) and any(".downsample." in k for k in new)
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        if n in new:
            assert p.grad.abs().sum() > 0, f"no gradient reaches new parameter {n}"


def test_grad_checkpointing_same_gradients(sd4):
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # same fresh head in both models
        m = hpvit.from_plain(sd4, "paper-cls", num_classes=3).train()
        m.set_grad_checkpointing(ckpt)
        m(x).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_reuse_report_every_encoder_tensor(sd4):
    plain = hpvit.load_plain(sd4)
    for preset in HIER_PRESETS:
        m = hpvit.from_plain(plain, preset)
        rep = m.reuse_report()
        assert rep.encoder_fully_reused(plain), preset
        # the class token is kept where the layout lets it join (class_token='auto'), else reported dropped
        assert ("cls_token" in rep.reused_keys) == m.join and ("cls_token" in rep.dropped) != m.join, preset
        for k in rep.new:
            assert k.endswith("rel_pos_table") or ".downsample." in k or k.startswith("head"), k


def test_save_load_roundtrip(tmp_path, sd4):
    m = hpvit.from_plain(sd4, "paper-seg", drop_path_rate=0.1).eval()
    randomize_new_params(m)
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        want = m(x)
    hpvit.save(m, tmp_path / "m.safetensors")
    m2 = hpvit.load(tmp_path / "m.safetensors").eval()
    assert m2.config == m.config
    with torch.no_grad():
        got = m2(x)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    m.reparameterize()
    hpvit.save(m, tmp_path / "r.safetensors")
    m3 = hpvit.load(tmp_path / "r.safetensors").eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(m3(x), m(x)))
    with pytest.raises(FileExistsError, match="--overwrite"):
        hpvit.save(m, tmp_path / "r.safetensors", force=False)


def test_load_rejects_plain_file(tmp_path, sd4):
    from safetensors.torch import save_file

    save_file(sd4, str(tmp_path / "plain.safetensors"))
    with pytest.raises(hpvit.CheckpointError, match="from_plain"):
        hpvit.load(tmp_path / "plain.safetensors")


def test_torch_compile_forward(sd4):
    m = hpvit.from_plain(tiny_plain(depth=4, dim=32), "paper-cls", num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(cm(x), m(x), atol=1e-5)


def test_presets_layout():
    assert default_depth_split(12) == (2, 2, 6, 2)
    assert default_depth_split(24) == (2, 2, 18, 2)
    assert default_depth_split(32) == (2, 2, 26, 2)
    assert detection_global_blocks(12) == (5, 8, 11)
    lay = hpvit.get_config("paper-det").resolve(12)
    assert [i for i, w in enumerate(lay.windows) if w is None] == [5, 8, 11]
    assert lay.stage_ends == (1, 3, 9, 11)  # features after blocks 2, 4, 10, 12
    assert hpvit.get_config("paper-seg").pools[-1] == "max"
    lay = hpvit.get_config("paper-cls").resolve(12)
    assert lay.windows == (7,) * 4 + (None,) * 8


@pytest.mark.parametrize(
    "overrides, msg",
    [
        (dict(depths=(2, 2, 2, 2)), "sum to 8 blocks"),
        (dict(pools=("avg", "bogus", "avg")), "unknown pool kind"),
        (dict(window_sizes=(7, 7)), "one per stage"),
        (dict(head="cls"), "unknown head"),
    ],
)
def test_config_errors(sd4, overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        hpvit.from_plain(tiny_plain(depth=12, dim=32), "paper-cls", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown config preset"):
        hpvit.get_config("paper-xyz")
    with pytest.raises(ConfigError, match="unknown config field"):
        hpvit.get_config("paper-cls", window=3)


def test_timm_api(sd4):
    m = hpvit.from_plain(sd4, "paper-cls", num_classes=4)
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16, 32]
    nwd = m.no_weight_decay()
    assert "pos_embed" in nwd and any(n.endswith("rel_pos_table") for n in nwd)
    from timm.models import group_parameters

    groups = group_parameters(m, m.group_matcher())
    where = {n: gid for gid, names in groups.items() for n in names}
    assert where["patch_embed.proj.weight"] == where["pos_embed"] == 0
    assert where["blocks.2.downsample.conv.weight"] == where["blocks.2.attn.qkv.weight"] == 3
    assert where["blocks.0.attn.rel_pos_table"] == 1
    assert where["head.weight"] > where["blocks.3.mlp.fc2.weight"]
    x = torch.randn(1, 3, 64, 64)
    final, inter = m.forward_intermediates(x, indices=[1, 3])
    assert [t.shape[-1] for t in inter] == [8, 2]
    assert final.shape == ((1, 1 + 2 * 2, 64) if m.join else (1, 2, 2, 64))  # joined class token: a sequence
    m.reset_classifier(0)
    assert m(x).shape == (1, 64)


def test_timm_create_model_from_plain_file(tmp_path, sd4):
    import timm

    ref = random_timm_vit(name="vit_tiny_patch16_224", depth=12)
    torch.save({"model": ref.state_dict()}, tmp_path / "plain_vit.pth")
    m = timm.create_model("hpvit_tiny_patch16_224", pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "plain_vit.pth"), num_classes=1000)).eval()
    # timm-created models drop the class token (timm's spatial forward_features contract, docs/timm.md)
    want = hpvit.from_plain(tmp_path / "plain_vit.pth", "paper-cls", num_classes=10, class_token="drop").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = m.forward_features(x)
        b = want.forward_features(x)
    assert torch.equal(a, b)
    assert m.reuse_report().encoder_fully_reused(hpvit.load_plain(tmp_path / "plain_vit.pth"))
    feats = timm.create_model("hpvit_tiny_patch16_224", features_only=True)(x)
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]


def test_timm_hub_offline_error(monkeypatch):
    import huggingface_hub.constants as hc
    import timm

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(hpvit.OfflineError, match="pretrained_cfg_overlay=dict\\(file="):
        timm.create_model("hpvit_base_patch16_224.mae", pretrained=True)
    with pytest.raises(hpvit.OfflineError, match="local path"):
        hpvit.load_plain("timm:vit_base_patch16_224.mae")


def test_small_maps_do_not_run_mlps_on_window_padding(sd4):
    """At 64 px the 16x16 stage-1 map would pad to 21x21 windows: the MLPs must still only see the
    16x16 real tokens, so the cost stays close to the unpadded 56 px model's (scaled by token count)."""
    from hpvit.utils import count_flops

    m = hpvit.from_plain(tiny_plain(depth=4, dim=64), "paper-cls", class_token="drop").eval()
    f56 = count_flops(m, torch.zeros(1, 3, 56, 56))
    f64 = count_flops(m, torch.zeros(1, 3, 64, 64))
    # tokens grow by (16*16)/(14*14) = 1.31; padded MLPs would make it (21*21)/(14*14) = 2.25
    assert f64 / f56 < 1.6
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        t = m.embed(x)
        for blk in m.blocks:
            t = blk(t)
        assert torch.allclose(m(x), m.forward_head(m.norm(t)), atol=1e-5)


@pytest.fixture(scope="module")
def timm6():
    """A random 6-block, 128-wide timm ViT (2 heads of 64, as load_plain infers) at 64 px (enough blocks for every
    split), in eval mode."""
    return random_timm_vit(seed=3, embed_dim=128, depth=6, num_heads=2, num_classes=7, img_size=64)


@pytest.mark.parametrize("preset", sorted(hpvit.config.PRESETS))
def test_a_model_built_inside_inference_mode_runs_as_timms_does(timm6, preset):
    """Issue 29 defect 2: built inside torch.inference_mode() (inference tensors have no version counter, which
    the position-embedding cache read), a model raised at its first call. timm's ViT builds and runs there: so
    must every preset, with the output it gives outside (identity: timm's own logits), on repeated calls."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    sd = timm6.state_dict()
    with torch.no_grad():
        want = hpvit.from_plain(sd, config=preset).eval()(x)
    with torch.inference_mode():
        ref = timm6(x)
        m = hpvit.from_plain(sd, config=preset).eval()
        assert m.patch_embed.proj.weight.is_inference()
        got = [m(x) for _ in range(2)]
    for g in got:
        for a, b in zip(g if isinstance(g, list) else [g], want if isinstance(want, list) else [want]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if preset == "identity":
        torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-5)
