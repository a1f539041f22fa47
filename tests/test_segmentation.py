"""Semantic segmentation: UperNet over paper-seg / plain-seg backbones, CamVid data, metrics, CLI, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import random_timm_vit, fault_env

from hpvit.data.segmentation import IGNORE, SegDataError, SegDataset, collate_seg
from hpvit.evaluation.segmentation import confusion_sums, predict_logits, seg_metrics
from hpvit.models.segmenter import UperNetSegmenter, build_segmenter

from conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def camvid_crops(tmp_path_factory):
    """A CamVid-layout folder of real CamVid crops: 4 train, 2 val, 101x75 (odd, rectangular)."""
    src = shared_path("camvid")
    root = tmp_path_factory.mktemp("camvid")
    for split, n in (("train", 4), ("val", 2)):
        (root / split).mkdir()
        (root / f"{split}annot").mkdir()
        names = sorted(os.listdir(src / split))[:n]
        for name in names:
            stem = Path(name).stem
            img = Image.open(src / split / name).convert("RGB").crop((100, 120, 302, 270)).resize((101, 75), Image.BILINEAR)
            lab = Image.open(src / f"{split}annot" / f"{stem}.png").crop((100, 120, 302, 270)).resize((101, 75), Image.NEAREST)
            img.save(root / split / f"{stem}.png")
            lab.save(root / f"{split}annot" / f"{stem}.png")
    return root


# ------------------------------------------------------------------ metrics and inference (no data needed)
def test_metrics_hand_computed():
    k = 3
    label = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    m = seg_metrics(confusion_sums(pred, label, k), ["a", "b", "c"])
    # class a: inter 1, gt 2, pred 2 -> IoU 1/3; b: inter 2, gt 2, pred 3 -> 2/3; c: inter 1, gt 2, pred 1 -> 1/2
    assert m["IoU.a"] == pytest.approx(100 / 3) and m["IoU.b"] == pytest.approx(200 / 3) and m["IoU.c"] == pytest.approx(50)
    assert m["mIoU"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    assert m["Acc.a"] == pytest.approx(50) and m["Acc.b"] == pytest.approx(100) and m["mAcc"] == pytest.approx(200 / 3)
    assert m["aAcc"] == pytest.approx(100 * 4 / 6)  # ignored pixels never count
    # a class absent from labels and predictions is left out of the means, not counted as 0
    m4 = seg_metrics(confusion_sums(pred, label, 4), ["a", "b", "c", "d"])
    assert math.isnan(m4["IoU.d"]) and m4["mIoU"] == pytest.approx(m["mIoU"])


def test_sliding_window_matches_whole_for_a_local_model():
    class PixelModel(torch.nn.Module):  # per-pixel: sliding windows must reproduce the whole-image logits
        num_classes = 5

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 1)

        def forward(self, x):
            return self.conv(x)

    m = PixelModel().eval()
    img = torch.rand(3, 83, 131)
    whole = predict_logits(m, img, (83, 131), "whole")
    slide = predict_logits(m, img, (83, 131), "slide", crop=48, stride=29)
    assert torch.allclose(whole, slide, atol=1e-5)
    up = predict_logits(m, img, (166, 262), "slide", crop=48)  # resized to the label's resolution
    assert up.shape == (5, 166, 262)


@pytest.mark.parametrize("config", ["paper-seg", "plain-seg"])
def test_segmenter_odd_rectangular_inputs(tiny_vit_sd, config):
    m = build_segmenter(str(tiny_vit_sd), config, num_classes=7, img_size=64, channels=32).eval()
    assert m.body.kind == ("plain" if config.startswith("plain") else "hierarchical")
    with torch.no_grad():
        for h, w in ((67, 101), (32, 45), (96, 64)):
            assert m(torch.rand(2, 3, h, w)).shape == (2, 7, h, w)
        feats = m.body(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    if config == "plain-seg":
        assert m.body.out_indices == (0, 1, 2, 3)  # 4-block model: d/3, d/2, 2d/3, d (4/6/8/12 of 12)


def test_plain_seg_uses_blocks_4_6_8_12_for_vit_b_depth():
    from hpvit.models.dense import plain_out_indices

    assert plain_out_indices("plain-seg", 12) == (3, 5, 7, 11)
    assert plain_out_indices("plain-det", 12) == (2, 5, 8, 11)


def test_loss_decreases_on_fixed_batch(tiny_vit_sd):
    torch.manual_seed(0)
    m = build_segmenter(str(tiny_vit_sd), "paper-seg", num_classes=4, img_size=64, channels=32)
    m.train()
    x = torch.rand(2, 3, 32, 48)
    y = torch.zeros(2, 32, 48, dtype=torch.long)
    y[:, :, 24:] = 1  # left / right halves: not solvable by the classifier bias alone
    y[:, 16:, :] += 2
    y[:, :2] = IGNORE
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(m(x), y, ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) == 1:
            assert m.body.vit.patch_embed.proj.weight.grad.abs().sum() > 0  # gradients reach the backbone
    assert losses[-1] < 0.9 * losses[0], losses


# ------------------------------------------------------------------ data errors
def test_bad_segmentation_folders(tmp_path, camvid_crops):
    with pytest.raises(SegDataError, match="does not exist"):
        SegDataset(tmp_path / "nope", "camvid", "train", True)
    with pytest.raises(SegDataError, match="unknown dataset layout"):
        SegDataset(camvid_crops, "pascal", "train", True)
    bad = tmp_path / "bad"
    (bad / "train").mkdir(parents=True)
    (bad / "trainannot").mkdir()
    Image.new("RGB", (40, 30)).save(bad / "train" / "a.png")
    Image.new("RGB", (40, 30)).save(bad / "train" / "b.png")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(bad / "trainannot" / "a.png")
    with pytest.raises(SegDataError, match=r"1 image\(s\) .* have no label PNG.*b\.png"):
        SegDataset(bad, "camvid", "train", True)
    Image.fromarray(np.full((30, 41), 3, np.uint8)).save(bad / "trainannot" / "b.png")  # wrong size
    ds = SegDataset(bad, "camvid", "train", False)
    with pytest.raises(SegDataError, match="must match their images"):
        ds[1]
    Image.fromarray(np.full((30, 40), 40, np.uint8)).save(bad / "trainannot" / "b.png")  # class 40 of 11
    with pytest.raises(SegDataError, match=r"value\(s\) \[40\] outside the camvid classes"):
        ds[1]


def test_camvid_dataset_void_is_ignored_and_crops(camvid_crops):
    ds = SegDataset(camvid_crops, "camvid", "train", True, crop=64, base_size=120)
    img, lab = ds[0]
    assert img.shape == (3, 64, 64) and lab.shape == (64, 64)
    vals = set(torch.unique(lab).tolist())
    assert 11 not in vals and vals <= set(range(11)) | {IGNORE}
    ev = SegDataset(camvid_crops, "camvid", "val", False, crop=64, base_size=60)
    img, lab = ev[0]
    assert lab.shape == (75, 101) and max(img.shape[-2:]) == 60  # labels stay at full resolution
    imgs, labs = collate_seg([ev[0], ev[1]])
    assert isinstance(imgs, torch.Tensor) or isinstance(imgs, list)


# ------------------------------------------------------------------ command line on real data
def _cli(*args, env=None, check=True):
    cmd = [sys.executable, "-m", "hpvit", *map(str, args)]
    e = dict(os.environ, HPVIT_PLAIN_LOG="1", **(env or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


@pytest.mark.slow
def test_cli_train_eval_and_exact_resume(tmp_path, camvid_crops, small_vit_init, capsys):
    """Train, kill (a subprocess: the fault seam), resume, evaluate: in-process `main` except for the kill."""
    from hpvit.cli import main

    common = ["train", "seg", "--model", small_vit_init, "--data", camvid_crops, "--layout", "camvid",
              "--base-size", "80", "--img-size", "64", "--batch-size", "2", "--epochs", "2", "--workers", "0",
              "--threads", "1", "--head-channels", "32", "--ckpt-every-steps", "1", "--seed", "3", "--eval-every", "2"]
    common = [str(c) for c in common]
    a = tmp_path / "a"
    assert main(common + ["--out", str(a)]) == 0
    res = json.loads((a / "results.json").read_text())
    for k in ("mIoU", "mAcc", "aAcc", "IoU.Road", "Acc.Road", "IoU.Sky", "eval_images"):
        assert k in res, k
    assert res["steps"] == 4 and (a / "predictions.png").is_file() and (a / "model.safetensors").is_file()
    # killed after the 3rd update (mid-epoch 2), then resumed: identical weights to the uninterrupted run
    b = tmp_path / "b"
    r = _cli(*common, "--out", b, env=fault_env(3), check=False)
    assert r.returncode != 0 and not (b / "results.json").exists()
    assert main(common + ["--out", str(b), "--resume"]) == 0
    rb = json.loads((b / "results.json").read_text())
    assert rb["steps"] == 4
    assert rb["rank_param_digests"] == res["rank_param_digests"]
    assert rb["mIoU"] == pytest.approx(res["mIoU"])
    # eval: whole and sliding-window inference, results.json + palette PNG
    for mode in ("whole", "slide"):
        out = tmp_path / f"eval_{mode}"
        assert main(["eval", "seg", "--model", str(a), "--data", str(camvid_crops), "--mode", mode, "--crop", "48",
                     "--out", str(out), "--threads", "1"]) == 0
        ev = json.loads((out / "results.json").read_text())
        assert {"mIoU", "mAcc", "aAcc", "IoU.Car", "Acc.Car"} <= set(ev) and ev["inference"] == mode
        assert (out / "predictions.png").is_file()
    whole = json.loads((tmp_path / "eval_whole" / "results.json").read_text())
    assert whole["mIoU"] == pytest.approx(res["mIoU"], abs=1e-6)  # the same evaluation as during training
    # a model of another task is refused with a clear message
    capsys.readouterr()
    assert main(["eval", "det", "--model", str(a), "--ann", str(a / "x.json"), "--data", str(a)]) == 2
    assert "holds a 'seg' model" in capsys.readouterr().err


def test_recipe_sets_inference_base_size_and_jitter(camvid_crops, tmp_path):
    """The paper-row recipes carry their data protocol: eval_mode / slide_stride / base_size / ratio_range reach
    the task (flags given on the command line still win)."""
    from hpvit.engine.recipe import load_recipe
    from hpvit.tasks.segmentation import SegData, SegmentationTask

    r = load_recipe("cityscapes-upernet-40k").replace(img_size=64, base_size=96, ratio_range=(0.75, 1.5))
    data = SegData(str(camvid_crops), "camvid", train_images=2, eval_images=2)
    t = SegmentationTask("unused.pth", r, data, config="paper-seg", out=tmp_path)
    assert t.mode == "slide" and t.base_size == 96 and t.train_ds.scale_range == (0.75, 1.5)
    ev = t.evaluator()
    assert (ev.mode, ev.crop, ev.stride) == ("slide", 64, 513)
    t2 = SegmentationTask("unused.pth", r, SegData(str(camvid_crops), "camvid", train_images=2, eval_images=2, base_size=80),
                          config="paper-seg", out=tmp_path, mode="whole")
    assert t2.mode == "whole" and t2.base_size == 80


@pytest.mark.slow
def test_paper_recipe_runs_end_to_end_scaled_down(tmp_path, camvid_crops, small_vit_init):
    """`--recipe ade20k-upernet-80k`, scaled down with --set: an iteration budget rounded up to whole epochs,
    the poly schedule after warmup, and sliding-window evaluation, in a real run."""
    from hpvit.cli import main

    out = tmp_path / "r"
    args = ["train", "seg", "--recipe", "ade20k-upernet-80k", "--model", small_vit_init, "--data", camvid_crops,
            "--layout", "camvid", "--img-size", "64", "--batch-size", "2", "--workers", "0", "--threads", "1",
            "--head-channels", "32", "--amp", "none", "--set", "iterations=3", "--set", "warmup_iters=1",
            "--set", "base_size=96", "--set", "slide_stride=40", "--set", "eval_every_epochs=2", "--out", out]
    assert main([str(a) for a in args]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 4 and res["epochs"] == 2  # 3 iterations of 2 updates per epoch -> 2 epochs
    assert res["inference"] == "slide" and res["eval_images"] == 2 and "mIoU" in res
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if json.loads(line).get("kind") == "train"]
    assert lrs[-1] < lrs[0]  # poly decay toward 0 over the run
