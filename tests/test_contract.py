"""The one contract (docs/architecture.md): every backbone and task model hpvit builds answers
``feature_info``, ``forward_intermediates``, ``group_matcher``, ``no_weight_decay`` and
``set_grad_checkpointing`` the same way, so the engine needs no knowledge of any model's layout.

Parametrized over every preset (plain baselines included), the dense backbones, the task models and
every ``hpvit_*`` name registered with timm (those at full size on the meta device: shapes and names only).
"""

from __future__ import annotations

import re

import pytest
import timm
import torch

import hpvit
from hpvit.engine.optim import layer_id, num_layers, param_groups
from hpvit.models.dense import build_dense_backbone
from hpvit.models.detector import build_detector
from hpvit.models.segmenter import build_segmenter
from hpvit.tasks.adapt import AdaptModel

IMG = 64


@pytest.fixture(scope="module")
def small_sd():
    """A random 8-block, 64-wide ViT (patch 16, class token, 10 classes): deep enough for every preset."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=8, embed_dim=64, num_heads=2,
                          img_size=IMG, num_classes=10)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m.state_dict()


def _vit(sd, preset):
    m = hpvit.from_plain(sd, preset, num_classes=10)
    with torch.no_grad():  # non-zero new parameters, so a wrong wiring shows
        for n, p in m.named_parameters():
            if ".downsample." in n or n.endswith("rel_pos_table"):
                p.normal_(0, 0.05)
    return m


BUILDERS = {f"preset:{p}": (lambda sd, p=p: _vit(sd, p)) for p in hpvit.list_presets()}
BUILDERS.update({f"dense:{c}": (lambda sd, c=c: build_dense_backbone(sd, c)) for c in
                 ("paper-det", "paper-seg", "grid-det", "grid-seg", "plain-det", "plain-seg")})
BUILDERS.update({
    "task:maskrcnn-paper-det": lambda sd: build_detector(sd, "paper-det", num_classes=3, img_size=IMG),
    "task:maskrcnn-plain-det": lambda sd: build_detector(sd, "plain-det", num_classes=3, img_size=IMG),
    "task:upernet-paper-seg": lambda sd: build_segmenter(sd, "paper-seg", num_classes=5, img_size=IMG, channels=32),
    "task:upernet-plain-seg": lambda sd: build_segmenter(sd, "plain-seg", num_classes=5, img_size=IMG, channels=32),
    "task:maskrcnn-grid-det": lambda sd: build_detector(sd, "grid-det", num_classes=3, img_size=IMG),
    "task:upernet-grid-seg": lambda sd: build_segmenter(sd, "grid-seg", num_classes=5, img_size=IMG, channels=32),
    "task:adapt": lambda sd: AdaptModel(_vit(sd, "paper-cls")),
    "task:adapt-grid": lambda sd: AdaptModel(_vit(sd, "grid-cls")),
})


def _pyramid(model, x):
    if isinstance(model, hpvit.HierarchicalViT):
        return model.forward_intermediates(x, intermediates_only=True)
    return model.forward_intermediates(x)


def _backbone_param_names(model) -> list[str]:
    """Parameters of the ViT inside ``model`` (the part the contract's layer ids describe), head excluded."""
    head = re.compile(r"(^|\.)(head|fc_norm|head_proj)\.")
    if isinstance(model, hpvit.HierarchicalViT):
        return [n for n, _ in model.named_parameters() if not head.search(n) and not n.startswith(("head", "fc_norm"))]
    vit_paths = [n for n, m in model.named_modules() if isinstance(m, hpvit.HierarchicalViT)]
    assert len(vit_paths) == 1, vit_paths
    pre = vit_paths[0] + "."
    return [n for n, _ in model.named_parameters() if n.startswith(pre) and not head.search(n[len(pre) - 1:])]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_contract(name, small_sd):
    torch.manual_seed(0)
    model = BUILDERS[name](small_sd)
    names = {n for n, _ in model.named_parameters()}

    # group_matcher covers the backbone: every ViT parameter is the stem or a block; ids rise with depth
    gm = model.group_matcher()
    pats = [re.compile(gm["stem"])] + [re.compile(p) for p, _ in gm["blocks"]]
    unmatched = [n for n in _backbone_param_names(model) if not any(p.match(n) for p in pats)]
    assert not unmatched, unmatched[:5]
    n_layers = num_layers(model)
    ids = {n: layer_id(n, model, n_layers) for n in names}
    assert min(ids.values()) == 0 and max(ids.values()) == n_layers - 1
    vit_names = _backbone_param_names(model)
    blocks = sorted({int(m.group(1)) for n in vit_names for m in [re.search(r"(?:^|\.)blocks\.(\d+)\.", n)] if m})
    first = [next(n for n in vit_names if re.search(rf"(?:^|\.)blocks\.{b}\.", n)) for b in blocks]
    assert [ids[n] for n in first] == [b + 1 for b in blocks]

    # no_weight_decay names full parameter names of this model; the optimizer groups honour them
    nwd = set(model.no_weight_decay())
    assert nwd and nwd <= names, sorted(nwd - names)[:5]
    groups = param_groups(model, 0.05, 0.75)
    assert sorted(n for g in groups for n in g["param_names"]) == sorted(n for n, p in model.named_parameters())
    assert all(g["weight_decay"] == 0.0 for g in groups for n in g["param_names"] if n in nwd)

    # feature_info describes forward_intermediates exactly
    info = model.feature_info
    model.eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        feats = _pyramid(model, x)
    assert len(feats) == len(info) >= 1
    for f, i in zip(feats, info):
        assert f.shape[1] == i["num_chs"] and f.shape[-1] == -(-IMG // i["reduction"]), (tuple(f.shape), i)
        assert isinstance(i["module"], str) and i["module"]

    # gradient checkpointing changes memory, not numbers (outputs and gradients)
    def run(ckpt: bool):
        model.train()
        model.set_grad_checkpointing(ckpt)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = _pyramid(model, x)
        sum((o.float() ** 2).mean() for o in out).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return [o.detach() for o in out], grads

    out0, g0 = run(False)
    out1, g1 = run(True)
    model.set_grad_checkpointing(False)
    for a, b in zip(out0, out1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("preset", hpvit.list_presets())
def test_save_load_round_trip(preset, small_sd, tmp_path):
    """Every preset survives hpvit.save / hpvit.load bit for bit (config, spec and weights in one file)."""
    model = _vit(small_sd, preset).eval()
    hpvit.save(model, tmp_path / "m.safetensors")
    back = hpvit.load(tmp_path / "m.safetensors").eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        out, out_back = model(x), back(x)  # logits, or the pyramid for head="none" presets
        for a, b in zip(out if isinstance(out, (list, tuple)) else [out], out_back if isinstance(out_back, (list, tuple)) else [out_back]):
            assert torch.equal(a, b)
        for a, b in zip(_pyramid(model, x), _pyramid(back, x)):
            assert torch.equal(a, b)
    assert back.config == model.config


@pytest.mark.parametrize("name", sorted(timm.list_models("hpvit_*")))
def test_registered_timm_models(name):
    """Every registered name at full size, on the meta device (no memory, no weights): the pyramid's
    shapes against feature_info, and layer ids / no-decay names covering the model."""
    model = timm.create_model(name, pretrained=False, device="meta")
    names = {n for n, _ in model.named_parameters()}
    feats = model.forward_intermediates(torch.empty(1, 3, 224, 224, device="meta"), intermediates_only=True)
    assert [(f.shape[1], 224 // f.shape[-1]) for f in feats] == [(i["num_chs"], i["reduction"]) for i in model.feature_info]
    assert set(model.no_weight_decay()) & names and set(model.no_weight_decay()) <= names
    gm = model.group_matcher()
    pats = [re.compile(gm["stem"])] + [re.compile(p) for p, _ in gm["blocks"]]
    assert not [n for n in _backbone_param_names(model) if not any(p.match(n) for p in pats)]
    assert num_layers(model) == len(model.blocks) + 2
