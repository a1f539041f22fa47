"""Faults a new user meets (issue 12): runs that share an output folder, finished runs, unreadable or
invalid data, damaged files, full or read-only disks, offline hubs. Every case must end in an hpvit
error (or a printed note) that names the file and the fix. Tiny data is built inside each test."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hpvit
from hpvit.cli import main
from hpvit.errors import BadImageError, CheckpointError, DataError, HPViTError, OfflineError, OutputError, RunDirError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ tiny inputs
@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    """A random 4-block, 64-wide timm ViT (patch 16, 32 px) saved as a plain state_dict."""
    from helpers import save_small_vit

    return save_small_vit(tmp_path_factory.mktemp("tiny") / "tiny_vit.pth", img_size=32)


def _image(path: Path, seed: int, size: int = 20, fmt: str | None = None) -> Path:
    g = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def _folder(root: Path, n_train: int = 4, n_val: int = 2, classes=("a", "b")) -> Path:
    """ImageFolder layout: train/<class>/*.jpg and val/<class>/*.jpg (random 48x48 pictures)."""
    k = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            for i in range(n):
                _image(root / split / c / f"{i:02d}.jpg", k, size=48)  # big enough that a cut lands in pixel data
                k += 1
    return root


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _train(init: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "cls", "--init", str(init), "--data", str(data), "--out", str(out), "--recipe", "cifar-mini",
            "--img-size", "32", "--batch-size", "2", "--epochs", "1", "--workers", "0", "--threads", "1",
            "--set", "warmup_epochs=0", "--set", "log_every_steps=1", "--set", "auto_augment=null", *extra]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------ one folder, one run
def test_concurrent_run_fails_at_once_and_a_killed_runs_lock_is_taken_over(tmp_path, tiny_vit, capsys):
    data, out = _folder(tmp_path / "d"), tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hpvit.engine.rundir import claim_run_dir; "
         "claim_run_dir(sys.argv[1]); print('ready', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    try:
        assert holder.stdout.readline().strip() == "ready"
        t = time.time()
        assert main(_train(tiny_vit, data, out)) == 2
        err = capsys.readouterr().err
        assert time.time() - t < 20  # fails before building a model or reading data
        assert "is in use by another run" in err and f"pid {holder.pid}" in err and ".hpvit-run.lock" in err
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint-last.pt").exists()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, the OS lock does not
        holder.wait()
    assert (out / ".hpvit-run.lock").exists()
    assert main(_train(tiny_vit, data, out)) == 0
    err = capsys.readouterr().err
    assert "ended without releasing it" in err and f"pid {holder.pid}" in err
    assert (out / "results.json").is_file() and not (out / ".hpvit-run.lock").exists()
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == sorted(set(steps))  # one run's metrics only

    # the finished run's checkpoint is deleted (to save disk): it is still never replaced silently
    (out / "checkpoint-last.pt").unlink()
    before = (out / "model.safetensors").read_bytes()
    assert main(_train(tiny_vit, data, out)) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "checkpoint-last.pt was deleted" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == before
    assert main(_train(tiny_vit, data, out, "--resume")) == 2
    assert "nothing left to resume" in capsys.readouterr().err
    assert main(_train(tiny_vit, data, out, "--resume", "--overwrite")) == 2
    assert "pass only one of them" in capsys.readouterr().err
    assert main(_train(tiny_vit, data, out, "--overwrite", "--seed", "7")) == 0
    assert "--overwrite: deleted the previous run's" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["config"]["recipe"]["seed"] == 7


def test_unfinished_run_needs_resume_or_overwrite(tmp_path):
    from hpvit.engine.checkpoint import save_checkpoint
    from hpvit.engine.rundir import claim_run_dir

    out = tmp_path / "o"
    save_checkpoint(out / "checkpoint-last.pt", {"epoch": 0})
    with pytest.raises(RunDirError, match="unfinished run .*--resume to continue it, --overwrite"):
        claim_run_dir(out)
    with claim_run_dir(out, resume=True) as rd:
        with pytest.raises(RunDirError, match="in use by another run"):  # same process, second claim
            claim_run_dir(out, resume=True)
    assert not (out / ".hpvit-run.lock").exists()
    with claim_run_dir(out, overwrite=True) as rd2:
        assert (out / "checkpoint-last.pt").exists()  # claiming deletes nothing (the new run may still fail its checks)
        assert rd2.clear_previous_run() == ["checkpoint-last.pt"]  # the run does, once it has started
        assert not (out / "checkpoint-last.pt").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        claim_run_dir(tmp_path / "f")
    assert rd.fd is None


# ------------------------------------------------------------------ data checked before training
def test_bad_eval_image_fails_before_training_and_names_the_file(tmp_path, tiny_vit, capsys):
    data, out = _folder(tmp_path / "d"), tmp_path / "run"
    bad = _truncate(data / "val" / "b" / "01.jpg", 0.3)
    t = time.time()
    assert main(_train(tiny_vit, data, out)) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "evaluation" in err and "Traceback" not in err
    assert not (out / "checkpoint-last.pt").exists() and not (out / "metrics.jsonl").exists()
    assert time.time() - t < 30


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_training_image_is_named_during_training(tmp_path, tiny_vit, capsys, workers):
    """The header is intact (so the quick check passes) but the pixel data is cut: the error comes during
    training, from the main process or a DataLoader worker, and names the file without a worker traceback."""
    data, out = _folder(tmp_path / "d"), tmp_path / "run"
    bad = _truncate(data / "train" / "a" / "02.jpg", 0.6)
    args = _train(tiny_vit, data, out)
    args[args.index("--workers") + 1] = str(workers)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"image {bad} is truncated" in err and "--skip-bad-images" in err
    assert "Original Traceback" not in err


def test_skip_bad_images_trains_and_lists_them(tmp_path, tiny_vit, capsys):
    data, out = _folder(tmp_path / "d", n_train=3), tmp_path / "run"
    cut = _truncate(data / "train" / "a" / "01.jpg", 0.6)  # found while training
    junk = data / "train" / "b" / "02.jpg"
    junk.write_bytes(b"not an image at all")  # found by the header check before training
    assert main(_train(tiny_vit, data, out)) == 2
    err = capsys.readouterr().err
    assert str(junk) in err and "--skip-bad-images" in err and not (out / "checkpoint-last.pt").exists()
    assert main(_train(tiny_vit, data, out, "--skip-bad-images")) == 0
    listed = [ln.split("\t")[0] for ln in (out / "skipped-images.txt").read_text().splitlines()]
    assert sorted(set(listed)) == sorted([str(cut), str(junk)])
    res = json.loads((out / "results.json").read_text())
    assert res["train_images"] == 5  # 6 minus the one found before training
    assert "skipped-images.txt" in capsys.readouterr().err


def test_zip_member_errors_and_truncated_zip(tmp_path):
    from hpvit.data import ImageFolderDataset, ImageFolderSource
    from hpvit.data.check import find_bad_items
    from hpvit.errors import ConfigError

    data = _folder(tmp_path / "d")
    _truncate(data / "val" / "a" / "00.jpg", 0.6)
    z = tmp_path / "d.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(data.rglob("*.jpg")):
            zf.write(f, str(f.relative_to(data)))
    ds = ImageFolderDataset(ImageFolderSource(z), "val")
    with pytest.raises(BadImageError, match=r"d\.zip!val/a/00\.jpg is truncated"):
        ds[0]
    bad = find_bad_items(ds, True, "check")
    assert [b.path for b in bad] == [f"{z}!val/a/00.jpg"] and bad[0].unreadable
    assert find_bad_items(ds, False, "check") == []  # the header alone is fine
    cut = tmp_path / "cut.zip"
    cut.write_bytes(z.read_bytes()[: z.stat().st_size // 2])
    with pytest.raises(ConfigError, match="cut.zip is a zip archive that cannot be read .*truncated"):
        ImageFolderSource(cut)


def test_decompression_bomb_is_an_error_naming_the_file(tmp_path, monkeypatch):
    from hpvit.data.images import decode_image, probe_image

    p = _image(tmp_path / "big.png", 0, size=40)
    monkeypatch.setenv("HPVIT_MAX_IMAGE_PIXELS", "500")  # 1600 pixels: over the limit (and over twice it)
    for fn in (probe_image, decode_image):
        with pytest.raises(BadImageError, match=r"big\.png is too large .*HPVIT_MAX_IMAGE_PIXELS") as ei:
            fn(p)
        assert ei.value.path == str(p)
    monkeypatch.setenv("HPVIT_MAX_IMAGE_PIXELS", "1000")  # between the limit and twice it: PIL only warns
    with pytest.raises(BadImageError, match="too large"):
        decode_image(p)
    monkeypatch.setenv("HPVIT_MAX_IMAGE_PIXELS", "0")
    assert decode_image(p).size == (40, 40)


# ------------------------------------------------------------------ segmentation labels
def _seg_pair(root: Path, layout: str, label: np.ndarray) -> None:
    h, w = label.shape
    if layout == "ade20k":
        img_dir, lab_dir = root / "images" / "training", root / "annotations" / "training"
    else:
        img_dir, lab_dir = root / "train", root / "trainannot"
    _image(img_dir / "x.png", 0, size=h)
    lab_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint16 if label.max() > 255 else np.uint8)).save(lab_dir / "x.png")


@pytest.mark.parametrize("value", [300, 257, 151])
def test_16bit_ade20k_labels_outside_the_classes_are_errors(tmp_path, value):
    from hpvit.data.segmentation import SegDataError, SegDataset

    lab = np.full((16, 16), 5, np.int64)
    lab[0, 0], lab[1, 1] = value, 0  # 0 = "other" (ignored), value: no class
    _seg_pair(tmp_path, "ade20k", lab)
    ds = SegDataset(tmp_path, "ade20k", "train", False)
    with pytest.raises(SegDataError, match=rf"annotations/training/x\.png holds value\(s\) \[{value}\] outside the "
                                           r"ade20k classes 1\.\.150 \(ignore value 0\)"):
        ds[0]
    lab[0, 0] = 150
    _seg_pair(tmp_path, "ade20k", lab)
    y = ds[0][1]
    assert y[0, 0] == 149 and y[1, 1] == 255 and y[2, 2] == 4


def test_camvid_255_is_an_error_unless_declared_ignore(tmp_path):
    from hpvit.data.check import find_bad_items
    from hpvit.data.segmentation import IGNORE, SegDataError, SegDataset

    lab = np.full((16, 16), 3, np.int64)
    lab[0, 0], lab[0, 1] = 255, 11
    _seg_pair(tmp_path, "camvid", lab)
    with pytest.raises(SegDataError, match=r"value\(s\) \[255\] outside the camvid classes 0\.\.10 \(ignore value 11\)"):
        SegDataset(tmp_path, "camvid", "train", False)[0]
    bad = find_bad_items(SegDataset(tmp_path, "camvid", "train", False), True, "check")
    assert len(bad) == 1 and bad[0].path.endswith("trainannot/x.png") and not bad[0].unreadable
    lab[0, 1] = 4  # --ignore-value 255 replaces the layout's 11: 255 is ignored, 11 is no longer allowed
    _seg_pair(tmp_path, "camvid", lab)
    y = SegDataset(tmp_path, "camvid", "train", False, ignore_value=255)[0][1]
    assert y[0, 0] == IGNORE and y[0, 1] == 4 and y[5, 5] == 3
    lab[0, 1] = 11
    _seg_pair(tmp_path, "camvid", lab)
    with pytest.raises(SegDataError, match=r"value\(s\) \[11\] outside .*\(ignore value 255\)"):
        SegDataset(tmp_path, "camvid", "train", False, ignore_value=255)[0]


# ------------------------------------------------------------------ resume with a lower lr (the divergence advice)
def test_divergence_advice_resume_with_lower_lr_works(tmp_path, tiny_vit, capsys, monkeypatch):
    from hpvit.tasks.classification import ClassificationTask

    orig = ClassificationTask.loss
    calls = {"n": 0}

    def loss(self, model, batch):  # "diverges" on the 3rd step whenever the lr is high
        calls["n"] += 1
        out = orig(self, model, batch)
        return out * float("nan") if self.recipe.lr >= 0.5 and calls["n"] == 3 else out

    monkeypatch.setattr(ClassificationTask, "loss", loss)
    data, out = _folder(tmp_path / "d"), tmp_path / "run"
    args = _train(tiny_vit, data, out, "--set", "ckpt_every_steps=1")
    assert main(args + ["--lr", "1.0"]) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "update 2) was kept" in err and "--resume --lr <smaller>" in err
    assert main(args + ["--resume", "--lr", "0.001"]) == 0
    err = capsys.readouterr().err
    assert "resuming with changed lr 1.0 -> 0.001" in err and "resumed from" in err
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 4 and res["lr"] == 0.001
    assert main(args + ["--resume", "--overwrite"]) == 2  # conflicting flags
    capsys.readouterr()


# ------------------------------------------------------------------ writes: umask, modes, temp files, full disks
def test_writes_honour_umask_and_keep_the_replaced_mode(tmp_path):
    from hpvit.utils import atomic_write

    old = os.umask(0o027)
    try:
        p = atomic_write(tmp_path / "a.bin", lambda t: Path(t).write_bytes(b"1"))
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
        os.chmod(p, 0o644)
        atomic_write(p, lambda t: Path(t).write_bytes(b"2"), force=True)
        assert stat.S_IMODE(p.stat().st_mode) == 0o644 and p.read_bytes() == b"2"
    finally:
        os.umask(old)


def test_convert_force_keeps_mode_and_warns_about_nan_weights(tmp_path, tiny_vit, capsys):
    sd = torch.load(tiny_vit, weights_only=True)
    sd["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    src = tmp_path / "nan.pth"
    torch.save(sd, src)
    out = tmp_path / "m.safetensors"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 tensor(s)" in err and "blocks.1.mlp.fc1.weight" in err and "NaN" in err
    os.chmod(out, 0o644)
    assert main(["convert", str(tiny_vit), "-o", str(out), "--force"]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert "warning" not in capsys.readouterr().err


def test_stale_temp_files_are_cleaned_up_and_live_ones_kept(tmp_path):
    from hpvit.utils import atomic_write
    from hpvit.engine.rundir import claim_run_dir

    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".model.safetensors.{dead}.ab12cd34.hpvit-tmp"
    other = tmp_path / f".checkpoint-last.pt.{dead}.00ff00ff.hpvit-tmp"
    alive = tmp_path / f".model.safetensors.{live}.11223344.hpvit-tmp"
    for f in (stale, other, alive):
        f.write_bytes(b"x" * 100)
    atomic_write(tmp_path / "model.safetensors", lambda t: Path(t).write_bytes(b"m"))
    assert not stale.exists() and other.exists() and alive.exists()  # only this target's dead leftovers
    with claim_run_dir(tmp_path):  # a new run removes every dead writer's leftovers in its folder
        assert not other.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "model.safetensors"])


@pytest.mark.parametrize("exc, expect", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 22"), "the disk is full"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied; choose a writable output folder"),
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
])
def test_failed_writes_name_the_target_not_the_temp_file(tmp_path, monkeypatch, exc, expect):
    from hpvit.engine.checkpoint import save_checkpoint

    def boom(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise exc

    monkeypatch.setattr(torch, "save", boom)
    target = tmp_path / "run" / "checkpoint-last.pt"
    with pytest.raises(OutputError) as ei:
        save_checkpoint(target, {"a": 1})
    msg = str(ei.value)
    assert msg.startswith(f"cannot write {target}:") and expect in msg and "hpvit-tmp" not in msg
    assert os.listdir(target.parent) == []  # no temp file left behind


def test_unwritable_output_folder(tmp_path, tiny_vit, capsys, monkeypatch):
    """A read-only --out: for real when not root, else simulated (root writes anywhere)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        os.chmod(ro, 0o555)
    else:
        real_open = os.open

        def deny(path, *a, **k):
            if str(path).startswith(str(ro)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *a, **k)

        monkeypatch.setattr(os, "open", deny)
    data = _folder(tmp_path / "data")  # real images: the data is checked (and listed) before the folder is claimed
    assert main(_train(tiny_vit, data, ro)) == 2
    err = capsys.readouterr().err
    assert f"cannot write {ro / '.hpvit-run.lock'}: permission denied" in err and "writable" in err


# ------------------------------------------------------------------ damaged hpvit files
def _resave_with_meta(src: Path, dst: Path, **changes: str) -> Path:
    from safetensors.torch import load_file, save_file

    from hpvit.checkpoints.native import read_metadata

    meta = dict(read_metadata(src), **changes)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def test_tampered_metadata_and_shape_mismatch_in_load(tmp_path, tiny_vit):
    m = hpvit.from_plain(str(tiny_vit), config="paper-cls", num_classes=3)
    good = Path(hpvit.save(m, tmp_path / "good.safetensors"))
    cases = {
        "json": {"hpvit_config": "{not json"},
        "field": {"hpvit_spec": json.dumps({"dim": "wide"})},
        "classes": {"num_classes": "three"},
    }
    for name, change in cases.items():
        with pytest.raises(CheckpointError, match="metadata .* is damaged .*hpvit convert"):
            hpvit.load(_resave_with_meta(good, tmp_path / f"{name}.safetensors", **change))
    with pytest.raises(CheckpointError, match=r"shapes the stored config does not build, e\.g\. \['head\."):
        hpvit.load(_resave_with_meta(good, tmp_path / "shape.safetensors", num_classes="7"))


# ------------------------------------------------------------------ COCO polygons
@pytest.mark.parametrize("poly, expect", [
    ([5, 5, 10, 10, 15, 15], "has zero area"),
    ([5, 5, 5, 5, 5, 5], "has zero area"),
    ([50, 50, 60, 50, 60, 60], "lies entirely outside the 20x20 image"),
])
def test_degenerate_coco_polygons_are_refused(tmp_path, poly, expect):
    from hpvit.data.coco import CocoFormatError, CocoSource

    _image(tmp_path / "imgs" / "a.jpg", 0)
    ann = {"images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 20}],
           "categories": [{"id": 1, "name": "thing"}],
           "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "segmentation": [poly]}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    with pytest.raises(CocoFormatError, match=rf"annotation id 7 \(image a\.jpg\): polygon 0 {expect}"):
        CocoSource(tmp_path / "ann.json", tmp_path / "imgs")


# ------------------------------------------------------------------ offline hub
def test_timm_offline_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    import hpvit.checkpoints as C

    monkeypatch.setattr(C, "_hub_reachable", lambda timeout=C.HUB_PROBE_TIMEOUT_S: False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    saved, t = hub.HF_HUB_OFFLINE, time.time()
    with pytest.raises(OfflineError, match="cannot be reached .*not in the local cache.*local path"):
        hpvit.load_plain("timm:vit_tiny_patch16_224")
    assert time.time() - t < 10
    assert hub.HF_HUB_OFFLINE == saved  # offline mode only for the failed attempt


def test_every_new_error_is_an_hpvit_error():
    for cls in (OutputError, RunDirError, DataError, BadImageError):
        assert issubclass(cls, HPViTError)
    e = BadImageError("image x is truncated", "x")
    import pickle

    back = pickle.loads(pickle.dumps(e))
    assert str(back) == "image x is truncated" and back.path == "x"


def test_cli_turns_leftover_file_system_errors_into_one_line(tmp_path, monkeypatch, capsys):
    import hpvit.cli.info

    monkeypatch.chdir(tmp_path)
    Path("whatever.pth").touch()  # the model path is checked before the command runs

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/predictions.png")

    monkeypatch.setattr(hpvit.cli.info, "cmd_info", full)
    assert main(["info", "whatever.pth"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpvit: error: /runs/x/predictions.png: the disk is full") and "Traceback" not in err

    def other(args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(hpvit.cli.info, "cmd_info", other)
    with pytest.raises(OSError):  # not something the user can fix by choosing another folder: not hidden
        main(["info", "whatever.pth"])
