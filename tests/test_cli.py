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


def test_demo_offline_falls_back_to_a_random_vit_loudly(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--offline", "--out", str(out), "--img-size", "64"]) == 0
    text = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in text and "--offline given" in text
    assert "reuse report" in text and "stage4 (1/32)" in text
    assert "top-5 classes, plain ViT" in text and "top-5 classes, transformed (grid-cls" in text
    from PIL import Image

    im = Image.open(out)
    assert im.size[0] > 800 and im.size[1] > 400


def test_demo_uses_the_pretrained_deit_tiny_when_the_hub_answers(tmp_path, capsys, monkeypatch):
    """The online path, with a local file standing in for the download: real DeiT-Tiny weights when the shared
    data has them (then the photo's classes are checked too), else a random ViT of the same shape. The
    plain top-5 the demo prints must be timm's own model's top-5 on the same input."""
    import timm

    import hpvit.checkpoints as ck
    from hpvit.cli import demo as cc
    from conftest import SHARED

    real = SHARED / "deit_tiny" / "deit_tiny_patch16_224.pth"
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    if real.is_file():
        ref.load_state_dict(torch.load(real, weights_only=True))
    else:
        ref = random_timm_vit(depth=12, name="deit_tiny_patch16_224")
    sd = ref.state_dict()
    calls = []

    def download(name):
        calls.append(name)
        return {k: v.clone() for k, v in sd.items()}, f"timm:{name}"

    monkeypatch.setattr(ck, "_from_hub", download)
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert calls == [cc.DEMO_HUB_MODEL] and "RANDOM" not in text and "timm's pretrained DeiT-Tiny" in text
    assert "grace_hopper.jpg" in text  # a real photo shipped by matplotlib, a dependency
    from types import SimpleNamespace

    img, _ = cc._demo_input(SimpleNamespace(image=None), 224)
    with torch.no_grad():
        want = [n for n, _ in cc.top5(ref(cc.demo_tensor(img)[1]), cc.class_names(1000))]
    block = text.split("top-5 classes, plain ViT")[1].split("top-5 classes, transformed")[0]
    got = [ln.split("%", 1)[1].strip() for ln in block.strip().splitlines()[1:]]
    assert got == want
    if real.is_file():
        assert "military uniform" in got  # Grace Hopper in her US Navy uniform
    else:
        print(f"photo's classes not checked: {real} is absent (random stand-in weights)")


def test_convert_and_info_real_deit(tmp_path, capsys, deit_tiny_path):
    before = _sha(deit_tiny_path)
    out = tmp_path / "deit_tiny_hpvit.safetensors"
    assert main(["convert", str(deit_tiny_path), "-o", str(out), "--config", "paper-cls"]) == 0
    text = capsys.readouterr().out
    assert "format: timm" in text and text.count("format:") == 1 and "dim=192, depth=12, heads=3" in text
    assert "reused :  152 tensors" in text  # every encoder tensor and the class token (joined at block 5)
    assert _sha(deit_tiny_path) == before
    m = hpvit.load(out)
    assert m.config.name == "paper-cls" and m.num_classes == 1000
    # refuses to overwrite, keeps the existing file intact
    sha_out = _sha(out)
    assert main(["convert", str(deit_tiny_path), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _sha(out) == sha_out
    assert main(["convert", "--model", str(deit_tiny_path), "-o", str(out), "--overwrite", "--config", "paper-seg"]) == 0
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
    assert main(["convert", str(tmp_path / "t.pth"), "-o", str(out), "--overwrite", "--spec", "bogus"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


# ------------------------------------------------------------------ one flag vocabulary (docs/cli.md)
def _commands():
    """``(name, parser)`` of every runnable subcommand, walking the subparsers (``"train cls"``, ``"info"``...)."""
    import argparse

    from hpvit.cli import build_parser

    def walk(p, path):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield " ".join(path), p
        for a in subs:
            for name, sp in a.choices.items():
                yield from walk(sp, path + (name,))

    return dict(walk(build_parser(), ()))


# old name -> (a command that had it, the new name, a value); every one must still work
OLD_NAMES = [
    ("convert", "--force", "--overwrite", None), ("export", "--force", "--overwrite", None),
    ("train cls", "--init", "--model", "m.pth"), ("train det", "--init", "--model", "m.pth"),
    ("train seg", "--init", "--model", "m.pth"), ("adapt", "--init", "--model", "m.pth"),
    ("demo", "--checkpoint", "--model", "m.pth"),
    ("train det", "--images", "--data", "imgs"), ("eval det", "--images", "--data", "imgs"),
    ("adapt", "--images", "--data", "imgs"), ("adapt", "--holdout", "--eval-data", "held"),
    ("train det", "--val-ann", "--eval-ann", "v.json"), ("train det", "--val-images-dir", "--eval-data", "vimgs"),
    ("train seg", "--val-split", "--eval-split", "test"),
    ("info", "--similarity", "--data", "imgs"), ("info", "--max-images", "--eval-images", "8"),
    ("train cls", "--max-train-samples", "--train-images", "8"), ("train cls", "--max-eval-samples", "--eval-images", "8"),
    ("eval cls", "--max-eval-samples", "--eval-images", "8"), ("eval cls", "--json", "--out", "m.json"),
    ("bench", "--json", "--out", "b.json"),
    ("train det", "--val-images", "--eval-images", "0:8"),
    ("eval det", "--val-images", "--eval-images", "0:8"), ("train seg", "--max-train-images", "--train-images", "8"),
    ("train seg", "--max-val-images", "--eval-images", "8"), ("eval seg", "--max-val-images", "--eval-images", "8"),
]
SCHEDULE = {"--epochs", "--img-size", "--batch-size", "--accum-steps", "--blr", "--lr", "--warmup-epochs", "--layer-decay",
            "--drop-path", "--amp", "--ema", "--grad-checkpointing", "--workers", "--seed", "--deterministic",
            "--eval-every", "--ckpt-every-steps", "--set", "--resume", "--overwrite", "--threads", "--device"}
TRAINING = ("train cls", "train det", "train seg", "adapt")


def _visible(p):
    import argparse

    return [a for a in p._actions if a.help != argparse.SUPPRESS]


def test_one_flag_vocabulary_across_every_subcommand():
    import argparse

    cmds = _commands()
    assert set(TRAINING) | {"demo", "convert", "info", "export", "bench", "eval cls", "eval det", "eval seg",
                            "predict"} == set(cmds)
    old = {o for _, o, _, _ in OLD_NAMES}
    device_help = {}
    for name, p in cmds.items():
        flags = {o: a for a in _visible(p) for o in a.option_strings}
        for a in _visible(p):  # every visible flag and argument says what it does
            assert a.help and len(a.help) > 8, (name, a.option_strings or a.dest)
        assert not old & set(flags), (name, old & set(flags))  # old names are hidden from --help
        if name != "bench":  # the model a command reads is --model (MODEL, the first argument, is the same)
            assert "--model" in flags, name
        for f, a in flags.items():
            if f.endswith("-images") and a.nargs != 0:  # a *-images flag with a value is a count (N, or a slice A:B)
                assert a.metavar in ("N", "N|A:B") and a.nargs is None, (name, f)
                conv = a.type or str
                assert str(conv("3")) == "3", (name, f)
            if f in ("--data", "--eval-data"):  # ... and image sources are --data / --eval-data
                assert a.type is None, (name, f)
        for f in ("--threads", "--device"):
            if f in flags and name != "bench":
                device_help.setdefault(f, set()).add(flags[f].help)
    assert {f: len(h) for f, h in device_help.items()} == {"--threads": 1, "--device": 1}  # worded once
    assert {"--overwrite"} <= set(flag for a in _visible(cmds["convert"]) for flag in a.option_strings)
    for name, p in cmds.items():  # what a command writes is --out, with -o for short, in every command
        if "--out" in p._option_string_actions:
            assert p._option_string_actions["--out"].option_strings == ["-o", "--out"], name
    for name in TRAINING:  # det, seg, cls and adapt take the same schedule flags
        have = {o for a in _visible(cmds[name]) for o in a.option_strings}
        assert SCHEDULE <= have, (name, SCHEDULE - have)
    for name in ("train cls", "train det", "train seg"):
        assert {o for a in cmds[name]._actions for o in a.option_strings if o in SCHEDULE} == SCHEDULE
    assert isinstance(cmds["info"]._option_string_actions["--eval-images"], argparse.Action)


@pytest.mark.parametrize("cmd,old,new,value", OLD_NAMES, ids=[f"{c}:{o}" for c, o, _, _ in OLD_NAMES])
def test_old_flag_names_still_work_with_a_note(cmd, old, new, value, capsys):
    from hpvit.cli import build_parser

    required = {"convert": {"-o": "x.safetensors"}, "export": {"-o": "x.onnx"},
                "train cls": {"--model": "m", "--data": "d", "--out": "o"}, "adapt": {"--model": "m", "--data": "d", "--out": "o"},
                "eval cls": {"--model": "m", "--data": "d"}, "eval det": {"--model": "m", "--ann": "a", "--data": "d"},
                "eval seg": {"--model": "m", "--data": "d"}}.get(cmd, {})
    base = cmd.split() + [x for f, v in required.items() if f != new for x in (f, v)]
    def parse(flag):
        return vars(build_parser().parse_args(base + [flag] + ([value] if value is not None else [])))

    got_new = parse(new)
    assert capsys.readouterr().err == ""
    got_old = parse(old)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{old} is the old name of {new}" in err
    assert got_old == got_new


def test_required_flag_given_by_its_old_name_or_missing(tmp_path, capsys):
    with pytest.raises(SystemExit):  # neither --model nor --init: argparse's usage error
        main(["adapt", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "required: --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info"])
    assert "MODEL (or --model MODEL)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", "a.pth", "--model", "b.pth"])
    assert "given twice" in capsys.readouterr().err


def test_unknown_config_or_recipe_is_reported_before_anything_is_read(tmp_path, capsys):
    missing = tmp_path / "never-read.pth"  # the name is checked first: this missing file is not reached
    assert main(["info", str(missing), "--config", "paper-clss"]) == 2
    err = capsys.readouterr().err
    assert "unknown config preset" in err and "did you mean 'paper-cls'?" in err and "never-read" not in err
    assert main(["train", "cls", "--model", str(missing), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--recipe", "cifar-mni"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe" in err and "did you mean 'cifar-mini'?" in err
    assert not (tmp_path / "o").exists()


def test_info_similarity_shows_progress(tmp_path, tiny_vit_sd, capsys):
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(d / f"{i}.jpg")
    assert main(["info", str(tiny_vit_sd), "--img-size", "64", "--data", str(d)]) == 0
    cap = capsys.readouterr()
    assert "similarity to the plain model on 2 image(s)" in cap.out
    for step in ("info --data 1/3: building the plain model", "info --data 2/3: decoding 2 image(s)",
                 "info --data 3/3: running both models on 2 image(s) at 64 px"):
        assert step in cap.err, cap.err
