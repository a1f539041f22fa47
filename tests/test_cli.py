"""The command line as a user runs it: demo, convert, info, and their errors."""

from __future__ import annotations

import hashlib

import pytest
import torch

import hpvit
from hpvit.cli import main
from helpers import random_timm_vit


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_demo_random_vit_writes_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--img-size", "128"]) == 0
    text = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in text
    assert "reuse report" in text and "stage4 (1/32)" in text
    from PIL import Image

    im = Image.open(out)
    assert im.size[0] > 800 and im.size[1] > 200


def test_convert_and_info_real_deit(tmp_path, capsys, deit_tiny_path):
    before = _sha(deit_tiny_path)
    out = tmp_path / "deit_tiny_hpvit.safetensors"
    assert main(["convert", str(deit_tiny_path), "-o", str(out), "--config", "paper-cls"]) == 0
    text = capsys.readouterr().out
    assert "detected format: timm" in text and "dim=192, depth=12, heads=3" in text
    assert "reused :  152 tensors" in text  # every encoder tensor and the class token (joined at block 5)
    assert _sha(deit_tiny_path) == before
    m = hpvit.load(out)
    assert m.config.name == "paper-cls" and m.num_classes == 1000
    # refuses to overwrite, keeps the existing file intact
    sha_out = _sha(out)
    assert main(["convert", str(deit_tiny_path), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert _sha(out) == sha_out
    assert main(["convert", str(deit_tiny_path), "-o", str(out), "--force", "--config", "paper-seg"]) == 0
    assert hpvit.load(out).config.name == "paper-seg"
    capsys.readouterr()
    assert main(["info", str(deit_tiny_path), "--config", "paper-cls", "--img-size", "224"]) == 0
    text = capsys.readouterr().out
    for s in ("stage1 (1/4)", "56x56", "7x7", "global", "GFLOPs", "total", "reuse report"):
        assert s in text
    assert main(["info", str(out)]) == 0  # an hpvit file works too


def test_info_flops_match_flop_counter(tmp_path, capsys):
    from hpvit.analysis import stage_table
    from torch.utils.flop_counter import FlopCounterMode

    m = hpvit.from_plain(random_timm_vit(depth=4).state_dict(), "paper-cls").eval()
    rows, totals = stage_table(m, 96)
    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc:
        m(torch.zeros(1, 3, 96, 96))
    assert abs(totals["gflops"] * 1e9 - fc.get_total_flops()) < 1
    assert abs(sum(r.gflops for r in rows) - totals["gflops"]) < 1e-6
    assert rows[1].gflops > rows[2].gflops > 0  # the 1/4 stage costs the most


def test_cli_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["convert", str(bad), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "broken.pth" in err and "corrupt" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["info", str(tmp_path / "missing.pth")]) == 2
    assert "no such file" in capsys.readouterr().err
    sd = random_timm_vit(depth=4).state_dict()
    torch.save(sd, tmp_path / "ok.pth")
    assert main(["convert", str(tmp_path / "ok.pth"), "-o", str(tmp_path / "y.pth")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "ok.pth"), "-o", str(tmp_path / "y.safetensors"), "--config", "nope"]) == 2
    assert "unknown config preset" in capsys.readouterr().err


def test_convert_spec_overrides(tmp_path, capsys):
    ref = random_timm_vit(depth=4)  # ViT-Tiny: 3 heads
    torch.save(ref.state_dict(), tmp_path / "t.pth")
    out = tmp_path / "t.safetensors"
    assert main(["convert", str(tmp_path / "t.pth"), "-o", str(out), "--spec", "num_heads=6", "--spec", "act=gelu_tanh"]) == 0
    m = hpvit.load(out)
    assert m.spec.num_heads == 6 and m.spec.act == "gelu_tanh" and m.blocks[0].attn.num_heads == 6
    assert main(["convert", str(tmp_path / "t.pth"), "-o", str(out), "--force", "--spec", "bogus"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
