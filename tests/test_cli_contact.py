"""Issue 29 (part B): what a command writes never replaces what it reads, defaults that follow the README's
recommendation, and flags that are never guessed."""

from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image

import hpvit
from hpvit.cli import build_parser, main
from hpvit.config import RECOMMENDED, presets_for


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def small_model(tmp_path, small_vit_init):
    """An hpvit classifier file converted from the 4-block, 64-wide ViT (no command run)."""
    p = tmp_path / "m.safetensors"
    hpvit.save(hpvit.from_plain(str(small_vit_init), "grid-cls"), p)
    return p


def _one_line_error(capsys, *words) -> str:
    """The one ``hpvit: error:`` line a refused command ends with (progress lines may come before it)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("hpvit: error: ") and "Traceback" not in err, err
    assert sum(ln.startswith("hpvit: error:") for ln in lines) == 1, err
    for w in words:
        assert w in lines[-1], (w, err)
    return err


# ------------------------------------------------------------------ defect 7: export onto the model it reads
def test_export_never_writes_onto_the_model_it_reads(tmp_path, small_model, capsys):
    before = _sha(small_model)
    assert main(["export", str(small_model), "-o", str(small_model), "--overwrite"]) == 2
    _one_line_error(capsys, str(small_model), ".onnx")
    link = tmp_path / "link.onnx"  # the same file by another name, with the right suffix
    link.symlink_to(small_model)
    assert main(["export", str(small_model), "-o", str(link), "--overwrite"]) == 2
    _one_line_error(capsys, "the model being exported", "even with --overwrite")
    other = tmp_path / "other.safetensors"  # another model: an .onnx file must not replace it either
    other.write_bytes(small_model.read_bytes())
    assert main(["export", str(small_model), "-o", str(other), "--overwrite"]) == 2
    _one_line_error(capsys, "must end in .onnx")
    assert _sha(small_model) == before and _sha(other) == before


def test_convert_and_export_share_one_output_rule(tmp_path, small_vit_init, capsys):
    """convert refuses the source as its output before reading it (the same rule and words as export)."""
    src = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file(torch.load(small_vit_init, weights_only=True), src)
    before = _sha(src)
    assert main(["convert", str(src), "-o", str(src), "--overwrite"]) == 2
    err = _one_line_error(capsys, "the checkpoint being converted", "even with --overwrite")
    assert "reading" not in err and _sha(src) == before


# ------------------------------------------------------------------ defect 6: demo --out
def test_demo_out_never_replaces_its_input_or_an_existing_file(tmp_path, small_vit_init, capsys):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(photo)
    keep = {photo: _sha(photo), small_vit_init: _sha(small_vit_init)}
    base = ["demo", "--model", str(small_vit_init), "--image", str(photo), "--img-size", "64"]
    for extra in ([], ["--overwrite"]):  # the input photo itself, even with --overwrite
        assert main(base + ["--out", str(photo)] + extra) == 2
        _one_line_error(capsys, "the input image (--image)", str(photo))
    assert main(base + ["--out", str(small_vit_init), "--overwrite"]) == 2  # a model file
    _one_line_error(capsys, "must end in .png")
    earlier = tmp_path / "earlier.png"
    earlier.write_bytes(photo.read_bytes())
    keep[earlier] = _sha(earlier)
    assert main(base + ["-o", str(earlier)]) == 2  # anything already there, without --overwrite
    _one_line_error(capsys, "exists", "--overwrite")
    assert {p: _sha(p) for p in keep} == keep


# ------------------------------------------------------------------ weak answers of convert
def test_convert_num_classes_has_a_sane_bound(tmp_path, small_vit_init, capsys):
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit) as e:  # refused while parsing: nothing is allocated
        main(["convert", str(small_vit_init), "-o", str(out), "--num-classes", "1000000000"])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "--num-classes" in err and "100,000" in err and "Traceback" not in err
    args = build_parser().parse_args(["convert", "m.pth", "-o", "x.safetensors", "--num-classes", "21841"])
    assert args.num_classes == 21841  # ImageNet-21k still fits


def test_convert_refuses_a_source_that_changes_while_it_is_read(tmp_path, small_vit_init, monkeypatch, capsys):
    import hpvit.checkpoints as ck

    src = tmp_path / "growing.pth"
    src.write_bytes(small_vit_init.read_bytes())
    read = ck.load_plain

    def read_then_change(*a, **k):  # another program still writing the file while convert reads it
        plain = read(*a, **k)
        with open(src, "ab") as f:
            f.write(b"more")
        return plain

    monkeypatch.setattr(ck, "load_plain", read_then_change)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), "-o", str(out)]) == 2
    _one_line_error(capsys, "changed while it was being converted", "nothing was written")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "hpvit-tmp" in p.name]


# ------------------------------------------------------------------ first contact 1: defaults and help
def test_defaults_and_help_follow_the_recommendation(small_vit_init, capsys):
    import argparse

    p = build_parser()
    cmds = {"convert": ["convert", "m.pth", "-o", "x.safetensors"], "export": ["export", "m.pth", "-o", "x.onnx"],
            "train cls": ["train", "cls", "--model", "m", "--data", "d", "--out", "o"],
            "train det": ["train", "det", "--dry-run"], "train seg": ["train", "seg", "--dry-run"]}
    for name, argv in cmds.items():
        task = name.split()[-1] if name.startswith("train") else "cls"
        if name == "train cls":  # None: a file hpvit wrote keeps its stored config; a plain checkpoint gets the default
            from hpvit.tasks.classification import DEFAULT_CONFIG

            assert p.parse_args(argv).config is None and DEFAULT_CONFIG == RECOMMENDED[task], name
            continue
        assert p.parse_args(argv).config == RECOMMENDED[task], name
    sub = {a.dest: a for a in p._actions if isinstance(a, argparse._SubParsersAction)}["command"].choices
    helps = {n: sub[n]._option_string_actions["--config"].help for n in ("convert", "info", "export", "demo", "adapt")}
    for verb in ("train", "eval"):
        tasks = {a.dest: a for a in sub[verb]._actions if isinstance(a, argparse._SubParsersAction)}["task"].choices
        helps.update({f"{verb} {t}": tp._option_string_actions["--config"].help for t, tp in tasks.items()
                      if "--config" in tp._option_string_actions})
    assert {"train cls", "train det", "train seg"} <= set(helps)
    for name, text in helps.items():  # written from the registry: every grid preset of the task is listed
        task = name.split()[-1] if name.split()[-1] in ("det", "seg") else "cls"
        for preset in presets_for(task):
            assert preset in text, (name, preset)
    assert main(["info", str(small_vit_init), "--img-size", "64"]) == 0  # info builds the recommended preset
    assert f"config: {RECOMMENDED['cls']} " in capsys.readouterr().out


# ------------------------------------------------------------------ first contact 2, 3, 7: train cls
def _folder(root, classes=("a", "b"), n=2):
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (40, 40), (60 * i, 90, 30)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("config", ["grid-seg", "paper-det"])
def test_train_cls_refuses_a_dense_preset_naming_the_classifier_presets(tmp_path, small_vit_init, config, capsys):
    data, out = _folder(tmp_path / "d"), tmp_path / "run"
    rc = main(["train", "cls", "--model", str(small_vit_init), "--config", config, "--data", str(data), "--out", str(out),
               "--threads", "1", "--workers", "0"])
    assert rc == 2 and not out.exists()
    _one_line_error(capsys, f"--config {config}", "no classifier head", *presets_for("cls"))


def test_train_cls_refuses_a_single_class(tmp_path, small_vit_init, capsys):
    data, out = _folder(tmp_path / "d", classes=("only",)), tmp_path / "run"
    rc = main(["train", "cls", "--model", str(small_vit_init), "--data", str(data), "--out", str(out),
               "--img-size", "32", "--threads", "1", "--workers", "0"])
    assert rc == 2 and not (out / "results.json").exists()
    err = capsys.readouterr().err
    assert "hpvit: error:" in err and "at least 2 classes" in err and "'only'" in err and "top1" not in err


def test_a_wrong_model_path_is_the_first_thing_said(tmp_path, capsys):
    data, out = _folder(tmp_path / "d"), tmp_path / "run"
    assert main(["train", "cls", "--model", str(tmp_path / "typo.pth"), "--data", str(data), "--out", str(out)]) == 2
    err = _one_line_error(capsys, "--model", "typo.pth", "no such file")
    assert err.startswith("hpvit: error:")  # said first: no recipe line naming a folder before it
    assert not out.exists()


# ------------------------------------------------------------------ first contact 4: flags are never guessed
def test_abbreviated_or_mistyped_flags_are_refused_with_the_closest_flag(capsys):
    base = ["train", "cls", "--model", "m", "--data", "d", "--out", "o"]
    for typed, meant in (("--epoch", "--epochs"), ("--train-image", "--train-images"), ("--epocs", "--epochs"),
                         ("--learning-rate", None)):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(base + [typed, "3"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"unrecognized arguments: {typed} 3" in err, err
        assert (f"did you mean {meant}" in err) if meant else ("did you mean" not in err), err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "m.pth", "-o", "x.safetensors", "--num-class", "3"])
    assert "did you mean --num-classes" in capsys.readouterr().err
    assert build_parser().parse_args(base + ["--epochs", "3"]).epochs == 3
    assert "_hpvit_did_you_mean" not in vars(build_parser().parse_args(base))


def test_every_parser_refuses_abbreviations():
    import argparse

    def walk(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    yield from walk(sp)

    parsers = list(walk(build_parser()))
    assert len(parsers) > 10 and all(p.allow_abbrev is False for p in parsers)


# ------------------------------------------------------------------ first contact 5: one output flag
def test_eval_cls_writes_with_out_and_json_is_its_old_name(capsys):
    base = ["eval", "cls", "--model", "m", "--data", "d"]
    assert build_parser().parse_args(base + ["-o", "r.json"]).json == "r.json"
    assert build_parser().parse_args(base + ["--json", "r.json"]).json == "r.json"
    assert "--json is the old name of --out" in capsys.readouterr().err
    for argv in (["train", "cls", "--model", "m", "--data", "d"], ["train", "det", "--dry-run"],
                 ["train", "seg", "--dry-run"], ["adapt", "--model", "m", "--data", "d"], ["eval", "det", "--model", "m",
                 "--ann", "a", "--data", "d"], ["eval", "seg", "--model", "m", "--data", "d"]):
        assert build_parser().parse_args(argv + ["-o", "somewhere"]).out == "somewhere", argv

