"""The grid-* presets (issue 19): phase attention, phase-aligned pools and the class token in every block.

The peer is timm's own plain ViT: with a 16x16 kernel at stride 4 and padding 6, the tokens of one phase
are the plain model's tokens of the image shifted by 6 pixels, so at initialisation the 1/16 stage must
reproduce timm's blocks on that shifted image, and a 3-stage grid model the whole plain model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path
from helpers import randomize_new_params, random_timm_vit

import hpvit
from hpvit import ConfigError, HPViTConfig
from hpvit.layers import Downsample, phase_partition, phase_unpartition

SIDE = 64  # stage maps 16, 8, 4, 2; every phase grid is the plain 4x4 token grid


def _vit(class_token: bool = True, seed: int = 0):
    """A random 8-block, 128-wide timm ViT (patch 16, 2 heads of 64) at SIDE px: 2-2-2-2 under the paper split."""
    kw = {} if class_token else dict(class_token=False, global_pool="avg")
    m = random_timm_vit(seed, img_size=SIDE, num_classes=7, depth=8, embed_dim=128, num_heads=2, **kw)
    with torch.no_grad():  # large position/class embeddings: a wrong phase or shift cannot hide
        m.pos_embed.normal_(std=0.5)
        if class_token:
            m.cls_token.normal_(std=0.5)
    return m


def _shifted(x: torch.Tensor, pad: int = 6) -> torch.Tensor:
    """The image the surviving phase sees: shifted right/down by ``pad`` pixels (zeros enter; a negative
    ``pad`` shifts left/up), the same size."""
    return F.pad(x, (pad, -pad, pad, -pad))


def _timm_tokens(m, x: torch.Tensor, blocks: int) -> torch.Tensor:
    t = m.norm_pre(m._pos_embed(m.patch_embed(x)))
    for blk in m.blocks[:blocks]:
        t = blk(t)
    return t


def _images(b: int = 2, side: int = SIDE) -> torch.Tensor:
    return torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("preset,pool", [("grid-cls", "sub"), ("grid-fast-cls", "sub"), ("grid-lite-cls", "sub"),
                                         ("grid-seg", "sub"), ("grid-cls", "subavg"), ("grid-cls", "subgconv"),
                                         ("grid-seg", "subavg"), ("grid-seg", "subgconv")])
def test_the_1_16_stage_is_timms_plain_vit_on_the_shifted_image(preset, pool):
    """Also with the mixing options of issue 27 (gated pools, exact at initialisation)."""
    cls = preset != "grid-seg"
    m = _vit(class_token=cls)
    model = hpvit.from_plain(hpvit.load_plain(m.state_dict()), config=preset, pools=(pool,) * 3).eval()
    end = model.layout.stage_ends[2] + 1  # blocks up to the end of the 1/16 stage
    x = _images()
    with torch.no_grad():
        t = _timm_tokens(m, _shifted(x, 6 - 4 * model.config.sub_phase), end)[:, 1 if cls else 0:]
        want = t.reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
        got = model.forward_intermediates(x, intermediates_only=True)[2]
        model.force_plain_calls = True  # the graph-capture path (export, torch.fx, hooks)
        calls = model.forward_intermediates(x, intermediates_only=True)[2]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(calls, want, atol=1e-4, rtol=1e-4)
    if preset == "grid-cls":  # the paper's layout does not keep the function: the test can tell
        paper = hpvit.from_plain(hpvit.load_plain(m.state_dict()), config="paper-cls").eval()
        with torch.no_grad():
            assert (paper.forward_intermediates(x, intermediates_only=True)[2] - want).abs().max() > 0.1


@pytest.mark.parametrize("sub_phase", [0, 1, 2, 3])
def test_a_grid_model_without_a_1_32_stage_reproduces_timms_logits(sub_phase):
    """Blocks 1-2 at 1/4, 3-4 at 1/8 (phase attention, a class-token copy per phase), 5-8 at 1/16: the
    hierarchical model's logits are timm's logits on the image shifted by 6 - 4 * sub_phase pixels (the
    phase the pools keep), in eval and in training mode."""
    m = _vit()
    cfg = hpvit.get_config("grid-cls", depths=(2, 2, 4), num_stages=3, window_sizes=(None, None, None),
                           pools=("subconv", "subconv"), sub_phase=sub_phase)
    model = hpvit.from_plain(hpvit.load_plain(m.state_dict()), config=cfg)
    x = _images()
    with torch.no_grad():
        want = m(_shifted(x, 6 - 4 * sub_phase))
        torch.testing.assert_close(model.eval()(x), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.train()(x), want, atol=1e-4, rtol=1e-4)  # no drop path: same function
        assert (m(x) - want).abs().max() > 1e-2  # the shift matters: comparing unshifted would fail


def test_mean_merge_averages_the_class_token_copies_of_the_merging_phases():
    """prefix_merge='mean': 1/8 phase (a, c) gets the mean of the copies of 1/4 phases (2a..2a+1, 2c..2c+1);
    'keep' the copy of phase (2a + o, 2c + o), the one the subsample keeps (o = sub_phase's low bit)."""
    model = hpvit.from_plain(hpvit.load_plain(_vit().state_dict()), config="grid-cls", prefix_merge="mean")
    pre = torch.randn(2 * 16, 1, 128)
    got = model._merge_prefix(pre, 2, 2).view(2, 2, 2, 128)
    p = pre.view(2, 4, 4, 128)
    torch.testing.assert_close(got[1, 0, 1], p[1, 0:2, 2:4].mean(dim=(0, 1)))
    model.config.prefix_merge = "keep"
    for sub_phase in (0, 1, 2, 3):
        model.config.sub_phase = sub_phase
        o = sub_phase & 1
        torch.testing.assert_close(model._merge_prefix(pre, 2, 2).view(2, 2, 2, 128)[1, 0, 1], p[1, o, 2 + o])
        o = sub_phase  # 1/4 -> 1/16 at once (an empty 1/8 stage): the copy of phase (sub_phase, sub_phase)
        torch.testing.assert_close(model._merge_prefix(pre, 2, 1).view(2, 128)[1], p[1, o, o])


def _reference_phases(m, e: torch.Tensor, r: int, blocks, cls: torch.Tensor | None) -> torch.Tensor:
    """Each phase of the map ``e`` (B, H, W, D) run through ``blocks`` as a map of its own at its natural
    size (no padding at all), with its own copy of the class token: an independent per-phase loop."""
    out = torch.empty_like(e)
    for a in range(r):
        for c in range(r):
            ph = e[:, a::r, c::r]
            b, h, w, d = ph.shape
            t = ph.reshape(b, h * w, d)
            if cls is not None:
                t = torch.cat([cls.expand(b, -1, -1), t], dim=1)
            for blk in blocks:
                t = blk(t)
            out[:, a::r, c::r] = t[:, 0 if cls is None else 1:].reshape(b, h, w, d)
    return out


@pytest.mark.parametrize("side", [72, 56])  # 18x18 map: phases of 5 and 4 rows; 14x14: of 4 and 3
@pytest.mark.parametrize("cls", [True, False])
def test_phases_of_unequal_size_match_a_per_phase_loop(side, cls):
    m = _vit(class_token=cls)
    model = hpvit.from_plain(hpvit.load_plain(m.state_dict()), config="grid-cls" if cls else "grid-seg")
    x = _images(1, side)
    with torch.no_grad():
        e = model.embed(x)
        cls_tok = model.prefix_tokens(1) if cls else None
        want = _reference_phases(m, e, 4, m.blocks[:2], cls_tok)
        for mode in ("eval", "train"):
            getattr(model, mode)()
            got = model.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")[0]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_phase_partition_round_trip_and_layout():
    x = torch.arange(2 * 6 * 5 * 3, dtype=torch.float32).view(2, 6, 5, 3)
    xp, valid = phase_partition(x, 2)
    assert xp.shape == (8, 3, 3, 3) and valid.shape == (4, 3, 3)
    torch.testing.assert_close(xp[1 * 4 + 2 * 1 + 1, :, :2], x[1, 1::2, 1::2])  # image 1, phase (1, 1)
    assert valid[1].all(dim=0).tolist() == [True, True, False] and valid[0].all()
    torch.testing.assert_close(phase_unpartition(xp, 2, 2, 6, 5), x)


def test_grid_bias_is_used_the_same_way_by_every_runner():
    """With trained (non-zero) pool convs and phase-grid biases the fast runner, the training runner and the
    graph-capture calls agree; the bias changes the output (it is applied)."""
    m = _vit()
    for preset in ("grid-cls", "grid-det"):
        model = hpvit.from_plain(hpvit.load_plain(m.state_dict()), config=preset)
        x = _images()
        with torch.no_grad():
            before = model.eval().forward_intermediates(x, intermediates_only=True)
            randomize_new_params(model, scale=0.5)
            fast = model.forward_intermediates(x, intermediates_only=True)
            train = model.train().forward_intermediates(x, intermediates_only=True)
            model.eval().force_plain_calls = True
            calls = model.forward_intermediates(x, intermediates_only=True)
        assert (fast[0] - before[0]).abs().max() > 1e-2
        for f, t, c in zip(fast, train, calls):
            torch.testing.assert_close(f, t, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(f, c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("conv", ["depthwise", "full"])
@pytest.mark.parametrize("padding", ["zeros", "replicate"])
@pytest.mark.parametrize("tap", [0, 1])
def test_subconv_pool_starts_as_a_subsample_and_merges_exactly(conv, padding, tap):
    x = torch.randn(2, 7, 9, 6)  # odd sides: ceil(7/2) x ceil(9/2)
    pool = Downsample("subconv", 6, conv, padding, tap=tap)
    pad = F.pad(x.permute(0, 3, 1, 2), (0, 1, 0, 1), mode="replicate" if padding == "replicate" else "constant")
    want = pad[:, :, tap::2, tap::2][:, :, :4, :5].permute(0, 2, 3, 1)
    torch.testing.assert_close(pool(x), want, atol=0, rtol=0)
    torch.testing.assert_close(Downsample("sub", 6, padding=padding, tap=tap)(x), want, atol=0, rtol=0)
    with torch.no_grad():
        pool.conv.weight.normal_()
        pool.conv.bias.normal_()
        before = pool(x)
        ref = F.conv2d(F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate" if padding == "replicate" else "constant"),
                       pool.conv.weight, pool.conv.bias, stride=2, groups=6 if conv == "depthwise" else 1)
        torch.testing.assert_close(before, want + ref.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
        pool.reparameterize()
        assert pool.kind == "conv"
        torch.testing.assert_close(pool(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool,conv", [("subconv", "depthwise"), ("subavg", "full"), ("subgconv", "full")])
def test_reparameterized_grid_model_saves_and_loads(tmp_path, pool, conv):
    """subavg merges into a depthwise conv whatever pool_conv says; the loaded file must build that shape."""
    model = hpvit.from_plain(hpvit.load_plain(_vit().state_dict()), config="grid-cls", pools=(pool,) * 3,
                             pool_conv=conv)
    randomize_new_params(model)
    x = _images()
    with torch.no_grad():
        want = model.eval()(x)
        torch.testing.assert_close(model.reparameterize()(x), want, atol=1e-5, rtol=1e-5)
        hpvit.save(model, tmp_path / "m.safetensors")
        again = hpvit.load(tmp_path / "m.safetensors").eval()
        torch.testing.assert_close(again(x), want, atol=1e-5, rtol=1e-5)
    assert again.config.attention == "phase" and again.config.reparameterized


def test_layouts_the_phases_cannot_tile_get_a_clear_error():
    m = random_timm_vit(0, name="vit_small_patch14_dinov2", img_size=56, num_classes=0)
    plain = hpvit.load_plain(m.state_dict())
    with pytest.raises(ConfigError, match=r"patch_stride in \[7, 14\]"):
        hpvit.from_plain(plain, config="grid-cls")
    model = hpvit.from_plain(plain, config="grid-cls", patch_stride=7)  # 2 phases at 1/7, then 1
    assert model.dilations == (2, 1, 1, 1)
    with pytest.raises(ConfigError, match="attention must be one of"):
        HPViTConfig(attention="dilated").resolve(12)
    with pytest.raises(ConfigError, match="prefix_merge"):
        HPViTConfig(prefix_merge="first").resolve(12)


@pytest.mark.slow
def test_real_deit_grid_cls_agrees_with_the_plain_model_at_initialisation():
    """On the real DeiT-Tiny and ImageNet-sample photos, grid-cls predicts the plain model's class before any
    training (issue 19's target: >= 95% of the plain top-1), where paper-cls agrees on none."""
    from PIL import Image
    from torchvision import transforms as T

    from hpvit.analysis import similarity_to_plain

    path = shared_path("deit_tiny", "deit_tiny_patch16_224.pth")
    files = sorted(shared_path("imagenet_sample", "images").iterdir())[:16]
    tf = T.Compose([T.Resize(248, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    images = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    plain = hpvit.from_plain(path, config="identity")
    agree = {cfg: similarity_to_plain(hpvit.from_plain(path, config=cfg), plain, images)[1]["agree1"]
             for cfg in ("grid-cls", "paper-cls")}
    assert agree["grid-cls"] >= 80.0 and agree["paper-cls"] <= 20.0, agree


@pytest.mark.parametrize("preset", ["grid-cls", "grid-det"])
def test_grid_models_export_to_onnx_and_match_pytorch(preset, tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX export checks need onnxruntime: pip install -e \".[export]\"")
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript: pip install -e \".[export]\"")
    from hpvit.export import compare_onnx, export_onnx
    from hpvit.layers.attention import _cached_grid_index

    _cached_grid_index.cache_clear()  # the export is the first use: nothing it traces may stay in the cache
    model = hpvit.from_plain(hpvit.load_plain(_vit().state_dict()), config=preset)
    randomize_new_params(model)
    if preset == "grid-det":
        model.as_backbone()
    path = export_onnx(model.eval(), tmp_path / "m.onnx", img_size=SIDE, pyramid=preset == "grid-det")
    assert compare_onnx(model, path, _images(1), pyramid=preset == "grid-det") <= 1e-4
    if preset == "grid-cls":  # the exported classifier (one phase at 1/4 and 1/8) against every phase computed
        from hpvit.export import run_onnx

        with torch.no_grad():
            want = _full_logits(model, _images(1))
        torch.testing.assert_close(run_onnx(path, _images(1))[0], want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- issue 27: classification sees one phase
def _full_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Today's full computation: every phase of every stage (forward_intermediates runs them all), then the head."""
    return model.forward_head(model.forward_intermediates(x)[0])


@pytest.mark.parametrize("side", [64, 72, 68])  # whole phases; phases of unequal size (the kept one whole); not whole
def test_classification_logits_equal_the_full_computation(side):
    """model(x) of grid-cls runs the 1/4 and 1/8 stages on the one phase its logits see; the logits are those
    of the full computation, with trained (random) phase-grid biases, in eval and in training mode (drop path
    drawn alike), on the fast runner and on the graph-capture calls."""
    model = hpvit.from_plain(hpvit.load_plain(_vit().state_dict()), config="grid-cls", drop_path_rate=0.3)
    randomize_new_params(model, scale=0.5)
    x = _images(2, side)
    with torch.no_grad():
        for mode in ("eval", "train"):
            getattr(model, mode)()
            torch.manual_seed(3)
            want = _full_logits(model, x)
            torch.manual_seed(3)
            torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)
            if side != 68:  # graph capture needs whole phases
                model.force_plain_calls = True
                torch.manual_seed(3)
                torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)
                model.force_plain_calls = False
        assert (want - model.eval()(_images(2, side).flip(-1))).abs().max() > 1e-3  # the logits see the image


@pytest.mark.parametrize("option", [dict(prefix_merge="mean"), dict(pools=("subconv",) * 3)])
def test_mixing_options_that_let_other_phases_reach_the_logits_compute_every_phase(option):
    """With averaged class-token copies or trained pool convs the other phases do reach the logits: model(x)
    must then equal the full computation too (running one phase would not)."""
    model = hpvit.from_plain(hpvit.load_plain(_vit().state_dict()), config="grid-cls", **option).eval()
    randomize_new_params(model, scale=0.5)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _full_logits(model, x), atol=1e-6, rtol=0)


def test_grid_cls_logits_cost_grid_lite_cls_flops_and_the_pyramid_every_phase():
    """FLOPs (torch.utils.flop_counter, deterministic) of model(x): grid-cls <= 1.1x grid-lite-cls (before
    issue 27: 3.0x on this 12-block model, 4x ViT-B's at ViT-B scale); forward_pyramid still computes
    all 16 phases at 1/4 and 4 at 1/8."""
    from hpvit.utils import count_flops

    m = random_timm_vit(0, img_size=64, num_classes=7, depth=12, embed_dim=128, num_heads=2)
    x = _images(1)
    grid, lite = (hpvit.from_plain(hpvit.load_plain(m.state_dict()), config=c).eval() for c in ("grid-cls", "grid-lite-cls"))
    f_grid, f_lite = count_flops(grid, x), count_flops(lite, x)
    assert f_grid <= 1.1 * f_lite, (f_grid, f_lite)
    f_pyramid = count_flops(lambda: grid.forward_pyramid(x))
    assert f_pyramid > 2 * f_grid, (f_pyramid, f_grid)


# ---------------------------------------------------------------------- issue 27: gated mixing across phases
def _padded(x: torch.Tensor, padding: str) -> torch.Tensor:
    """The NCHW view of a channels-last map ``x`` with the 1-pixel border the 3x3/2 pools read."""
    return F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate" if padding == "replicate" else "constant")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:FutureWarning")
@pytest.mark.parametrize("kind,conv", [("subavg", "depthwise"), ("subgconv", "depthwise"), ("subgconv", "full")])
@pytest.mark.parametrize("padding", ["zeros", "replicate"])
@pytest.mark.parametrize("tap", [0, 1])
def test_gated_pools_start_as_the_subsample_and_merge_exactly(kind, conv, padding, tap):
    """subavg = sub + g * (avg - sub), subgconv = sub + g * conv: exactly the subsample with the zero gate; with
    a trained gate (and conv) equal to the formula written out with torch's own avg_pool2d / conv2d on the padded
    map; reparameterize() folds it into one 3x3/2 conv with the same output."""
    x = torch.randn(2, 7, 9, 6)  # odd sides: the tap-1 subsample reads the padding
    pool = Downsample(kind, 6, conv, padding, tap=tap)
    sub = Downsample("sub", 6, padding=padding, tap=tap)(x)
    torch.testing.assert_close(pool(x), sub, atol=0, rtol=0)
    y = _padded(x, padding)
    with torch.no_grad():
        pool.gate.copy_(torch.linspace(-0.5, 1.5, 6))
        if kind == "subavg":
            branch = F.avg_pool2d(y, 3, 2).permute(0, 2, 3, 1) - sub
        else:
            torch.testing.assert_close(F.conv2d(y, pool.conv.weight, stride=2, groups=6 if conv == "depthwise" else 1),
                                       (F.avg_pool2d(y, 3, 2).permute(0, 2, 3, 1) - sub).permute(0, 3, 1, 2),
                                       atol=1e-6, rtol=0)  # the conv starts at the avg - sub kernel
            pool.conv.weight.add_(0.3 * torch.randn_like(pool.conv.weight))
            pool.conv.bias.normal_()
            branch = F.conv2d(y, pool.conv.weight, pool.conv.bias, stride=2,
                              groups=6 if conv == "depthwise" else 1).permute(0, 2, 3, 1)
        want = sub + pool.gate * branch
        torch.testing.assert_close(pool(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.jit.trace(pool, x)(x), want, atol=1e-5, rtol=1e-5)  # the graph-capture path
        pool.reparameterize()
        assert pool.kind == "conv" and pool.gate is None and "gate" not in pool.state_dict()
        torch.testing.assert_close(pool(x), want, atol=1e-5, rtol=1e-5)


def test_a_json_config_selects_the_gated_pools_and_gate_report_reads_them(tmp_path):
    """A JSON config (experiments/configs style) selects subavg; the fresh model's logits are grid-cls's exactly;
    gate_report gives each pool's mean / max |g| per stage (0 at the start, what was set after)."""
    import json

    from hpvit.analysis import gate_report

    path = tmp_path / "grid-cls-subavg.json"
    path.write_text(json.dumps(dict(name="grid-cls-subavg", attention="phase", pos_embed_sampling="phase",
                                    window_sizes=[None] * 4, class_token="auto", head="auto", sub_phase=1,
                                    pools=["subavg", "sub", "subgconv"])))
    sd = hpvit.load_plain(_vit().state_dict())
    model, plain = hpvit.from_plain(sd, config=str(path)).eval(), hpvit.from_plain(sd, config="grid-cls").eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=1e-6, rtol=0)
        assert [(r["stage"], r["kind"], r["mean_abs"]) for r in gate_report(model)] == [
            (1, "subavg", 0.0), (2, "sub", None), (3, "subgconv", 0.0)]
        model.stage_pool(1).gate.copy_(torch.linspace(-1, 1, 128) ** 2)  # mean of t^2 over [-1, 1]: ~1/3
        model.stage_pool(3).gate.fill_(-0.25)
        rows = gate_report(model)
    assert abs(rows[0]["mean_abs"] - 0.3386) < 1e-3 and rows[0]["max_abs"] == 1.0
    assert rows[2]["mean_abs"] == 0.25 and rows[2]["reduction"] == 32
    assert all(r["mean_abs"] is None for r in gate_report(model.reparameterize()))


def _chunk_small(monkeypatch, bias_bytes: int = 1) -> None:
    """Make inference work in tiny chunks: a few tokens per MLP chunk, ``bias_bytes`` of phase-grid bias at a time
    (1: one query row at a time). ``raising=False``: the knobs are absent where inference does not chunk."""
    from hpvit.layers import attention

    monkeypatch.setattr(attention, "CHUNK_BYTES", 4 * 512 * 24, raising=False)
    monkeypatch.setattr(attention, "BIAS_CHUNK_BYTES", bias_bytes, raising=False)


@pytest.mark.parametrize("preset,side", [("grid-cls", 64), ("grid-cls", 72), ("grid-det", 64), ("grid-det", 72)])
def test_inference_in_chunks_gives_the_whole_bias_numbers(preset, side, monkeypatch):
    """Issue 30 item 5: inference builds the phase-grid bias a block of query rows at a time and runs blocks a chunk
    at a time (here one query row, 24 tokens). The pyramid equals the plain formulation (whole bias, no chunks:
    autograd on) in eval and in training mode, through the fast runner and the plain calls; 72 px pads the
    phases (key masks per phase group); grid-det with 3x3 windows pads every window band."""
    _chunk_small(monkeypatch)
    kw = dict(window_sizes=(3, 3, 3, 3)) if preset == "grid-det" else {}
    model = hpvit.from_plain(hpvit.load_plain(_vit().state_dict()), config=preset, **kw)
    randomize_new_params(model, scale=0.5)
    model.chunk_tokens = 24
    x = _images(2, side)
    run = lambda: model.forward_intermediates(x, intermediates_only=True)  # noqa: E731
    with torch.enable_grad():
        whole = [t.detach() for t in run()]
        model.train()
        train = [t.detach() for t in run()]
    model.eval()
    with torch.no_grad():
        outs = [run()]
        if side % 16 == 0:
            model.force_plain_calls = True
            outs.append(run())
    for got in outs + [train]:
        for g, w in zip(got, whole):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_inference_never_builds_the_whole_phase_grid_bias(monkeypatch):
    """Issue 30 item 5: the (heads, N, N) bias of global attention on an N-token phase grid (at 1024 px 4096
    tokens: 805 MB for ViT-B) was built whole, and with padded phases added per phase group. In inference every
    mask attention sees now covers fewer than N query rows; autograd still gets the whole bias."""
    _chunk_small(monkeypatch, bias_bytes=4 * 64 * 2 * 16)  # 16 query rows of a 64-token grid, 2 heads
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None and attn_mask.shape[-1] == k.shape[-2] == 64:
            seen.append(attn_mask.shape[-2])
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = hpvit.from_plain(hpvit.load_plain(_vit().state_dict()), config="grid-seg").eval()  # 8x8 phase grids
    with torch.no_grad():
        model(_images(1, 128))
    assert seen and max(seen) <= 16, seen
    seen.clear()
    model(_images(1, 128))
    assert max(seen) == 64
