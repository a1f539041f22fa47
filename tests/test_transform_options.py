"""The transform's options from issue 10: replicate-padded pools, the global-average-pool kind, the class
token joined at the first global block, the position embedding kept at the source grid, the lr of new
parameters, and the similarity diagnostic. Checked against torch's own ops and timm's ViT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import hpvit
from hpvit.analysis import similarity_to_plain
from hpvit.checkpoints.native import read_metadata
from hpvit.engine.optim import param_groups
from hpvit.errors import ConfigError
from hpvit.layers import Downsample, resample_abs_pos_embed
from helpers import randomize_new_params, random_timm_vit, rel_err

# a single-stage, stride-16, all-global layout whose class token joins at block 0: the plain ViT itself
JOIN_AT_0 = dict(patch_stride=None, num_stages=1, window_sizes=(None,), pools=(), rel_pos=False,
                 class_token="join", head="auto")


@pytest.fixture(scope="module")
def vit():
    return random_timm_vit(3, depth=4)


@pytest.mark.parametrize("hw", [(14, 14), (7, 10)])
@pytest.mark.parametrize("conv", ["depthwise", "full"])
def test_replicate_pool_matches_torch_replicate_conv_and_merges_exactly(hw, conv):
    d = 8
    pool = Downsample("avgconv", d, conv, padding="replicate")
    with torch.no_grad():
        pool.conv.weight.normal_(0, 0.1)
        pool.conv.bias.normal_(0, 0.1)
    x = torch.randn(2, *hw, d)
    # the peer: torch's own replicate-padded conv, with the 1/9 box added to the conv weight
    ref = torch.nn.Conv2d(d, d, 3, 2, 1, groups=d if conv == "depthwise" else 1, padding_mode="replicate")
    with torch.no_grad():
        ref.weight.copy_(pool.conv.weight)
        if conv == "depthwise":
            ref.weight.add_(1 / 9)
        else:
            ref.weight[torch.arange(d), torch.arange(d)] += 1 / 9
        ref.bias.copy_(pool.conv.bias)
    want = ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    got = pool(x)
    assert got.shape == (2, (hw[0] + 1) // 2, (hw[1] + 1) // 2, d)
    assert rel_err(got, want) < 1e-5
    pool.reparameterize()
    assert pool.kind == "conv"
    assert rel_err(pool(x), want) < 1e-5


def test_replicate_pool_keeps_a_constant_map_constant_zero_padding_does_not():
    x = torch.full((1, 8, 8, 4), 3.0)
    rep = Downsample("avg", 4, padding="replicate")(x)
    zero = Downsample("avg", 4, padding="zeros")(x)
    assert torch.allclose(rep, torch.full_like(rep, 3.0))
    assert zero[0, 0, 0, 0].item() == pytest.approx(3.0 * 4 / 9)  # the corner reads 5 padded zeros
    assert zero[0, -1, -1, 0].item() == pytest.approx(3.0)  # the last row/column read no padding


def test_gap_pool_is_global_mean_and_last_stage_runs_on_one_token(vit):
    pool = Downsample("gap", 4)
    x = torch.randn(2, 5, 7, 4)
    assert torch.allclose(pool(x), x.mean(dim=(1, 2), keepdim=True))
    m = hpvit.from_plain(vit.state_dict(), "paper-cls", pools=("avgconv", "avgconv", "gap")).eval()
    maps = m.forward_pyramid(torch.randn(1, 3, 64, 64))
    assert [tuple(t.shape[-2:]) for t in maps] == [(16, 16), (8, 8), (4, 4), (1, 1)]
    with pytest.raises(ConfigError, match="only be the last"):
        hpvit.from_plain(vit.state_dict(), "paper-cls", pools=("gap", "avgconv", "avgconv"))


def test_class_token_joined_at_block_0_is_timm_vit_exactly(vit):
    m = hpvit.from_plain(vit.state_dict(), "paper-cls", **JOIN_AT_0).eval()
    assert m.head_type == "token" and m.join_block == 0
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(m(x), vit(x)) or rel_err(m(x), vit(x)) < 1e-6
        assert rel_err(m.forward_features(x), vit.forward_features(x)) < 1e-6


def test_class_token_joins_at_first_global_block(vit):
    m = hpvit.from_plain(vit.state_dict(), "paper-cls", depths=(1, 1, 1, 1), class_token="join", head="auto").eval()
    assert m.join_block == 2 and m.head_type == "token"
    rep = m.reuse_report()
    assert "cls_token" in rep.reused_keys and "cls_token" not in rep.dropped
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        # by hand: the class token (with its own position embedding) enters block 2 beside the 1/16 map
        y = m.embed(x)
        y = m.blocks[0](y)
        y = m.blocks[1](y)
        y = m.blocks[2].downsample(y)
        b, h, w, d = y.shape
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(b, -1, -1)
        t = m.blocks[2].forward_map(torch.cat([cls, y.reshape(b, h * w, d)], 1))
        cls, y = t[:, :1], t[:, 1:].reshape(b, h, w, d)
        y = m.blocks[3].downsample(y)
        t = m.blocks[3].forward_map(torch.cat([cls, y.reshape(b, -1, d)], 1))
        want = vit.norm(t)
    assert feats.shape == (2, 1 + 2 * 2, vit.embed_dim)
    assert rel_err(feats, want) < 1e-5
    assert rel_err(m(x), vit.head(want[:, 0])) < 1e-5


@pytest.mark.parametrize("overrides, msg", [
    (dict(class_token="join", window_sizes=(7, 7, 7, 7)), "needs a global-attention block"),
    (dict(class_token="join", window_sizes=(7, None, 7, None)), "cannot take part in window attention"),
    (dict(class_token="join", global_blocks=(1, 3), window_sizes=(7, 7, 14, 14)), "cannot take part in window attention"),
    (dict(class_token="keep"), "class_token must be one of"),
    (dict(pool_padding="reflect"), "pool_padding must be one of"),
])
def test_class_token_and_pool_config_errors(vit, overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        hpvit.from_plain(vit.state_dict(), "paper-cls", **overrides)


def test_class_token_join_needs_a_class_token_checkpoint():
    gap_vit = random_timm_vit(1, depth=4, class_token=False, global_pool="avg")
    with pytest.raises(ConfigError, match="has none"):
        hpvit.from_plain(gap_vit.state_dict(), "paper-cls", class_token="join")


def test_position_embedding_keeps_the_source_grid(vit):
    m = hpvit.from_plain(vit.state_dict(), "paper-cls", img_size=512, class_token="drop")
    assert tuple(m.pos_embed.shape) == (1, 14 * 14, vit.embed_dim)  # not the 128x128 grid of 512 px
    assert torch.equal(m.pos_embed, vit.pos_embed[:, 1:])
    j = hpvit.from_plain(vit.state_dict(), "paper-cls", class_token="join")
    assert torch.equal(j.pos_embed, vit.pos_embed)  # the class token's position is kept too


def test_files_with_the_old_img_size_grid_still_load(tmp_path, vit):
    m = hpvit.from_plain(vit.state_dict(), "paper-cls", class_token="drop").eval()
    randomize_new_params(m)
    p = tmp_path / "m.safetensors"
    hpvit.save(m, p)
    # rewrite the file as hpvit 0.1 stored it: the position embedding resampled to the 56x56 grid of 224 px
    sd, meta = load_file(p), read_metadata(p)
    old = resample_abs_pos_embed(sd["pos_embed"].reshape(1, 14, 14, -1), (56, 56)).reshape(1, 56 * 56, -1)
    sd["pos_embed"] = old
    save_file(sd, p, metadata=meta)
    back = hpvit.load(p).eval()
    assert back.pos_grid == (56, 56) and torch.equal(back.pos_embed, old)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        # the old grid was the source grid resampled once to 56x56, exactly what the source-grid model
        # computes at run time for a 224-px input: both give the same output
        assert torch.equal(back._pos_grid(56, 56), old.reshape(1, 56, 56, -1))
        assert rel_err(back(x), m(x)) < 1e-6


def test_new_parameters_train_at_their_own_lr(vit):
    m = hpvit.from_plain(vit.state_dict(), "paper-cls")
    groups = param_groups(m, 0.05, layer_decay=0.5, new_param_lr_scale=1.0)
    new = {n for g in groups if g["new_params"] for n in g["param_names"]}
    assert new == set(m.new_parameter_names()) and new
    assert all(g["lr_scale"] == 1.0 for g in groups if g["new_params"])
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.5 ** 4)  # still layer-decayed
    old = param_groups(m, 0.05, layer_decay=0.5, new_param_lr_scale=None)
    assert {n: g["lr_scale"] for g in old for n in g["param_names"]}["blocks.0.attn.rel_pos_table"] == pytest.approx(0.5 ** 4)
    lite = hpvit.from_plain(vit.state_dict(), "paper-cls", depths=(0, 0, 2, 2))
    ids = {n: g["layer_id"] for g in param_groups(lite, 0.05, 0.5) for n in g["param_names"]}
    assert all(ids[n] == 0 for n in ids if n.startswith("empty_stages."))  # pools before block 0: the stem


def test_similarity_diagnostic(vit):
    x = torch.randn(4, 3, 64, 64)
    plain = hpvit.from_plain(vit.state_dict(), "identity")
    same = hpvit.from_plain(vit.state_dict(), "paper-cls", **JOIN_AT_0)
    rows, extra = similarity_to_plain(same, plain, x)
    assert [r.plain_block for r in rows] == [4] and rows[0].cosine == pytest.approx(1.0, abs=1e-5)
    assert extra["agree1"] == 100.0
    rows, extra = similarity_to_plain(hpvit.from_plain(vit.state_dict(), "paper-cls", depths=(1, 1, 1, 1)), plain, x)
    assert [r.plain_block for r in rows] == [1, 2, 3, 4]
    assert all(-1 <= r.cosine < 0.999 for r in rows)


def test_info_similarity_cli(tmp_path, tiny_vit_sd, capsys):
    from PIL import Image

    from hpvit.cli import main

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(d / f"{i}.jpg")
    assert main(["info", str(tiny_vit_sd), "--config", "paper-cls", "--img-size", "64", "--similarity", str(d)]) == 0
    out = capsys.readouterr().out
    assert "similarity to the plain model on 3 image(s)" in out and "stage4 (1/32)" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["info", str(tiny_vit_sd), "--similarity", str(empty)]) == 2
    assert "no image files found" in capsys.readouterr().err


def test_class_token_auto_joins_only_where_it_can(vit):
    assert hpvit.from_plain(vit.state_dict(), "paper-cls", class_token="auto").join
    det = hpvit.from_plain(vit.state_dict(), "paper-det", class_token="auto", global_blocks=(1, 3))
    assert not det.join and det.cls_token is None  # a windowed block follows the first global one
    gap_vit = random_timm_vit(1, depth=4, class_token=False, global_pool="avg")
    m = hpvit.from_plain(gap_vit.state_dict(), "paper-cls", class_token="auto", head="auto")
    assert not m.join and m.head_type == "avg"


def test_config_from_json_file_everywhere(tmp_path, vit):
    from hpvit.config import get_config

    f = tmp_path / "mine.json"
    f.write_text('{"name": "mine", "pool_padding": "replicate", "depths": [1, 1, 1, 1]}')
    cfg = get_config(str(f))
    assert cfg.name == "mine" and cfg.pool_padding == "replicate" and cfg.depths == (1, 1, 1, 1)
    assert hpvit.from_plain(vit.state_dict(), str(f)).config.pool_padding == "replicate"
    with pytest.raises(ConfigError, match="does not exist"):
        get_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not a valid JSON config"):
        get_config(str(tmp_path / "bad.json"))


# ------------------------------------------------------------------ windows larger than the map (issue 14)
@pytest.mark.parametrize("hw", [(3, 5), (7, 7), (1, 1), (5, 9), (9, 4)])
@pytest.mark.parametrize("rel_pos", [True, False])
def test_window_larger_than_map_equals_padded_window(hw, rel_pos):
    """A map that fits in one window attends as that map-sized window: the same numbers as the padded
    window (computed here the long way, with torch's own padding and masking), and plain global attention
    when there is no relative-position table."""
    from hpvit.layers import Attention, pad_partition, unpartition_crop

    torch.manual_seed(0)
    ws, d = 7, 32
    attn = Attention(d, num_heads=4, window_size=ws, rel_pos=rel_pos).eval()
    if rel_pos:
        with torch.no_grad():
            attn.rel_pos_table.normal_(0, 0.5)
    h, w = hw
    x = torch.randn(2, h, w, d)
    with torch.no_grad():
        got = attn(x)
        # reference: pad to ws multiples with F.pad, mask padded keys with -inf, crop the padded queries
        xw, key_ok = pad_partition(x, ws)
        if key_ok is None:
            key_ok = torch.ones(xw.shape[0] // 2, ws * ws, dtype=torch.bool)
        mask = attn.window_mask(key_ok)
        groups = key_ok.shape[0]
        ref = unpartition_crop(attn._attend(xw, mask, groups=groups), ws, 2, h, w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    if not rel_pos and h <= ws and w <= ws:
        glob = Attention(d, num_heads=4, window_size=None).eval()
        glob.load_state_dict(attn.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(got, glob(x.reshape(2, h * w, d)).view(2, h, w, d), rtol=1e-5, atol=1e-6)


def test_paper_det_small_input_same_as_padded_run(tmp_path):
    """paper-det at 192 px: its 14x14 windows cover the whole 6x6 (1/32) and 12x12 (1/16) maps; the model
    runs those stages without padding and gives the numbers the padded windows give."""
    from helpers import random_timm_vit

    import hpvit.models.hierarchical as H

    vit = random_timm_vit()
    model = hpvit.from_plain(vit.state_dict(), "paper-det").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("rel_pos_table"):
                p.normal_(0, 0.3)
    x = torch.randn(1, 3, 192, 192)
    with torch.no_grad():
        fast = model.forward_pyramid(x)
        orig = H.Attention.forward

        def padded(self, t):  # the old path: always pad to the window
            if self.window_size is None or t.ndim != 4:
                return orig(self, t)
            from hpvit.layers import pad_partition, unpartition_crop

            b, h, w, _ = t.shape
            xw, key_ok = pad_partition(t, self.window_size)
            groups = 1 if key_ok is None else key_ok.shape[0]
            return unpartition_crop(self._attend(xw, self.window_mask(key_ok), groups=groups), self.window_size, b, h, w)

        H.Attention.forward = padded
        try:
            model.set_grad_checkpointing(False)
            ref = [m.clone() for m in model.forward_pyramid(x)]
        finally:
            H.Attention.forward = orig
    assert [tuple(m.shape[-2:]) for m in fast] == [(48, 48), (24, 24), (12, 12), (6, 6)]
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
