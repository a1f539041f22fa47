"""The inference shortcuts of the layers against their unoptimised formulations (issue 22).

* PatchEmbed convolves the channels-last image; reference: ``F.conv2d`` on the NCHW image.
* 3x3/2 pools convolve with their own zero padding and add the replicate ring back
  (``pooling.pool3x3s2``); reference: ``F.pad`` then the padding-free pool/conv, the formulation graph
  export keeps.
* The resampled position embedding is reused in inference; reference: resampled afresh.
Whole models are compared with all three shortcuts switched off. Correctness only (speed: hpvit bench).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hpvit
import hpvit.layers.pooling as pooling
import hpvit.models.hierarchical as hierarchical
from hpvit.layers import Downsample, PatchEmbed
from hpvit.layers.pooling import pool3x3s2
from helpers import randomize_new_params, rel_err


@pytest.fixture(scope="module")
def vit_tiny_sd():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224").state_dict()


@pytest.mark.parametrize("stride,pad,hw", [(4, 6, (64, 64)), (4, 6, (37, 50)), (16, 0, (48, 64)), (4, 6, (16, 16))])
def test_patch_embed_matches_nchw_conv(stride, pad, hw):
    torch.manual_seed(0)
    pe = PatchEmbed(3, 24, 16, stride, pad)
    x = torch.randn(2, 3, *hw, requires_grad=True)
    ref = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride, pad).permute(0, 2, 3, 1)
    out = pe(x)
    assert out.shape == ref.shape == (2, *pe.grid(*hw), 24)
    assert out.is_contiguous()
    assert rel_err(out, ref) < 1e-6
    g = torch.randn_like(ref)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, pe.proj.weight), g)
    gx, gw = torch.autograd.grad(out, (x, pe.proj.weight), g)
    assert rel_err(gx, gx_ref) < 1e-5 and rel_err(gw, gw_ref) < 1e-5


def _padded_pool(y, weight, bias, replicate):
    p = F.pad(y, (1, 1, 1, 1), mode="replicate" if replicate else "constant")
    if weight is None:
        return F.avg_pool2d(p, 3, 2, 0)
    return F.conv2d(p, weight, bias, 2, 0, 1, y.shape[1] if weight.shape[1] == 1 else 1)


@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (5, 8), (8, 5), (1, 1), (2, 3), (13, 14)])
@pytest.mark.parametrize("kind", ["avg", "depthwise", "full"])
@pytest.mark.parametrize("replicate", [True, False])
def test_pool3x3s2_matches_padded_copy(hw, kind, replicate):
    torch.manual_seed(0)
    d = 6
    y = torch.randn(2, *hw, d).permute(0, 3, 1, 2).requires_grad_(True)  # NCHW view of a channels-last map
    w = b = None
    if kind != "avg":
        w = torch.randn(d, 1 if kind == "depthwise" else d, 3, 3, requires_grad=True)
        b = torch.randn(d, requires_grad=True)
    ref = _padded_pool(y, w, b, replicate)
    out = pool3x3s2(y, w, b, replicate)
    assert out.shape == ref.shape == (2, d, -(-hw[0] // 2), -(-hw[1] // 2))
    assert rel_err(out, ref) < 1e-6
    leaves = [t for t in (y, w, b) if t is not None]
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        assert rel_err(a, r) < 1e-5


@pytest.mark.parametrize("kind", ["avgconv", "avg", "conv"])
@pytest.mark.parametrize("padding", ["replicate", "zeros"])
def test_downsample_eager_equals_export_formulation(monkeypatch, kind, padding):
    torch.manual_seed(0)
    ds = Downsample(kind, 8, padding=padding)
    if ds.conv is not None:
        torch.nn.init.normal_(ds.conv.weight)
        torch.nn.init.normal_(ds.conv.bias)
    x = torch.randn(2, 11, 12, 8)
    out = ds(x)
    monkeypatch.setattr(pooling, "is_graph_capture", lambda: True)
    ref = ds(x)
    assert out.shape == ref.shape == (2, 6, 6, 8)
    assert rel_err(out, ref) < 1e-6


def _unoptimised(monkeypatch):
    """Switch off the three shortcuts: NCHW patch conv, padded pools, fresh position-embedding resampling."""
    monkeypatch.setattr(PatchEmbed, "forward", PatchEmbed.reference)
    monkeypatch.setattr(pooling, "is_graph_capture", lambda: True)
    monkeypatch.setattr(hierarchical, "is_graph_capture", lambda: True)


@pytest.mark.parametrize("config,size", [("lite-cls", 64), ("paper-cls", 64), ("paper-det", 64), ("grid-lite-cls", 64), ("grid-det", 96)])
def test_model_matches_unoptimised_path(monkeypatch, vit_tiny_sd, config, size):
    m = hpvit.from_plain(vit_tiny_sd, config)
    randomize_new_params(m, scale=0.3)
    m.reparameterize().eval().requires_grad_(False)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = m(x)
        again = m(x)  # second call: the cached position embedding
        _unoptimised(monkeypatch)
        ref = m(x)
    for a, b in zip(out if isinstance(out, list) else [out], ref if isinstance(ref, list) else [ref]):
        assert rel_err(a, b) < 1e-5
    for a, b in zip(again if isinstance(again, list) else [again], ref if isinstance(ref, list) else [ref]):
        assert rel_err(a, b) < 1e-5


def test_position_embedding_cache_follows_the_tensor(vit_tiny_sd):
    """In-place updates (optimizer steps, load_state_dict), new tensors and other sizes are never served stale."""
    m = hpvit.from_plain(vit_tiny_sd, "lite-cls").eval()
    fresh = lambda h, w: hierarchical._pos_embed_at(m.pos_embed, m.pos_embed_prefix, *m.pos_grid, h, w)  # noqa: E731
    with torch.no_grad():
        first = m._pos_grid(16, 16)
        assert m._pos_grid(16, 16) is first  # reused
        assert torch.equal(first, fresh(16, 16))
        assert torch.equal(m._pos_grid(12, 20), fresh(12, 20))
        m.pos_embed.mul_(2.0)  # in place, as an optimizer step
        assert torch.equal(m._pos_grid(16, 16), fresh(16, 16))
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        sd["pos_embed"] += 1.0
        m.load_state_dict(sd)
        assert torch.equal(m._pos_grid(16, 16), fresh(16, 16))
        m.pos_embed = torch.nn.Parameter(torch.randn_like(m.pos_embed))
        assert torch.equal(m._pos_grid(16, 16), fresh(16, 16))
    # training / grad mode: never cached, the graph reaches the parameter
    m.train()
    m._pos_grid(16, 16).sum().backward()
    assert m.pos_embed.grad is not None and m.pos_embed.grad.abs().sum() > 0
