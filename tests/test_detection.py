"""Detection / instance segmentation: Mask R-CNN over paper-det / plain-det, COCO data validation, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import random_timm_vit, fault_env

pytest.importorskip("pycocotools", reason="detection needs pycocotools (pip install 'hpvit[dense]')")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

import hpvit
from hpvit.data.coco import CocoFormatError, CocoInstances, CocoSource, collate_detection, parse_range
from hpvit.models.dense import build_dense_backbone
from hpvit.evaluation.detection import STAT_NAMES, coco_metrics
from hpvit.models.detector import build_detector

from conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coco8():
    return shared_path("coco", "coco8-seg")


def _write(tmp_path: Path, d: dict, name: str = "ann.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return p


@pytest.fixture
def good_ann(coco8):
    return json.loads((coco8 / "instances_coco8seg_train.json").read_text())


# ------------------------------------------------------------------ annotation validation
def test_bad_annotation_files_give_clear_errors(tmp_path, coco8, good_ann):
    imgs = coco8 / "images" / "train"
    with pytest.raises(CocoFormatError, match="does not exist"):
        CocoSource(tmp_path / "none.json", imgs)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(CocoFormatError, match="not valid JSON"):
        CocoSource(tmp_path / "broken.json", imgs)
    with pytest.raises(CocoFormatError, match=r"missing or non-list section\(s\) \['annotations'\]"):
        CocoSource(_write(tmp_path, {k: v for k, v in good_ann.items() if k != "annotations"}), imgs)
    with pytest.raises(CocoFormatError, match="'annotations' is empty"):
        CocoSource(_write(tmp_path, dict(good_ann, annotations=[])), imgs)
    d = json.loads(json.dumps(good_ann))
    d["images"][1]["file_name"] = "no_such_image.jpg"
    with pytest.raises(CocoFormatError, match=r"1 of 4 image file\(s\) are missing .*no_such_image\.jpg"):
        CocoSource(_write(tmp_path, d), imgs)
    d = json.loads(json.dumps(good_ann))
    d["annotations"][2]["segmentation"] = [[10.0, 10.0, 20.0, 20.0]]
    aid = d["annotations"][2]["id"]
    with pytest.raises(CocoFormatError, match=rf"annotation id {aid} .*invalid polygon 0 with 4 coordinates"):
        CocoSource(_write(tmp_path, d), imgs)
    d = json.loads(json.dumps(good_ann))
    d["annotations"][0]["segmentation"] = [[1.0, 2.0, 3.0, 4.0, 5.0]]
    with pytest.raises(CocoFormatError, match="invalid polygon 0 with 5 coordinates"):
        CocoSource(_write(tmp_path, d), imgs)
    d = json.loads(json.dumps(good_ann))
    d["annotations"][0]["segmentation"] = []
    with pytest.raises(CocoFormatError, match="empty 'segmentation'"):
        CocoSource(_write(tmp_path, d), imgs)
    d = json.loads(json.dumps(good_ann))
    d["annotations"][0]["category_id"] = 9999
    with pytest.raises(CocoFormatError, match="category_id 9999, which is not in 'categories'"):
        CocoSource(_write(tmp_path, d), imgs)
    d = json.loads(json.dumps(good_ann))
    d["annotations"][0]["image_id"] = 12345
    with pytest.raises(CocoFormatError, match="image_id 12345, which is not in 'images'"):
        CocoSource(_write(tmp_path, d), imgs)
    d = json.loads(json.dumps(good_ann))
    d["annotations"][0]["bbox"] = [5, 5, 0, 10]
    with pytest.raises(CocoFormatError, match="empty bbox"):
        CocoSource(_write(tmp_path, d), imgs)
    d = json.loads(json.dumps(good_ann))
    im = d["images"][0]
    d["annotations"][0]["segmentation"] = {"size": [im["height"] + 1, im["width"]], "counts": [1]}
    with pytest.raises(CocoFormatError, match="RLE size"):
        CocoSource(_write(tmp_path, d), imgs)
    with pytest.raises(CocoFormatError, match="selects no image"):
        parse_range("10:20", 4)


def test_rle_masks_negatives_and_crowd_are_counted(tmp_path, coco8, good_ann):
    from pycocotools import mask as mask_utils

    d = json.loads(json.dumps(good_ann))
    im0 = d["images"][0]
    a0 = next(a for a in d["annotations"] if a["image_id"] == im0["id"])
    src = CocoSource(_write(tmp_path, good_ann, "orig.json"), coco8 / "images" / "train")
    poly_mask = src.masks_of(im0)[0][0]
    # the same object as uncompressed and compressed RLE decodes to the same mask
    rle = mask_utils.encode(__import__("numpy").asfortranarray(poly_mask))
    counts = rle["counts"].decode()
    a0["segmentation"] = {"size": [im0["height"], im0["width"]], "counts": counts}
    crowd = dict(a0, id=99999, iscrowd=1)
    d["annotations"].append(crowd)
    last = d["images"][-1]["id"]
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] != last]  # one image without annotations
    s = CocoSource(_write(tmp_path, d), coco8 / "images" / "train")
    assert (s.masks_of(im0)[0][0] == poly_mask).all()
    assert "1 image(s) without annotations kept as negatives; 1 crowd region(s)" in s.summary()
    ds = CocoInstances(s, None, False, img_size=96)
    img, t = ds[len(ds) - 1]
    assert t["boxes"].shape == (0, 4) and t["masks"].shape[0] == 0 and max(img.shape[-2:]) == 96


def test_dataset_resize_flip_lsj(coco8):
    s = CocoSource(coco8 / "instances_coco8seg_train.json", coco8 / "images" / "train")
    ev = CocoInstances(s, None, False, img_size=128)
    img, t = ev[0]
    assert max(img.shape[-2:]) == 128 and t["masks"].shape[-2:] == img.shape[-2:]
    assert (t["boxes"][:, 2] <= img.shape[-1] + 1e-3).all() and (t["boxes"][:, 3] <= img.shape[-2] + 1e-3).all()
    lsj = CocoInstances(s, None, True, img_size=96, lsj=True)
    for i in range(len(lsj)):
        img, t = lsj[i]
        assert img.shape[-2:] == (96, 96) and t["masks"].shape[-2:] == (96, 96)
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        assert ((t["boxes"][:, 2:] - t["boxes"][:, :2]) >= 1).all()


# ------------------------------------------------------------------ model
@pytest.mark.parametrize("config", ["paper-det", "plain-det"])
def test_backbone_levels_on_odd_rectangular_input(tiny_vit_sd, config):
    bb = build_dense_backbone(str(tiny_vit_sd), config).eval()
    with torch.no_grad():
        feats = bb(torch.rand(1, 3, 64, 160))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 40), (8, 20), (4, 10), (2, 5)]
    assert [f.shape[1] for f in feats] == bb.out_channels
    if config == "paper-det":
        windows = [blk.attn.window_size for blk in bb.vit.blocks]
        assert windows == [7, None, None, None]  # 4 blocks: baseline globals (0, 1, 2, 3), first one windowed
        with torch.no_grad():
            assert [tuple(f.shape[-2:]) for f in bb(torch.rand(1, 3, 67, 101))] == [(16, 25), (8, 13), (4, 7), (2, 4)]
    else:
        assert [blk.attn.window_size for blk in bb.vit.blocks] == [None] * 4
        assert bb.out_indices == (0, 1, 2, 3)


def test_plain_det_layout_for_12_blocks():
    from hpvit.config import baseline_global_blocks
    cfg = hpvit.get_config("plain-det")  # a preset like the others; its global blocks resolve per depth
    lay = cfg.resolve(12)
    assert [i for i, w in enumerate(lay.windows) if w is None] == list(baseline_global_blocks(12)) == [2, 5, 8, 11]
    assert all(w == 14 for i, w in enumerate(lay.windows) if i not in (2, 5, 8, 11))


def test_maskrcnn_loss_decreases_and_odd_sizes(tiny_vit_sd, coco8):
    torch.manual_seed(0)
    s = CocoSource(coco8 / "instances_coco8seg_train.json", coco8 / "images" / "train")
    images, targets = collate_detection([CocoInstances(s, None, False, img_size=96)[i] for i in (0,)])
    m = build_detector(str(tiny_vit_sd), "paper-det", len(s.cat_ids), 96, fpn_channels=64,
                       rcnn=dict(box_batch_size_per_image=32, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_train=200,
                                 rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=100, box_head_dim=128))
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4)
    tg = [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]
    losses = []
    for _ in range(4):
        torch.manual_seed(1)  # the same RoI sampling every step: only the weights change
        loss = sum(m(images, tg).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    m.eval()
    with torch.no_grad():
        out = m([torch.rand(3, 67, 101), torch.rand(3, 45, 130)])
    for o, (h, w) in zip(out, ((67, 101), (45, 130))):
        assert set(o) >= {"boxes", "labels", "scores", "masks"}
        if len(o["boxes"]):
            assert o["masks"].shape[-2:] == (h, w)
            assert (o["boxes"][:, 2] <= w + 1e-3).all() and (o["boxes"][:, 3] <= h + 1e-3).all()


def test_coco_metrics_perfect_and_empty(coco8):
    s = CocoSource(coco8 / "instances_coco8seg_val.json", coco8 / "images" / "val")
    gt = s.coco_gt()
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
              "segmentation": gt.annToRLE(a)} for a in gt.dataset["annotations"]]
    for p in preds:
        p["segmentation"] = dict(p["segmentation"], counts=p["segmentation"]["counts"].decode()
                                 if isinstance(p["segmentation"]["counts"], bytes) else p["segmentation"]["counts"])
    m = coco_metrics(gt, preds)
    assert m["bbox_AP"] == pytest.approx(100.0) and m["segm_AP"] == pytest.approx(100.0)
    assert set(m) == {f"{t}_{n}" for t in ("bbox", "segm") for n in STAT_NAMES}
    z = coco_metrics(gt, [])
    assert z["bbox_AP"] == 0.0 and z["segm_AP50"] == 0.0


# ------------------------------------------------------------------ command line on real data
def _cli(*args, env=None, check=True):
    cmd = [sys.executable, "-m", "hpvit", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HPVIT_PLAIN_LOG="1", **(env or {})),
                       cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


@pytest.mark.slow
def test_cli_train_eval_resume_on_coco8(tmp_path, coco8, small_vit_init, capsys):
    """Train, kill (a subprocess: the fault seam), resume, evaluate: in-process `main` except for the kill."""
    from hpvit.cli import main

    common = ["train", "det", "--model", small_vit_init, "--config", "paper-det",
              "--ann", coco8 / "instances_coco8seg_train.json", "--data", coco8 / "images" / "train",
              "--eval-ann", coco8 / "instances_coco8seg_val.json", "--eval-data", coco8 / "images" / "val",
              "--img-size", "96", "--batch-size", "2", "--epochs", "1", "--workers", "0", "--threads", "1",
              "--ckpt-every-steps", "1", "--rcnn", "box_batch_size_per_image=32", "--rcnn", "rpn_post_nms_top_n_train=100",
              "--rcnn", "rpn_pre_nms_top_n_test=200", "--rcnn", "rpn_post_nms_top_n_test=100",
              "--rcnn", "box_head_dim=128"]
    common = [str(c) for c in common]
    a = tmp_path / "a"
    assert main(common + ["--out", str(a)]) == 0
    res = json.loads((a / "results.json").read_text())
    for t in ("bbox", "segm"):
        for n in STAT_NAMES:
            assert f"{t}_{n}" in res
    assert res["steps"] == 2 and res["eval_images"] == 4
    assert isinstance(json.loads((a / "predictions.json").read_text()), list)
    assert (a / "predictions.png").stat().st_size > 0
    # killed after update 1 (mid-epoch), resumed: the same final weights as the uninterrupted run
    b = tmp_path / "b"
    r = _cli(*common, "--out", b, env=fault_env(1), check=False)
    assert r.returncode != 0 and (b / "checkpoint-last.pt").is_file() and not (b / "results.json").exists()
    assert main(common + ["--out", str(b), "--resume"]) == 0
    assert json.loads((b / "results.json").read_text())["rank_param_digests"] == res["rank_param_digests"]
    # eval det: results.json with the COCO summary, predictions json, PNG
    out = tmp_path / "ev"
    assert main(["eval", "det", "--model", str(a), "--ann", str(coco8 / "instances_coco8seg_val.json"), "--data",
                 str(coco8 / "images" / "val"), "--out", str(out), "--threads", "1"]) == 0
    ev = json.loads((out / "results.json").read_text())
    assert {"bbox_AP", "bbox_AP50", "segm_AP", "segm_AR100"} <= set(ev)
    assert ev["bbox_AP"] == pytest.approx(res["bbox_AP"]) and ev["segm_AP"] == pytest.approx(res["segm_AP"])
    assert (out / "predictions.png").is_file() and (out / "predictions.json").is_file()
    # a broken annotation file is refused before any training, naming the problem
    bad = json.loads((coco8 / "instances_coco8seg_train.json").read_text())
    bad["images"][0]["file_name"] = "missing.jpg"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    capsys.readouterr()
    train_ann = str(coco8 / "instances_coco8seg_train.json")
    assert main([c if c != train_ann else str(tmp_path / "bad.json") for c in common]
                + ["--out", str(tmp_path / "c")]) == 2
    assert "missing.jpg" in capsys.readouterr().err


def test_multiscale_shorter_side_resize_of_the_1x_recipe(coco8):
    """coco-maskrcnn-1x's resizing: training shorter side drawn from 480..800 (step 32) with the longer side
    capped at 1333, evaluation at shorter side 800; boxes and masks follow the image."""
    import random

    from hpvit.engine.recipe import load_recipe
    from hpvit.tasks.detection import coco_dataset

    r = load_recipe("coco-maskrcnn-1x")
    src = CocoSource(coco8 / "instances_coco8seg_train.json", coco8 / "images" / "train")
    random.seed(0)
    train = coco_dataset(src, [0, 1, 2], True, r)
    seen = set()
    for _ in range(12):
        for i in range(3):
            img, t = train[i]
            h, w = img.shape[-2:]
            short, long_ = min(h, w), max(h, w)
            oh, ow = t["orig_size"]
            assert long_ <= 1333 and (short in r.train_short_sides or long_ >= 1332), (h, w)
            assert t["masks"].shape[-2:] == (h, w)
            assert abs(t["scale"][0] * oh - h) < 1 and abs(t["scale"][1] * ow - w) < 1
            seen.add(short)
    assert len(seen) >= 4  # several scales drawn
    img, t = coco_dataset(src, [0], False, r)[0]
    assert min(img.shape[-2:]) == 800 or max(img.shape[-2:]) >= 1332
    with pytest.raises(hpvit.ConfigError, match="--lsj"):
        coco_dataset(src, [0], True, r, lsj=True)


@pytest.mark.slow
def test_paper_recipe_runs_end_to_end_scaled_down(tmp_path, coco8, small_vit_init):
    """`--recipe coco-maskrcnn-1x`, scaled down with --set: its step schedule (x0.1 after the lr_steps epoch),
    multi-scale shorter sides and test size reach a real run; the recipe is recorded in the run folder."""
    from hpvit.cli import main

    out = tmp_path / "r"
    args = ["train", "det", "--recipe", "coco-maskrcnn-1x", "--model", small_vit_init, "--config", "paper-det",
            "--ann", coco8 / "instances_coco8seg_train.json", "--data", coco8 / "images" / "train",
            "--eval-ann", coco8 / "instances_coco8seg_val.json", "--eval-data", coco8 / "images" / "val",
            "--epochs", "2", "--batch-size", "2", "--workers", "0", "--threads", "1", "--amp", "none",
            "--set", "lr_steps=[1]", "--set", "warmup_iters=0", "--set", "train_short_sides=[96,128]",
            "--set", "max_long_side=160", "--set", "test_short_side=96", "--set", "eval_every_epochs=2",
            "--rcnn", "box_batch_size_per_image=32", "--rcnn", "rpn_post_nms_top_n_train=100",
            "--rcnn", "rpn_post_nms_top_n_test=100", "--out", out]
    assert main([str(a) for a in args]) == 0
    rec = json.loads((out / "recipe.json").read_text())
    assert rec["name"] == "coco-maskrcnn-1x" and rec["schedule"] == "step" and rec["train_short_sides"] == [96, 128]
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if json.loads(line).get("kind") == "train"]
    base = 1.6e-3 * 2 / 256  # blr x global batch / 256
    assert lrs[0] == pytest.approx(base, rel=1e-6) and lrs[-1] == pytest.approx(base * 0.1, rel=1e-6)
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 4 and res["eval_images"] == 4


def test_rcnn_head_widths_match_torchvision_and_bad_settings_are_refused(small_vit_init):
    """hpvit's head-width keys build torchvision's own head modules: at torchvision's default widths (box 1024,
    mask 256) every tensor name and shape equals torchvision's default Mask R-CNN heads, so files stay
    interchangeable; smaller widths change only those layers. Unknown keys (which torchvision would hand to its
    transform and silently ignore) and settings that leave the heads without RoIs are ConfigErrors."""
    from torchvision.models.detection import MaskRCNN

    from hpvit.engine.recipe import load_recipe
    from hpvit.errors import ConfigError

    def heads(m):
        return {k: tuple(v.shape) for k, v in m.state_dict().items() if k.startswith(("roi_heads", "rpn"))}

    default = build_detector(str(small_vit_init), "plain-det", 3, 64, fpn_channels=32)
    explicit = build_detector(str(small_vit_init), "plain-det", 3, 64, rcnn=dict(fpn_channels=32, box_head_dim=1024,
                                                                                 mask_head_dim=256))
    tv = MaskRCNN(default.detector.backbone, num_classes=4)  # torchvision's own defaults on the same FPN
    assert heads(explicit.detector) == heads(default.detector) == heads(tv)
    small = build_detector(str(small_vit_init), "plain-det", 3, 64, rcnn=load_recipe("det-small").rcnn)
    h = heads(small.detector)
    assert h["roi_heads.box_head.fc7.weight"] == (256, 256) and h["roi_heads.box_head.fc6.weight"] == (256, 128 * 49)
    assert h["roi_heads.mask_head.0.0.weight"] == (128, 128, 3, 3)
    assert small.detector.backbone.out_channels == 128 and small.rcnn.get("fpn_channels") is None
    assert small.detector.roi_heads.fg_bg_sampler.batch_size_per_image == 128
    for bad, words in ((dict(representation_size=128), "did you mean"), (dict(box_batch_size_per_image=0), "RoIs"),
                       (dict(box_positive_fraction=1.5), "(0, 1]"), (dict(fpn_channels=0), "fpn_channels"),
                       (dict(mask_head_dim=-8), "mask_head_dim")):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            build_detector(str(small_vit_init), "plain-det", 3, 64, rcnn=bad)
