"""Bad input and faults of issue 20: hostile or edited files, careless arguments, full disks and kills.
Every case ends in an hpvit error naming the problem, the file and the fix, and nothing the user had is lost.
Each hostile file is built inside its test; models are tiny random timm ViTs."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import hpvit
from hpvit.cli import main
from hpvit.errors import BadImageError, CheckpointError, ConfigError, InputError, OutputError

ROOT = Path(__file__).resolve().parents[1]


def _timm_sd(depth: int = 4) -> dict[str, torch.Tensor]:
    from helpers import random_timm_vit

    return random_timm_vit(0, depth=depth, embed_dim=64, num_heads=2, img_size=32, num_classes=3).state_dict()


@pytest.fixture(scope="module")
def small_pth(tmp_path_factory) -> Path:
    from helpers import save_small_vit

    return save_small_vit(tmp_path_factory.mktemp("small") / "small_vit.pth", img_size=32)


def _rgb(path: Path, seed: int = 0, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------ defect 1: integer weights
def test_integer_weight_is_refused_naming_the_tensor(tmp_path):
    sd = _timm_sd()
    sd["blocks.0.attn.qkv.weight"] = (sd["blocks.0.attn.qkv.weight"] * 100).to(torch.int32)
    p = tmp_path / "int.safetensors"
    save_file(sd, p)
    with pytest.raises(CheckpointError, match=r"int\.safetensors: 1 weight tensor\(s\) are not floating point, e\.g\. "
                                              r"\['blocks\.0\.attn\.qkv\.weight \(int32\)'\]"):
        hpvit.load_plain(p)
    out = tmp_path / "o.safetensors"
    assert main(["convert", str(p), "-o", str(out), "--config", "paper-cls"]) == 2
    assert not out.exists()


# ------------------------------------------------------------------ defect 2: zip members outside the archive
@pytest.mark.parametrize("member", ["../../x.jpg", "train/cat/../../../../ESCAPE_cat.jpg", "/ABS.jpg"])
def test_zip_members_with_dotdot_or_absolute_names_are_refused(tmp_path, member):
    from hpvit.data import ImageFolderSource

    img = _rgb(tmp_path / "i.jpg").read_bytes()
    z = tmp_path / "d.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for n in ("train/cat/0.jpg", "train/dog/0.jpg", "val/cat/0.jpg", "val/dog/0.jpg"):
            zf.writestr(n, img)
        zf.writestr(zipfile.ZipInfo(member), img)  # ZipInfo keeps the name as given (zf.write would clean it)
    with pytest.raises(ConfigError, match=r"d\.zip: 1 member name\(s\) of the zip point outside") as e:
        ImageFolderSource(z)
    assert repr(member) in str(e.value) and "Re-create the zip" in str(e.value)


# ------------------------------------------------------------------ defect 3: 16-bit grayscale
def test_16bit_grayscale_is_scaled_not_clipped_to_white(tmp_path):
    from hpvit.data.images import decode_image

    a = (np.arange(32 * 32, dtype=np.int64).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")  # what PIL reads: 16-bit grayscale
    got = np.asarray(decode_image(p))
    assert got.shape == (32, 32, 3)
    want = np.round(a / 257.0).astype(np.uint8)  # the full 16-bit range onto 0..255
    assert (got == want[..., None]).all()
    assert len(np.unique(got)) == 256  # every grey level, not solid white (PIL's convert clips all above 255)
    # a 32-bit float image has no declared range: refused, naming the file
    f = tmp_path / "f32.tiff"
    Image.fromarray(a.astype(np.float32)).save(f)
    with pytest.raises(BadImageError, match=r"f32\.tiff holds 32-bit float grayscale pixels"):
        decode_image(f)


# ------------------------------------------------------------------ defect 4: COCO boxes outside the image
@pytest.mark.parametrize("box", [[1e6, 1e6, 10, 10], [-50, 2, 10, 10], [2, 20, 5, 5]])
def test_coco_box_outside_its_image_is_refused(tmp_path, box):
    from hpvit.data.coco import CocoFormatError, CocoSource

    _rgb(tmp_path / "imgs" / "a.jpg", size=20)
    ann = {"images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 20}],
           "categories": [{"id": 1, "name": "thing"}],
           "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": box,
                            "segmentation": [[5, 5, 15, 5, 15, 15]]}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    with pytest.raises(CocoFormatError, match=r"ann\.json: annotation id 7 \(image a\.jpg\) has bbox .* lies entirely "
                                              r"outside the 20x20 image"):
        CocoSource(tmp_path / "ann.json", tmp_path / "imgs")


# ------------------------------------------------------------------ defects 6, 7: ONNX writes
class _Program:
    """Stands in for the ONNXProgram ``torch.onnx.export`` returns (test_export.py runs the real exporter): these
    tests are about how the file is written, and ``save`` is where a full disk or a kill strikes."""

    def __init__(self, fail: "int | None" = None):
        self.fail = fail

    def save(self, path, *a, **k):
        Path(path).write_bytes(b"\x08\x01partial")
        if self.fail == signal.SIGKILL:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        Path(path).write_bytes(b"\x08\x01complete onnx")


def test_export_on_a_full_disk_leaves_no_onnx_and_names_it(tmp_path, monkeypatch):
    from hpvit.export import export_onnx

    model = hpvit.from_plain(_timm_sd(), "paper-cls")
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: _Program(errno.ENOSPC))
    out = tmp_path / "m.onnx"
    with pytest.raises(OutputError, match=rf"cannot write {out}: the disk is full"):
        export_onnx(model, out, img_size=32)
    assert list(tmp_path.iterdir()) == []  # no corrupt .onnx, no temp file: the re-run is not refused
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: _Program())
    export_onnx(model, out, img_size=32)
    assert out.read_bytes() == b"\x08\x01complete onnx"


def test_export_force_killed_mid_write_keeps_the_old_onnx(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"OLD ONNX FILE")
    script = (
        "import signal, sys, torch, hpvit\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from test_faults import _Program, _timm_sd\n"
        "torch.onnx.export = lambda *a, **k: _Program(signal.SIGKILL)\n"
        "hpvit.export.export_onnx(hpvit.from_plain(_timm_sd(), 'paper-cls'), sys.argv[1], img_size=32, force=True)\n"
    )
    p = subprocess.run([sys.executable, "-c", script, str(out), str(ROOT / "tests")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert out.read_bytes() == b"OLD ONNX FILE"  # the kill hit the temp file; the old export is intact


# ------------------------------------------------------------------ defect 9: convert X -o X --force
def test_convert_onto_its_own_source_is_refused_and_the_source_kept(tmp_path, capsys):
    src = tmp_path / "vit.safetensors"
    save_file(_timm_sd(), src)
    before = src.read_bytes()
    assert main(["convert", str(src), "-o", str(src), "--force"]) == 2
    err = capsys.readouterr().err
    assert "is the checkpoint being converted" in err and "would destroy it" in err and str(src) in err
    assert src.read_bytes() == before
    link = tmp_path / "link.safetensors"  # the same file by another name
    link.symlink_to(src)
    assert main(["convert", str(src), "-o", str(link), "--force"]) == 2
    assert src.read_bytes() == before


# ------------------------------------------------------------------ defect 10: num_classes
@pytest.mark.parametrize("nc", [-1, 2.5, "3", True])
def test_from_plain_refuses_a_bad_num_classes(nc):
    with pytest.raises(ConfigError, match=rf"num_classes must be an integer >= 0 .*got {nc!r}"):
        hpvit.from_plain(_timm_sd(), "paper-cls", num_classes=nc)


def test_from_plain_num_classes_zero_and_numpy_int_still_work():
    sd = _timm_sd()
    assert hpvit.from_plain(sd, "paper-cls", num_classes=0)(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    assert hpvit.from_plain(sd, "paper-cls", num_classes=np.int64(5))(torch.randn(1, 3, 32, 32)).shape == (1, 5)


# ------------------------------------------------------------------ weak answers: checkpoints
@pytest.mark.parametrize("first", list("abehjqrstuNQR"))
def test_text_file_as_checkpoint_is_a_clean_error(tmp_path, first):
    p = tmp_path / "notes.pth"
    p.write_text(first + "ello, these are my notes\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth: cannot read the file .*not a PyTorch/safetensors"):
        hpvit.load_plain(p)


def test_hf_shard_index_names_the_missing_shard(tmp_path):
    from hpvit.checkpoints.io import read_folder_or_file

    sd = _timm_sd()
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    merged = read_folder_or_file(str(tmp_path))  # both shards present: every tensor, merged
    assert sorted(merged) == keys and all(torch.equal(merged[k], sd[k]) for k in keys)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index\.json: 1 of 2 shard file\(s\) it lists are missing .*"
                                              r"\['model-00002-of-00002\.safetensors'\]; the download is incomplete"):
        hpvit.load_plain(tmp_path)


def _saved(tmp_path) -> Path:
    return Path(hpvit.save(hpvit.from_plain(_timm_sd(), "paper-cls"), tmp_path / "m.safetensors"))


def test_hpvit_format_version_is_checked(tmp_path):
    from safetensors import safe_open

    good = _saved(tmp_path)
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    bad = tmp_path / "v99.safetensors"
    save_file(load_file(good), bad, metadata={**meta, "hpvit_format": "99"})
    with pytest.raises(CheckpointError, match=r"v99\.safetensors: written in hpvit file format '99', but this hpvit "
                                              r"reads format '1'"):
        hpvit.load(bad)


def test_hpvit_load_of_a_plain_pth_points_to_load_plain(tmp_path, small_pth):
    with pytest.raises(CheckpointError, match=r"small_vit\.pth: .*hpvit\.load_plain\(path\) or hpvit\.from_plain"):
        hpvit.load(small_pth)


@pytest.mark.parametrize("err, expect", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "the file system is read-only")])
def test_safetensors_write_failures_are_one_hpvit_line(tmp_path, monkeypatch, capsys, small_pth, err, expect):
    import safetensors.torch as st
    from safetensors import SafetensorError

    real = st.save_file

    def failing(tensors, filename, metadata=None):
        real(tensors, filename, metadata)
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(err)} (os error {err})")

    monkeypatch.setattr("hpvit.export.save_file", failing)
    out = tmp_path / "o.safetensors"
    assert main(["convert", str(small_pth), "-o", str(out)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("hpvit: error: cannot write") and str(out) in line and expect in line
    assert not out.exists() and not list(tmp_path.glob("*.hpvit-tmp"))


def test_export_of_a_detector_file_with_an_edited_description_is_a_clear_error(tmp_path, capsys):
    """(Real detector files export their backbone's pyramid: tests/test_cli.py.) A description that lost its
    keys names the file and what to do, instead of a KeyError."""
    from safetensors.torch import save_file as sf

    p = tmp_path / "det.safetensors"  # what `hpvit train det` writes: weights + an 'hpvit_dense' description
    sf({"x": torch.zeros(1)}, p, metadata={"hpvit_dense": json.dumps({"task": "det"})})
    assert main(["export", str(p), "-o", str(tmp_path / "d.onnx")]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "'hpvit_dense' description is incomplete" in err and "hpvit train det" in err


# ------------------------------------------------------------------ weak answers: model inputs
@pytest.mark.parametrize("x, got", [([torch.randn(3, 32, 32)], "a list"),
                                    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "a torch.uint8 tensor")])
def test_model_called_with_a_list_or_uint8_is_an_input_error(x, got):
    m = hpvit.from_plain(_timm_sd(), "paper-cls")
    with pytest.raises(InputError, match=rf"expected a float tensor of images \(B, C, H, W\), got {got}"):
        m(x)


# ------------------------------------------------------------------ training runs
def _folder(root: Path, classes=("a", "b"), n_train: int = 2, n_val: int = 1, size: int = 24) -> Path:
    k = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            for i in range(n):
                _rgb(root / split / c / f"{i}.png", k, size)
                k += 1
    return root


def _train(init: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "cls", "--init", str(init), "--data", str(data), "--out", str(out), "--recipe", "cifar-mini",
            "--img-size", "32", "--batch-size", "2", "--epochs", "1", "--workers", "0", "--threads", "1",
            "--set", "warmup_epochs=0", "--set", "log_every_steps=1", "--set", "auto_augment=null",
            "--set", "mixup=0", "--set", "cutmix=0", *extra]


def test_a_run_that_diverges_on_its_last_update_is_not_done(tmp_path, small_pth, capsys):
    data, out = _folder(tmp_path / "d", n_train=1), tmp_path / "run"  # 2 images, batch 2: one update
    assert main(_train(small_pth, data, out, "--lr", "1e6")) == 2
    err = capsys.readouterr().err
    assert "training diverged:" in err and "update 1" in err and "no checkpoint had been written yet" in err
    assert "done:" not in err and not (out / "results.json").exists() and not (out / "model.safetensors").exists()
    for ln in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(ln, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))  # strict JSON only


def _interrupt_after_update_1(init: Path, data: Path, out: Path) -> list[str]:
    """Train into ``out``, stopped (as by Ctrl-C) right after update 1 and its checkpoint; returns the arguments
    that resume it (more can be appended)."""
    from helpers import interrupt_after

    args = _train(init, data, out, "--set", "ckpt_every_steps=1", "--set", "log_every_steps=3")
    with interrupt_after(1):
        assert main(args) == 130
    assert (out / "checkpoint-last.pt").is_file() and not (out / "results.json").exists()
    return args + ["--resume"]


@pytest.fixture
def interrupted_run(tmp_path, small_pth):
    """(resume args maker, data, out) of a run of 4 updates stopped after its first one."""
    data, out = _folder(tmp_path / "d", n_train=4), tmp_path / "run"  # 8 images, batch 2: 4 updates
    args = _interrupt_after_update_1(small_pth, data, out)
    return (lambda *extra: args + list(extra)), data, out


def test_resume_refuses_other_data_init_config_or_recipe(tmp_path, interrupted_run, capsys):
    resume, data, out = interrupted_run
    other = _folder(tmp_path / "other", classes=("cat", "dog"), n_train=4)
    init2 = tmp_path / "init2.safetensors"
    save_file(_timm_sd(), init2)
    from hpvit.config import get_config

    cfg = tmp_path / "mine.json"  # a config file with one field changed
    cfg.write_text(json.dumps({**get_config("paper-cls").to_dict(), "name": "mine", "rel_pos": False}))
    cases = [(["--data", str(other)], ["task.data:", "task.classes: [\"a\", \"b\"] -> [\"cat\", \"dog\"]"]),
             (["--init", str(init2)], ["init:"]),
             (["--config", str(cfg)], ["model_config.rel_pos: true -> false"]),
             (["--set", "smoothing=0.3"], ["smoothing: 0.1 -> 0.3"])]
    before = (out / "checkpoint-last.pt").read_bytes()
    for extra, expect in cases:
        assert main(resume(*extra)) == 2, extra  # (the later of two flags wins)
        err = capsys.readouterr().err
        assert "cannot resume" in err and str(out) in err, err
        for e in expect:
            assert e in err, (e, err)
        assert (out / "checkpoint-last.pt").read_bytes() == before  # nothing of the run changed
    assert main(resume("--lr", "0.002")) == 0  # a changed lr stays allowed, with its note
    assert "resuming with changed lr" in capsys.readouterr().err


def test_resumed_run_logs_the_same_train_losses(tmp_path, interrupted_run, small_pth):
    resume, data, out = interrupted_run
    assert main(resume()) == 0  # its first logging window (updates 1..3) spans the resume point
    full = tmp_path / "full"
    assert main(_train(small_pth, data, full, "--set", "ckpt_every_steps=1", "--set", "log_every_steps=3")) == 0

    def losses(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]

    assert losses(out) == losses(full) and [s for s, _ in losses(full)] == [3, 4]


@pytest.mark.parametrize("value, expect", [("epochs=two", "epochs: expected int, got 'two'"),
                                           ("lr=fast", "lr: expected float | None, got 'fast'")])
def test_set_with_a_value_of_the_wrong_type_is_a_config_error(tmp_path, small_pth, capsys, value, expect):
    out = tmp_path / "run"
    assert main(_train(small_pth, _folder(tmp_path / "d"), out, "--set", value)) == 2
    err = capsys.readouterr().err
    assert "wrong value type for " + expect in err and "reads VALUE as JSON" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["bomb"])  # a text file takes the same path (test_robustness covers the decoder)
def test_demo_image_goes_through_the_guarded_decoder(tmp_path, capsys, monkeypatch, small_pth, kind):
    img = tmp_path / "in.png"
    if kind == "bomb":
        _rgb(img, size=40)
        monkeypatch.setenv("HPVIT_MAX_IMAGE_PIXELS", "500")
    else:
        img.write_text("not an image")
    out = tmp_path / "demo.png"
    assert main(["demo", "--checkpoint", str(small_pth), "--image", str(img), "--img-size", "32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"image {img}" in err and ("too large" if kind == "bomb" else "cannot be decoded") in err
    assert not out.exists()


# ================================================================== new cases (issue 20, part 2)
# ------------------------------------------------------------------ hpvit files someone edited
@pytest.mark.parametrize("change, expect", [
    ({"num_classes": "-1"}, "num_classes must be an integer >= 0"),
    ({"head_type": "xyz"}, "head_type 'xyz' is none of"),
])
def test_edited_hpvit_metadata_names_the_bad_field(tmp_path, change, expect):
    from safetensors import safe_open

    good = _saved(tmp_path)
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    bad = tmp_path / "edited.safetensors"
    save_file(load_file(good), bad, metadata={**meta, **change})
    with pytest.raises(CheckpointError, match=r"edited\.safetensors: the hpvit metadata .* is damaged .*" + expect):
        hpvit.load(bad)


def test_hpvit_file_with_integer_or_nan_tensors(tmp_path):
    good = _saved(tmp_path)
    sd = load_file(good)
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    key = next(k for k in sd if k.endswith("qkv.weight"))
    save_file({**sd, key: (sd[key] * 100).to(torch.int32)}, tmp_path / "int.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match=rf"int\.safetensors: 1 tensor\(s\) are not floating point, e\.g\. "
                                              rf"\['{key} \(int32\)'\], where the model holds float weights"):
        hpvit.load(tmp_path / "int.safetensors")
    save_file({**sd, key: torch.full_like(sd[key], float("nan"))}, tmp_path / "nan.safetensors", metadata=meta)
    with pytest.warns(UserWarning, match=rf"nan\.safetensors: 1 tensor\(s\) hold NaN or inf values, e\.g\. \['{key}'\]"):
        m = hpvit.load(tmp_path / "nan.safetensors")
    assert torch.isnan(m(torch.randn(1, 3, 32, 32))).all()  # what the warning announces


def test_training_checkpoint_edited_or_from_another_run(tmp_path, interrupted_run, small_pth, capsys):
    resume, data, out = interrupted_run
    ck_path = out / "checkpoint-last.pt"
    good = torch.load(ck_path, weights_only=True)
    edits = [({k: v for k, v in good.items() if k != "rng"}, r"incomplete or edited \(missing \['rng'\]\)"),
             ({**good, "global_step": -3}, r"invalid global_step=-3"),
             ({**good, "step_in_epoch": 999, "global_step": 999}, r"its position \(epoch 0, step 999, update 999\) is "
                                                                  r"not one of this run \(1 epoch\(s\) x 4 steps\)")]
    for st, expect in edits:
        torch.save(st, ck_path)
        assert main(resume()) == 2
        assert re.search(expect, capsys.readouterr().err)
    # another run's checkpoint copied in: its identity differs
    out2 = tmp_path / "run2"
    _interrupt_after_update_1(small_pth, _folder(tmp_path / "other", classes=("x", "y", "z")), out2)
    (out2 / "checkpoint-last.pt").replace(ck_path)
    assert main(resume()) == 2
    assert 'task.classes: ["x", "y", "z"] -> ["a", "b"]' in capsys.readouterr().err


def test_metrics_file_cut_short_or_edited(tmp_path, interrupted_run, capsys):
    resume, data, out = interrupted_run
    metrics = out / "metrics.jsonl"
    saved = metrics.read_text() if metrics.exists() else ""  # (nothing logged yet: the window is 3 updates)
    metrics.write_text("not json\n" + saved)
    assert main(resume()) == 2
    assert f"{metrics}: line 1 is not a metrics record ('not json')" in capsys.readouterr().err
    metrics.write_text(saved + '{"kind": "train", "epoch": 1, "st')  # killed while appending a line
    assert main(resume()) == 0
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in recs] == [("train", 3), ("train", 4), ("eval", 4)]


def test_metrics_path_that_is_a_folder_is_one_line(tmp_path, small_pth, capsys):
    out = tmp_path / "run"
    (out / "metrics.jsonl").mkdir(parents=True)
    assert main(_train(small_pth, _folder(tmp_path / "d"), out)) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out / 'metrics.jsonl'} (IsADirectoryError" in err and "Traceback" not in err


def test_out_inside_the_data_folder_is_refused(tmp_path, small_pth, capsys):
    data = _folder(tmp_path / "d")
    out = data / "train" / "new"  # its curves.png would be an image of a class 'new' for the next run
    assert main(_train(small_pth, data, out)) == 2
    assert f"--out {out} is inside the data folder {data}" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ inputs
def test_pixel_limit_that_is_not_a_number(tmp_path, monkeypatch):
    from hpvit.data.images import decode_image

    monkeypatch.setenv("HPVIT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ConfigError, match="HPVIT_MAX_IMAGE_PIXELS='lots' is not a number"):
        decode_image(_rgb(tmp_path / "i.png"))


@pytest.mark.parametrize("change, expect", [
    ({"file_name": "../x.jpg"}, r"image id 1 has file_name '\.\./x\.jpg', which points outside --data"),
    ({"file_name": "/etc/x.jpg"}, r"image id 1 has file_name '/etc/x\.jpg', which points outside --data"),
    ({"iscrowd": "yes"}, r"annotation id 7 \(image a\.jpg\) has iscrowd 'yes'; it must be 0 or 1"),
    ({"dup": True}, r"duplicate annotation id 7"),
])
def test_coco_file_names_crowd_flags_and_ids(tmp_path, change, expect):
    from hpvit.data.coco import CocoFormatError, CocoSource

    _rgb(tmp_path / "imgs" / "a.jpg", size=20)
    _rgb(tmp_path / "x.jpg", size=20)  # what '../x.jpg' would read
    ann0 = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 5], "segmentation": [[5, 5, 15, 5, 15, 15]]}
    img = {"id": 1, "file_name": change.get("file_name", "a.jpg"), "width": 20, "height": 20}
    anns = [dict(ann0, **{k: v for k, v in change.items() if k == "iscrowd"})] * (2 if "dup" in change else 1)
    (tmp_path / "ann.json").write_text(json.dumps({"images": [img], "categories": [{"id": 1, "name": "t"}],
                                                   "annotations": anns}))
    with pytest.raises(CocoFormatError, match=expect):
        CocoSource(tmp_path / "ann.json", tmp_path / "imgs")


def test_unlabeled_zip_with_members_outside_the_archive(tmp_path):
    from hpvit.data.unlabeled import UnlabeledImages

    z = tmp_path / "u.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok/1.jpg", _rgb(tmp_path / "1.jpg").read_bytes())
        zf.writestr(zipfile.ZipInfo("../../evil.jpg"), b"x")
    with pytest.raises(ConfigError, match=r"--data .*u\.zip: 1 member name\(s\) .* outside .*\['\.\./\.\./evil\.jpg'\]"):
        UnlabeledImages([z], None, None, 0)


@pytest.mark.parametrize("value, expect", [("warmup_epochs=Infinity", "warmup_epochs: expected float, got inf"),
                                           ("lr=NaN", "lr: expected float | None, got nan")])
def test_recipe_values_that_are_not_finite(value, expect):
    from hpvit.engine.recipe import Recipe

    k, v = value.split("=")
    with pytest.raises(ConfigError, match="wrong value type for " + re.escape(expect)):
        Recipe().replace(**{k: float(v.lower().replace("infinity", "inf"))})


def test_a_fifo_named_like_an_image_is_not_read(tmp_path):
    from hpvit.data import ImageFolderDataset, ImageFolderSource

    data = _folder(tmp_path / "d")
    os.mkfifo(data / "train" / "a" / "pipe.jpg")  # reading it would block forever
    ds = ImageFolderDataset(ImageFolderSource(data), "train")
    assert sorted(Path(m).name for m, _ in ds.samples) == ["0.png", "0.png", "1.png", "1.png"]


# ------------------------------------------------------------------ disks and paths
def test_output_path_that_is_a_folder(tmp_path, capsys):
    src = tmp_path / "v.safetensors"
    save_file(_timm_sd(), src)
    dst = tmp_path / "out.safetensors"
    dst.mkdir()
    assert main(["convert", str(src), "-o", str(dst), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {dst}: it is a folder" in err and "hpvit-tmp" not in err


def test_export_into_a_folder_not_made_yet(tmp_path, monkeypatch):
    from hpvit.export import export_onnx

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: _Program())
    out = tmp_path / "new" / "sub" / "m.onnx"
    export_onnx(hpvit.from_plain(_timm_sd(), "paper-cls"), out, img_size=32)
    assert out.read_bytes() == b"\x08\x01complete onnx"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write into read-only folders (root)")
        with pytest.raises(OutputError, match=rf"cannot write {ro}/a/m\.onnx: {ro} is not writable"):
            export_onnx(hpvit.from_plain(_timm_sd(), "paper-cls"), ro / "a" / "m.onnx", img_size=32)
    finally:
        ro.chmod(0o700)


# ------------------------------------------------------------------ concurrent writers
def test_a_second_writer_of_the_same_file_does_not_delete_the_first_ones_temp(tmp_path):
    """Two writers of one target in one process (threads, or a callback that saves): the second must not take the
    first one's temp file for a dead writer's leftover."""
    from hpvit.utils import atomic_write

    dst = tmp_path / "model.safetensors"

    def first(tmp):
        Path(tmp).write_bytes(b"first")
        atomic_write(dst, lambda t: Path(t).write_bytes(b"second"), force=True)  # meanwhile, a second writer

    atomic_write(dst, first, force=True)
    assert dst.read_bytes() == b"first"  # the last rename wins; both writes completed
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left


def test_non_finite_weights_after_an_update_are_a_divergence(tmp_path):
    """The check the NaN guard runs before every checkpoint and at the end of each epoch (an update can blow the
    weights up even when the loss before it was finite)."""
    from hpvit.engine import DivergenceError, Trainer
    from hpvit.engine.distributed import DistInfo
    from hpvit.engine.recipe import Recipe

    t = Trainer(None, Recipe(), tmp_path)
    t.dist, t.prog, t.ckpt_path = DistInfo(), None, tmp_path / "checkpoint-last.pt"
    t.epoch, t.step_in_epoch, t.steps_per_epoch, t.gstep = 0, 3, 4, 3
    t.model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    t.check_weights_finite()  # finite: nothing happens
    with torch.no_grad():
        t.model[1].weight[0] = float("inf")
    with pytest.raises(DivergenceError, match=r"the weights hold NaN or inf values after the update \(1 tensor\(s\) "
                                              r"on this process, e\.g\. \['1\.weight'\]\) at epoch 1, step 3 \(update 3\)"
                                              r"; stopped after that update, no checkpoint had been written yet"):
        t.check_weights_finite()
