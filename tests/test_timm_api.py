"""The timm model contract, for every registered hpvit_* model and every preset (what timm's own
tests/test_models.py checks, kept here so CI keeps it), plus the fine-tuned-weights round trip through
timm's loaders (save_for_hf + local-dir:, pretrained_cfg_overlay file, hpvit.save / hpvit.load).

Contract tests run on ViT-Tiny (random weights, 64 px); the larger registered sizes are built on the meta
device (no memory) to check names, cfgs and metadata.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from helpers import randomize_new_params, random_timm_vit
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

import hpvit
from hpvit import CheckpointError, ConfigError
from hpvit.models.registry import ARCHS, FAMILY_SPECS, PLAIN_WEIGHTS

TINY = "hpvit_tiny_patch16_224"
PRESETS = ["paper-cls", "paper-det", "paper-seg", "fast-cls", "lite-cls", "identity", "paper-cls+join"]
X = 64  # input side for forward checks (stage maps 16, 8, 4, 2)


def _tiny(preset: str = "paper-cls", **kw) -> torch.nn.Module:
    """ViT-Tiny under ``preset``; ``+join`` keeps the class token (class_token='auto': token sequence output)."""
    torch.manual_seed(0)
    if preset.endswith("+join"):
        preset, kw = preset[: -len("+join")], dict(kw, class_token="auto")
    m = timm.create_model(TINY, hpvit_config=preset, **kw)
    randomize_new_params(m)
    return m.eval()


def _images(b: int = 2, side: int = X, c: int = 3) -> torch.Tensor:
    return torch.randn(b, c, side, side, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------ every registered name: cfgs, metadata
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_registered_model_metadata(arch):
    m = timm.create_model(arch, device="meta")
    assert m.pos_embed.device.type == "meta"
    dim = ARCHS[arch][0]
    assert m.num_features == dim and m.head_hidden_size == dim and m.num_classes == m.default_cfg["num_classes"]
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16, 32]
    assert all(f["num_chs"] == dim for f in m.feature_info)
    sd_keys = set(m.state_dict())
    assert m.default_cfg["first_conv"] + ".weight" in sd_keys
    if m.num_classes:
        assert m.default_cfg["classifier"] + ".weight" in sd_keys
    assert timm.list_pretrained(arch + ".*") == sorted(f"{arch}.{t}" for t in PLAIN_WEIGHTS[arch])


@pytest.mark.parametrize("name", [f"{a}.{t}" for a, tags in PLAIN_WEIGHTS.items() for t in tags])
def test_pretrained_tag_data_config_matches_source(name):
    """Each tag's mean/std/crop/interpolation are those timm gives the plain weights it names."""
    arch, tag = name.split(".")
    ours, src = get_pretrained_cfg(name), get_pretrained_cfg(PLAIN_WEIGHTS[arch][tag])
    for field in ("mean", "std", "crop_pct", "interpolation", "num_classes", "hf_hub_id"):
        assert getattr(ours, field) == getattr(src, field), field
    assert ours.pool_size == (7, 7) and ours.input_size == (3, 224, 224)


# ------------------------------------------------------------------ every preset: the forward contract
@pytest.mark.parametrize("preset", PRESETS)
def test_forward_contract(preset):
    m = _tiny(preset, num_classes=7)
    x = _images()
    with torch.no_grad():
        logits = m(x)
        feats = m.forward_features(x)
        pre = m.forward_head(feats, pre_logits=True)
    assert logits.shape == (2, 7)
    assert pre.shape == (2, m.head_hidden_size)
    if m.output_fmt == "NHWC":
        side = X // m.strides[-1]
        assert feats.shape == (2, side, side, m.num_features)
    else:  # identity / a joined class token: the token sequence, prefix first
        assert m.output_fmt == "NLC" and feats.ndim == 3 and feats.shape[-1] == m.num_features
        assert m.cls_token is not None and preset in ("identity", "paper-cls+join")
    m.reset_classifier(0)
    with torch.no_grad():
        assert torch.allclose(m(x), pre, atol=1e-6)
    m.reset_classifier(0, "")
    with torch.no_grad():
        assert torch.equal(m(x), feats)
    m.reset_classifier(3, "avg")
    assert m(x).shape == (2, 3)


@pytest.mark.parametrize("preset", PRESETS)
def test_forward_intermediates_contract(preset):
    m = _tiny(preset)
    x = _images(1)
    n = len(m.feature_info)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert torch.allclose(final, m.forward_features(x), atol=1e-5)
    assert len(inter) == n
    for f, t in zip(m.feature_info, inter):
        assert t.shape[:2] == (1, f["num_chs"])
        assert t.shape[-1] <= math.ceil(X / f["reduction"]) + 1
    with torch.no_grad():
        last = m.forward_intermediates(x, indices=[-1], intermediates_only=True)
    assert torch.equal(last[0], inter[-1])
    for bad in ([n], [-n - 1], n + 1, 0):
        with pytest.raises(ConfigError, match="stage"):
            m.forward_intermediates(x, indices=bad)


@pytest.mark.parametrize("preset", ["paper-det", "paper-cls+join"])
def test_backward_reaches_every_parameter(preset):
    m = _tiny(preset, num_classes=5, drop_rate=0.1, drop_path_rate=0.1).train()
    m.set_grad_checkpointing(True)
    m(_images(2, 32)).mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("preset", ["paper-seg", "paper-cls+join"])
def test_fx_trace_matches_eager(preset):
    """timm's FX path (its tracer, leaf modules and feature extraction), as tests/test_models.py runs it."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    m = _tiny(preset)
    x = _images(1)
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(m, tracer_kwargs=kw)
    fx = create_feature_extractor(m, return_nodes=[eval_nodes[-1]], tracer_kwargs=kw)
    with torch.no_grad():
        assert torch.allclose(next(iter(fx(x).values())), m(x), atol=1e-5)
    fx.train()
    assert next(iter(fx(_images()).values())).requires_grad


@pytest.mark.parametrize("feature_cls", ["getter", "hook", "fx"])
def test_features_only_variants_agree(feature_cls):
    """timm's three feature extractors give the stage maps forward_intermediates gives (hook / fx: NHWC)."""
    torch.manual_seed(0)
    net = timm.create_model(TINY, features_only=True, feature_cls=feature_cls).eval()
    ref = timm.create_model(TINY).eval()
    sd = {k.split(".", 1)[1]: v for k, v in net.state_dict().items()}  # drop the wrapper's prefix
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith(("head.", "norm.", "fc_norm.")) for k in missing)  # fx: up to blocks.11
    x = _images(1)
    with torch.no_grad():
        outs = net(x)
        want = ref.forward_intermediates(x, intermediates_only=True)
    fmt = "NCHW" if feature_cls == "getter" else net.output_fmt
    assert len(outs) == 4 and fmt in ("NCHW", "NHWC")
    for o, w in zip(outs, want):
        o = o.permute(0, 3, 1, 2) if fmt == "NHWC" else o
        assert o.shape == w.shape and torch.allclose(o, w, atol=1e-5)


def test_forward_hooks_on_blocks_fire_with_stage_maps():
    m = _tiny()
    seen = {}
    ends = [int(f["module"].split(".")[1]) for f in m.feature_info]
    handles = [m.blocks[i].register_forward_hook(lambda mod, a, out, i=i: seen.__setitem__(i, out)) for i in ends]
    x = _images(1)
    with torch.no_grad():
        y = m(x)
        want = m.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
    for h in handles:
        h.remove()
    assert sorted(seen) == ends
    for i, w in zip(ends, want):
        assert torch.allclose(seen[i], w, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(m(x), y, atol=1e-5)  # fast path again, same output


def test_torchscript_gives_a_clear_error():
    with pytest.raises(ConfigError, match="TorchScript"):
        torch.jit.script(_tiny())


# ------------------------------------------------------------------ keywords timm and its scripts pass
def test_train_script_keywords_are_accepted():
    m = timm.create_model(TINY, pretrained=False, in_chans=3, num_classes=4, drop_rate=0.2, drop_path_rate=0.1,
                          drop_block_rate=None, global_pool="avg", bn_momentum=None, bn_eps=None,
                          attn_drop_rate=0.0, proj_drop_rate=0.1)
    assert m.head_drop.p == 0.2 and m.blocks[-1].drop_path1.p == pytest.approx(0.1)
    assert m.blocks[0].mlp.drop.p == 0.1
    m = timm.create_model(TINY, num_classes=0, global_pool="")
    with torch.no_grad():
        assert m.eval()(_images(1)).shape == (1, 2, 2, 192)
    m = timm.create_model(TINY, dtype=torch.bfloat16, device="cpu")
    assert m.pos_embed.dtype == torch.bfloat16


def test_wrong_keyword_names_the_right_one():
    with pytest.raises(ConfigError, match="hpvit_config='paper-det'"):
        timm.create_model(TINY, config="paper-det")
    with pytest.raises(ConfigError, match="rel_pos"):
        timm.create_model(TINY, rel_poss=False)
    m = timm.create_model(TINY, rel_pos=False)
    assert m.blocks[0].attn.rel_pos_table is None


def test_dense_preset_is_a_classifier_with_a_pyramid():
    m = _tiny("paper-det", num_classes=3)
    x = _images(1)
    with torch.no_grad():
        assert m(x).shape == (1, 3)
        assert [t.shape[-1] for t in m.forward_pyramid(x)] == [16, 8, 4, 2]
    assert m.layout.windows == hpvit.get_config("paper-det").resolve(12).windows


# ------------------------------------------------------------------ weights round trips
@pytest.fixture(scope="module")
def plain_tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("plain") / "vit_tiny.pth"
    torch.save(random_timm_vit(0).state_dict(), p)
    return p


def _finetuned(plain_path, num_classes: int = 6):
    """A 'fine-tuned' model: DeiT-style plain weights (tag deit_in1k), then new values everywhere else."""
    m = timm.create_model(TINY + ".deit_in1k", pretrained=True, num_classes=num_classes,
                          pretrained_cfg_overlay=dict(file=str(plain_path)))
    randomize_new_params(m)
    with torch.no_grad():
        m.head.weight.normal_(0, 0.1)
    return m.eval()


def test_plain_file_converts_like_from_plain(plain_tiny):
    m = _finetuned(plain_tiny, num_classes=1000)
    cfg = hpvit.get_config("paper-cls").replace(class_token="drop")  # timm models drop the class token by default
    ref = hpvit.from_plain(str(plain_tiny), config=cfg, num_classes=1000).eval()
    for k, v in ref.state_dict().items():
        if ".downsample." not in k and not k.endswith("rel_pos_table") and not k.startswith("head."):
            assert torch.equal(m.state_dict()[k], v), k
    assert m.reuse_report().encoder_fully_reused(hpvit.load_plain(str(plain_tiny)))


def test_save_for_hf_local_dir_round_trip(plain_tiny, tmp_path):
    m = _finetuned(plain_tiny)
    timm.models.save_for_hf(m, tmp_path / "hf")
    back = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    x = _images()
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    cfg = resolve_data_config({}, model=back)  # the DeiT source's ImageNet statistics survive the round trip
    assert tuple(cfg["mean"]) == get_pretrained_cfg("deit_tiny_patch16_224.fb_in1k").mean


def test_hpvit_save_file_loads_through_timm_and_hpvit(plain_tiny, tmp_path):
    m = _finetuned(plain_tiny)
    f = tmp_path / "ft.safetensors"
    hpvit.save(m, f)
    x = _images()
    # num_classes in the overlay: the file's head has 6 classes (else timm drops it as for any model)
    via_timm = timm.create_model(TINY + ".deit_in1k", pretrained=True, num_classes=6,
                                 pretrained_cfg_overlay=dict(file=str(f), num_classes=6)).eval()
    via_hpvit = hpvit.load(f).eval()
    with torch.no_grad():
        want = m(x)
        assert torch.equal(via_timm(x), want)
        assert torch.equal(via_hpvit(x), want)
    assert resolve_data_config({}, model=via_timm)["mean"] == (0.485, 0.456, 0.406)  # DeiT: ImageNet statistics
    one = timm.create_model(TINY, pretrained=True, num_classes=6, in_chans=1,
                            pretrained_cfg_overlay=dict(file=str(f), num_classes=6)).eval()
    with torch.no_grad():
        assert one(_images(c=1)).shape == (2, 6)
    w = m.patch_embed.proj.weight.sum(1, keepdim=True)
    assert torch.allclose(one.patch_embed.proj.weight, w, atol=1e-6)


def test_in_chans_1_from_plain_weights(plain_tiny):
    m = timm.create_model(TINY, pretrained=True, in_chans=1, num_classes=2,
                          pretrained_cfg_overlay=dict(file=str(plain_tiny)))
    src = torch.load(plain_tiny)["patch_embed.proj.weight"]
    assert torch.allclose(m.patch_embed.proj.weight, src.sum(1, keepdim=True), atol=1e-6)


def test_hpvit_weights_of_another_config_are_refused(plain_tiny, tmp_path):
    det = timm.create_model(TINY, hpvit_config="fast-cls", num_classes=6)
    f = tmp_path / "fast.safetensors"
    hpvit.save(det, f)
    with pytest.raises(CheckpointError, match="hpvit_config"):
        timm.create_model(TINY, pretrained=True, num_classes=6, pretrained_cfg_overlay=dict(file=str(f)))
    ok = timm.create_model(TINY, hpvit_config="fast-cls", pretrained=True, num_classes=6,
                           pretrained_cfg_overlay=dict(file=str(f)))
    assert ok.layout.depths == det.layout.depths


def test_clip_family_builds_the_clip_tower():
    m = timm.create_model("hpvit_base_patch16_224.clip_openai", device="meta")
    assert m.spec.norm_pre and m.spec.act == "quick_gelu" and not m.spec.patch_bias
    assert set(FAMILY_SPECS) <= {t for tags in PLAIN_WEIGHTS.values() for t in tags}
