"""The fast execution paths (window order kept through a stage, chunked in-place inference, chunked
checkpointing), 0-block stages / efficiency presets, and the ``hpvit bench`` JSON schema.

Correctness only: speed is measured by ``hpvit bench`` (docs/performance.md), never asserted here.
"""

from __future__ import annotations

import json

import pytest
import torch

import hpvit
from hpvit.bench import JSON_KEYS, NaiveHPViT, format_table, resolve_models
from hpvit.config import efficiency_depth_split
from hpvit.layers.attention import DropPath
from helpers import randomize_new_params, rel_err


@pytest.fixture(scope="module")
def vit_tiny_sd():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224").state_dict()


def _model(sd, config, **kw):
    m = hpvit.from_plain(sd, config, **kw)
    randomize_new_params(m, scale=0.3)
    return m


EVERY_CHUNKING = (10**9, 37, 1)  # no chunking, ragged chunks, one window/token at a time


# 56 px: maps of 14x14 and 7x7, exact multiples of the 7x7 windows (no padding), like 224 but 16x cheaper;
# at 224 one-token-at-a-time chunks would take minutes, so 224 checks the full and the ragged chunking
@pytest.mark.parametrize("config,size,chunks", [("paper-cls", 224, (10**9, 37)), ("paper-cls", 56, EVERY_CHUNKING),
                                                ("paper-cls", 100, EVERY_CHUNKING), ("paper-det", 96, EVERY_CHUNKING),
                                                ("fast-cls", 72, EVERY_CHUNKING), ("lite-cls", 64, EVERY_CHUNKING)])
def test_fast_inference_matches_per_block_forward(vit_tiny_sd, config, size, chunks):
    """The stage runner (partition once, chunks, in-place residuals) equals the plain per-block forward."""
    m = _model(vit_tiny_sd, config).eval()
    x = torch.randn(1 if size == 224 else 2, 3, size, size)  # batches of 2 at the smaller sizes
    naive = NaiveHPViT(m)
    with torch.no_grad():
        for p in m.parameters():
            p.requires_grad_(False)
        ref = naive(x) if m.head_type != "none" else None
        feats_ref = None
        for chunk in chunks:
            m.chunk_tokens = chunk
            if ref is not None:
                out = m(x)
                assert rel_err(out, ref) < 1e-5, chunk
            feats = m.forward_pyramid(x)
            assert [f.shape[-1] for f in feats] == [-(-size // s) if s > 4 else size // 4 for s in (4, 8, 16, 32)]
            if feats_ref is None:
                feats_ref = feats
            for a, b in zip(feats, feats_ref):
                assert rel_err(a, b) < 1e-5


def test_input_not_modified_and_grad_mode_paths_agree(vit_tiny_sd):
    m = _model(vit_tiny_sd, "paper-cls").eval()
    m.chunk_tokens = 64
    x = torch.randn(2, 3, 64, 64)
    x0 = x.clone()
    with torch.no_grad():
        a = m(x)
    b = m(x)  # grad enabled: the out-of-place path
    assert torch.equal(x, x0)
    assert rel_err(a, b.detach()) < 1e-5


@pytest.mark.parametrize("config", ["paper-cls", "lite-cls"])
def test_chunked_checkpointing_gives_same_gradients(vit_tiny_sd, config):
    m = _model(vit_tiny_sd, config, num_classes=5).train()
    x = torch.randn(2, 3, 80, 80)
    m(x).square().sum().backward()
    g_ref = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m.chunk_tokens = 60  # several chunks per stage at 1/4 and 1/8
    m(x).square().sum().backward()
    g = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert g.keys() == g_ref.keys()
    assert any(n.endswith("rel_pos_table") for n in g) == (config == "paper-cls")
    for n in g_ref:
        assert rel_err(g[n], g_ref[n]) < 1e-4, n


def test_chunked_checkpointing_with_drop_path_same_numbers(vit_tiny_sd):
    """With stochastic depth on, checkpointing still works a few windows at a time: each image's drop is drawn
    once and shared by its windows' chunks, so outputs and gradients equal the unchunked, uncheckpointed
    run under the same seed (and some images really are dropped)."""
    m = _model(vit_tiny_sd, "paper-det", num_classes=0, drop_path_rate=0.5).train()
    x = torch.randn(4, 3, 80, 80)

    def run(ckpt: bool):
        m.zero_grad(set_to_none=True)
        m.set_grad_checkpointing(ckpt)
        m.chunk_tokens = 60 if ckpt else 10**9
        torch.manual_seed(3)
        out = m.forward_pyramid(x)
        sum(o.square().mean() for o in out).backward()
        return [o.detach() for o in out], {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    out_ref, g_ref = run(False)
    out, g = run(True)
    for a, b in zip(out, out_ref):
        assert rel_err(a, b) < 1e-5
    assert g.keys() == g_ref.keys()
    for n in g_ref:
        assert rel_err(g[n], g_ref[n]) < 1e-4, n
    blk = m.blocks[-1]
    p = blk.drop_path1.p
    torch.manual_seed(0)
    k1, _ = blk.draw_keep(64, 3, x)
    assert p == pytest.approx(0.5) and k1.shape == (192,)
    assert set(k1.tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
    assert (k1.view(64, 3) == k1.view(64, 3)[:, :1]).all()  # one draw per image, shared by its rows


def test_drop_path_drops_whole_images_of_windows():
    torch.manual_seed(0)
    dp = DropPath(0.5).train()
    x = torch.ones(6 * 4, 3, 2)  # 6 images x 4 windows
    y = dp(x, images=6).view(6, -1)
    for row in y:
        assert row.unique().numel() == 1  # every window of an image: all kept (x2) or all dropped (0)
    assert set(y[:, 0].tolist()) <= {0.0, 2.0}


def test_efficiency_presets_keep_pyramid_and_weights(vit_tiny_sd):
    plain = hpvit.load_plain(vit_tiny_sd)
    assert efficiency_depth_split(12, "fast") == (1, 1, 8, 2)
    assert efficiency_depth_split(12, "lite") == (0, 0, 10, 2)
    assert efficiency_depth_split(24, "lite") == (0, 0, 22, 2)
    for config, depths in (("fast-cls", (1, 1, 8, 2)), ("lite-cls", (0, 0, 10, 2))):
        m = hpvit.from_plain(plain, config)
        assert m.layout.depths == depths
        assert m.reuse_report().encoder_fully_reused(plain)
        assert m.strides == [4, 8, 16, 32]
        feats = m.eval().forward_pyramid(torch.randn(1, 3, 64, 64))
        assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    lite = hpvit.from_plain(plain, "lite-cls")
    assert [f["module"] for f in lite.feature_info] == ["patch_embed", "empty_stages.1", "blocks.9", "blocks.11"]
    assert "empty_stages.1.downsample.conv.weight" in lite.state_dict()
    assert lite.blocks[0].downsample is not None and all(b.downsample is None for b in lite.blocks[1:10])


def test_empty_stage_reparameterize_exact_and_save_load(vit_tiny_sd, tmp_path):
    m = _model(vit_tiny_sd, "lite-cls").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m.forward_pyramid(x)
        m.reparameterize()
        assert m.empty_stages["1"].downsample.kind == "conv"
        out = m.forward_pyramid(x)
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-5
    hpvit.save(m, tmp_path / "lite.safetensors")
    m2 = hpvit.load(tmp_path / "lite.safetensors").eval()
    with torch.no_grad():
        for a, b in zip(m2.forward_pyramid(x), out):
            assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("depths", [(0, 0, 0, 12), (1, 1, 0, 10), (3, 0, 9, 0)])
def test_zero_block_stages_anywhere(vit_tiny_sd, depths):
    m = hpvit.from_plain(vit_tiny_sd, "paper-cls", depths=depths).eval()
    with torch.no_grad():
        feats = m.forward_pyramid(torch.randn(1, 3, 64, 64))
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]


@pytest.mark.parametrize("bad", [dict(depths=(0, 0, 0, 0)), dict(depths=(-1, 3, 8, 2)), dict(depth_split="nope")])
def test_bad_depths_raise(vit_tiny_sd, bad):
    with pytest.raises(hpvit.ConfigError):
        hpvit.from_plain(vit_tiny_sd, "paper-cls", **bad)


def test_resolve_models_groups():
    base = resolve_models("base")
    assert base[:3] == ["vit_base_patch16_224", "hiera_base_224", "swin_base_patch4_window7_224"]
    assert "hpvit-B/paper-cls" in base and "hpvit-B/lite-cls" in base
    assert resolve_models("tiny,vit_tiny_patch16_224")[0] == "vit_tiny_patch16_224"
    assert len(resolve_models("all")) == 3 * len(base)


def test_bench_json_schema(tmp_path, capsys):
    from hpvit.cli import main

    out, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--models", "hpvit-T/lite-cls", "--batch", "1", "--img-size", "64", "--warmup", "0",
               "--iters", "2", "--threads", "1", "--out", str(out), "--plot", str(png)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["matmul_gflops_per_s"] > 0
    assert len(res["models"]) == 1
    row = res["models"][0]
    for k in JSON_KEYS:
        assert k in row, k
    assert row["name"] == "hpvit-T/lite-cls" and row["batch"] == 1
    assert row["gflops"] > 0 and row["img_per_s"] > 0 and row["latency_ms"] > 0
    assert abs(row["achieved_gflops_per_s"] - row["gflops"] * row["img_per_s"]) < 1e-6 * row["achieved_gflops_per_s"]
    assert row["peak_mem_infer_mb"] is not None and row["peak_mem_train_mb"] is not None
    assert row["peak_mem_train_mb"] > row["peak_mem_infer_mb"] >= 0
    assert png.stat().st_size > 1000
    assert "hpvit-T/lite-cls" in format_table(res)
    assert "hpvit-T/lite-cls" in capsys.readouterr().out
