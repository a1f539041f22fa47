"""``hpvit adapt``: label-free distillation toward the plain source. End to end on a tiny random ViT and
generated images: the objective falls, the output is an hpvit file with the source's classifier that
``train cls`` and the dense tasks accept, a killed run resumes exactly, bad input gets hpvit errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hpvit
from hpvit.cli import main
from hpvit.engine.recipe import load_recipe
from hpvit.tasks.adapt import AdaptTask
from helpers import random_timm_vit, fault_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 4-block random ViT with a 1000-class head (class token, as DeiT)."""
    p = tmp_path_factory.mktemp("src") / "vit.pth"
    torch.save(random_timm_vit(5, depth=4).state_dict(), p)
    return p


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """16 natural-ish images (smooth random colour fields) in nested folders, plus a non-image file."""
    d = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        low = torch.rand(3, 4, 5, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(48, 60), mode="bilinear")[0]
        sub = d / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(sub / f"{i}.jpg")
    (d / "notes.txt").write_text("not an image")
    return d


def _args(source, images, out, *extra):
    return ["adapt", "--init", str(source), "--images", str(images), "--out", str(out), "--img-size", "32",
            "--batch-size", "4", "--epochs", "2", "--workers", "0", "--lr", "1e-3", "--set", "warmup_epochs=0",
            "--set", "log_every_steps=2", *extra]


def test_adapt_lowers_the_objective_and_keeps_the_source_head(tmp_path, source, images):
    out = tmp_path / "run"
    assert main(_args(source, images, out, "--holdout", str(images))) == 0
    model = hpvit.load(out / "model.safetensors")
    assert model.num_classes == 1000  # the source's classifier, kept
    assert model.config.name == "paper-cls" and model.join and model.head_type == "token"  # class token kept
    src = torch.load(source, weights_only=True)
    # the head started as the source's (same class order) and moved only a little
    assert (model.head.weight - src["head.weight"]).abs().max() < 0.1
    res = json.loads((out / "results.json").read_text())
    assert 0 <= res["agree1"] <= 100 and res["feat_dist"] >= 0

    # the distillation loss on fixed images is lower after adaptation than at the start
    recipe = load_recipe("adapt").replace(img_size=32)
    task = AdaptTask(str(source), [str(images)], recipe)
    before = task.build_model().eval()
    x = torch.rand(8, 3, 32, 32)
    after = type(before)(model).eval()
    with torch.no_grad():
        l0 = sum(task.distill_losses(before, x).values())
        l1 = sum(task.distill_losses(after, x).values())
    assert l1 < l0, (l0, l1)

    # the adapted file fine-tunes like any hpvit file (the recipe's drop path is applied) and
    # becomes a dense backbone
    ft = hpvit.load(out / "model.safetensors")
    ft.set_drop_path_rate(0.2)
    assert ft.blocks[-1].drop_path1.p == pytest.approx(0.2)
    from hpvit.models.dense import build_dense_backbone

    with pytest.raises(hpvit.CheckpointError, match="hpvit.load"):  # a transformed file is not a plain checkpoint
        build_dense_backbone(str(out / "model.safetensors"), "paper-seg")
    bb = build_dense_backbone(hpvit.load(out / "model.safetensors"), "paper-seg")
    maps = bb(torch.rand(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]


def test_adapt_class_token_join(tmp_path, source, images):
    cfg = tmp_path / "join.json"
    cfg.write_text(json.dumps({"name": "join", "class_token": "join", "head": "auto"}))
    out = tmp_path / "run"
    assert main(_args(source, images, out, "--config", str(cfg), "--epochs", "1")) == 0
    model = hpvit.load(out / "model.safetensors")
    assert model.head_type == "token" and model.cls_token is not None


def _hpvit(args, env_extra=None):
    env = dict(os.environ, HPVIT_PLAIN_LOG="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "hpvit", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=str(ROOT))


def test_adapt_resumes_exactly_after_a_kill(tmp_path, source, images):
    extra = ["--set", "ckpt_every_steps=3", "--train-images", "12"]  # 3 steps per epoch, 6 in all
    full = _hpvit(_args(source, images, tmp_path / "full", *extra))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _hpvit(_args(source, images, tmp_path / "cut", *extra), fault_env(5))
    assert killed.returncode != 0 and not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = _hpvit(_args(source, images, tmp_path / "cut", *extra, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not diff, f"resumed weights differ in {diff[:5]}"


def test_adapt_bad_input(tmp_path, source, images, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_args(source, empty, tmp_path / "a")) == 2
    assert "no image files found" in capsys.readouterr().err

    headless = tmp_path / "headless.pth"
    torch.save(random_timm_vit(1, depth=4, num_classes=0).state_dict(), headless)
    assert main(_args(headless, images, tmp_path / "b")) == 2
    err = capsys.readouterr().err
    assert "no classifier head" in err and "--targets features" in err
    assert main(_args(headless, images, tmp_path / "b2", "--targets", "features", "--epochs", "1")) == 0

    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"class_token": "join", "window_sizes": [7, None, 7, None]}))
    assert main(_args(source, images, tmp_path / "c", "--config", str(cfg))) == 2
    assert "cannot take part in window attention" in capsys.readouterr().err

    assert main(_args(source, images, tmp_path / "d", "--config", "identity")) == 2
    assert "plain model itself" in capsys.readouterr().err
    assert main(_args(source, images, tmp_path / "e", "--targets", "pixels")) == 2
    assert "choose one or more of" in capsys.readouterr().err
