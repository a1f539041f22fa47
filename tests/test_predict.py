"""``hpvit predict`` and ``hpvit.predict``: checked against peers (timm's own pipeline, ``hpvit eval det``'s
predictions, PyTorch vs onnxruntime) and against hostile input (an existing --out, undecodable images).

Models are tiny (4 blocks, width 64) and built in the test, not trained: what is checked is the path from
an image file to the numbers, which does not depend on what the weights learned.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from helpers import randomize_new_params, save_small_vit
from PIL import Image

import hpvit
from hpvit.cli import main
from hpvit.data.preprocess import Preprocess
from hpvit.errors import BadImageError, InputError

HAS_ONNX = all(importlib.util.find_spec(n) for n in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="ONNX checks need onnx, onnxscript, onnxruntime: pip install -e \".[export]\"")
SRC = Path(__file__).resolve().parents[1] / "src"


def _pictures(folder: Path, sizes=((40, 50), (47, 50), (64, 45))) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w) in enumerate(sizes):
        p = folder / f"pic{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory) -> Path:
    """A classifier run folder as `hpvit train cls` leaves it: model.safetensors + model.json (preprocessing, classes)."""
    root = tmp_path_factory.mktemp("cls_run")
    m = hpvit.from_plain(save_small_vit(root / "plain.pth", img_size=32), "paper-cls", num_classes=3, img_size=32)
    randomize_new_params(m)
    hpvit.save(m, root / "run" / "model.safetensors")
    (root / "run" / "model.json").write_text(json.dumps(
        {"img_size": 32, "interpolation": "bilinear", "crop_pct": 0.9, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
         "classes": ["cat", "dog", "fox"]}))
    return root / "run"


# ---------------------------------------------------------------------------------------------- peers
@pytest.mark.parametrize("interp,crop_pct,size", [("bicubic", 0.875, 32), ("bilinear", 0.9, 48), ("nearest", 1.0, 33)])
def test_preprocessing_equals_timm_create_transform(interp, crop_pct, size):
    """The numpy/PIL preprocessing (used by the PyTorch and the torch-free ONNX path) = timm's eval transform."""
    from timm.data import create_transform

    tf = create_transform(input_size=size, is_training=False, interpolation=interp, crop_pct=crop_pct,
                          mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    pre = Preprocess(img_size=size, crop_pct=crop_pct, interpolation=interp, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    rng = np.random.default_rng(1)
    for h, w in ((40, 50), (77, 35), (size, size)):
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        assert np.array_equal(pre(img), tf(img).numpy()), (h, w)


def test_predict_equals_timm_pipeline_on_the_imagenet_sample(tmp_path, deit_tiny_path):
    """Real DeiT-Tiny, identity config, 4 real ImageNet images: top-5 classes and scores of hpvit.predict on a run
    folder (model.json from timm's data config) = timm's resolve_data_config + create_transform + the timm model."""
    import timm
    from timm.data import create_transform, resolve_data_config

    imgs = sorted(shared_path("imagenet_sample", "images").iterdir())[::25][:4]
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    ref.load_state_dict(torch.load(deit_tiny_path, map_location="cpu", weights_only=True))
    ref.eval()
    cfg = resolve_data_config({}, model=ref)
    tf = create_transform(**cfg)
    with torch.no_grad():
        want = ref(torch.stack([tf(Image.open(p).convert("RGB")) for p in imgs])).softmax(-1)
    hpvit.save(hpvit.from_plain(deit_tiny_path, "identity"), tmp_path / "run" / "model.safetensors")
    (tmp_path / "run" / "model.json").write_text(json.dumps(
        {"img_size": cfg["input_size"][-1], "crop_pct": cfg["crop_pct"], "interpolation": cfg["interpolation"],
         "mean": list(cfg["mean"]), "std": list(cfg["std"])}))
    got = hpvit.predict(tmp_path / "run", imgs, top_k=5, batch_size=4)
    for rec, p, w in zip(got, imgs, want):
        v, i = w.topk(5)
        assert rec["image"] == str(p)
        assert [t["class_id"] for t in rec["topk"]] == i.tolist()
        assert np.allclose([t["score"] for t in rec["topk"]], v.numpy(), atol=1e-5)
    labels = dict(line.split("\t") for line in shared_path("imagenet_sample", "labels.tsv").read_text().split("\n")[1:] if line)
    top1 = [int(labels[Path(r["image"]).name]) == r["topk"][0]["class_id"] for r in got]
    assert sum(top1) >= 3, top1  # the real weights and the real pictures: mostly right
    assert got[0]["topk"][0]["class"] and not got[0]["topk"][0]["class"].startswith("class ")  # ImageNet names


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    """A Mask R-CNN file as `hpvit train det` writes it (paper-det on a tiny ViT, untrained heads, every detection
    kept so there are many to compare) for the coco8-seg val categories."""
    from hpvit.data.coco import CocoSource
    from hpvit.export import save_dense
    from hpvit.models.detector import build_detector
    from hpvit.tasks.detection import detector_meta

    coco = shared_path("coco", "coco8-seg")
    src = CocoSource(coco / "instances_coco8seg_val.json", coco / "images" / "val")
    root = tmp_path_factory.mktemp("det_run")
    torch.manual_seed(0)
    rcnn = {"box_score_thresh": 0.0, "box_detections_per_img": 15, "rpn_pre_nms_top_n_test": 100,
            "rpn_post_nms_top_n_test": 50, "box_head_dim": 64}
    model = build_detector(save_small_vit(root / "plain.pth", img_size=32), "paper-det", len(src.cat_ids), 96, rcnn=rcnn)
    save_dense(model.eval(), root / "run" / "model.safetensors", detector_meta(model, "paper-det", src, 96))
    return root / "run", coco


def test_predict_det_equals_eval_det_exactly(tmp_path, det_run, capsys):
    run, coco = det_run
    ann, images = coco / "instances_coco8seg_val.json", coco / "images" / "val"
    assert main(["eval", "det", "--model", str(run), "--ann", str(ann), "--data", str(images), "--out",
                 str(tmp_path / "ev"), "--batch-size", "1", "--threads", "1", "--vis-images", "1"]) == 0
    want = json.loads((tmp_path / "ev" / "predictions.json").read_text())
    files = {im["id"]: im["file_name"] for im in json.loads(ann.read_text())["images"]}
    paths = [images / files[i] for i in sorted(files)]
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run), *map(str, paths), "--out", str(out), "--score-threshold", "0",
                 "--batch-size", "1", "--threads", "1"]) == 0
    assert "hpvit predict: 4 image(s)" in capsys.readouterr().out
    got = json.loads((out / "predictions.json").read_text())
    ids = {im["id"]: Path(im["file_name"]).name for im in json.loads((out / "images.json").read_text())["images"]}
    by_name = {name: i for i, name in files.items()}
    for g in got:
        g["image_id"] = by_name[ids[g["image_id"]]]
    key = lambda d: (d["image_id"], -d["score"], d["bbox"])  # noqa: E731
    assert len(want) > 20 and sorted(got, key=key) == sorted(want, key=key)
    assert all("segmentation" in g for g in got)
    for p in paths:
        assert Image.open(out / "overlays" / f"{p.stem}.png").size == Image.open(p).size
    # the Python API gives the same records, and the default threshold keeps only confident ones
    recs = hpvit.predict(run, [Image.open(paths[0])], score_threshold=0)
    assert recs[0]["detections"] == [dict(g, image_id=1) for g in got if g["image_id"] == by_name[paths[0].name]]
    assert all(d["score"] >= 0.3 for d in hpvit.predict(run, paths[:1], batch_size=1)[0]["detections"])


def test_predict_seg_label_png_in_the_palette(tmp_path):
    """A segmenter file: the label PNG holds the arg-max of eval seg's logits (same resizing, same inference), in
    the dataset's palette, at the image's size; the overlay beside it."""
    from hpvit.data.segmentation import SegDataset, get_layout
    from hpvit.evaluation.segmentation import predict_logits
    from hpvit.export import load, save_dense
    from hpvit.models.segmenter import build_segmenter
    from hpvit.tasks.segmentation import segmenter_meta

    root = tmp_path / "camvid"
    for split, d in (("val", "valannot"),):
        (root / split).mkdir(parents=True)
        (root / d).mkdir()
        for i, (h, w) in enumerate(((75, 101), (60, 44))):
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / split / f"s{i}.png")
            Image.fromarray(rng.integers(0, 11, (h, w), dtype=np.uint8)).save(root / d / f"s{i}.png")
    torch.manual_seed(0)
    model = build_segmenter(save_small_vit(tmp_path / "plain.pth", img_size=32), "paper-seg", 11, 64, channels=16)
    save_dense(model, tmp_path / "run" / "model.safetensors", segmenter_meta(model, "paper-seg", "camvid", 64, 80, 16))
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(tmp_path / "run"), str(root / "val"), "--out", str(out), "--threads", "1"]) == 0
    ds = SegDataset(root, "camvid", "val", False, 64, 80)
    loaded = load(tmp_path / "run").eval()
    palette = get_layout("camvid").palette
    entries = json.loads((out / "predictions.json").read_text())
    assert [Path(e["image"]).name for e in entries] == ["s0.png", "s1.png"]
    for i, e in enumerate(entries):
        img, lab = ds[i]
        want = predict_logits(loaded, img, tuple(lab.shape), "whole", 64).argmax(0).numpy()
        png = Image.open(out / e["label_png"])
        assert png.mode == "P" and np.array_equal(np.asarray(png), want)
        assert np.array_equal(np.asarray(png.getpalette()[: 3 * len(palette)]).reshape(-1, 3), np.asarray(palette))
        assert Image.open(out / e["overlay"]).size == (lab.shape[1], lab.shape[0])
        assert sum(e["class_fractions"].values()) == pytest.approx(1.0)


@needs_onnx
def test_onnx_classifier_runs_without_torch_within_1e4_of_pytorch(tmp_path, cls_run):
    """`hpvit export` keeps the run's preprocessing and class names in the ONNX file; `hpvit predict` on it runs in a
    process where torch and timm cannot be imported, and agrees with PyTorch to 1e-4."""
    from hpvit.export import export_onnx

    pics = _pictures(tmp_path / "pics")
    onnx_path = tmp_path / "cls.onnx"
    export_onnx(hpvit.load(cls_run), onnx_path, img_size=32)
    code = ("import sys; sys.modules['torch'] = None; sys.modules['timm'] = None; sys.argv[0] = 'hpvit'\n"
            "from hpvit.cli.main import main\nsys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-c", code, "predict", "--model", str(onnx_path), str(tmp_path / "pics"),
                        "--out", str(tmp_path / "o"), "--top-k", "3", "--threads", "1"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "o" / "predictions.json").read_text())
    want = hpvit.predict(cls_run, pics, top_k=3)
    assert [g["image"] for g in got] == [str(p) for p in pics]
    for g, w in zip(got, want):
        assert [t["class"] for t in g["topk"]] == [t["class"] for t in w["topk"]]
        assert set(g["topk"][0]) == {"class_id", "class", "score"} and g["topk"][0]["class"] in ("cat", "dog", "fox")
        assert np.allclose([t["score"] for t in g["topk"]], [t["score"] for t in w["topk"]], atol=1e-4)


@needs_onnx
def test_onnx_detector_backbone_features_within_1e4_of_pytorch(tmp_path, det_run):
    from hpvit.export import export_onnx

    vit = hpvit.load(det_run[0]).body.vit
    path = export_onnx(vit, tmp_path / "backbone.onnx", img_size=96, pyramid=True)
    pics = _pictures(tmp_path / "pics", sizes=((90, 120), (100, 70)))
    got, want = hpvit.predict(path, pics), hpvit.predict(vit, pics)
    for g, w in zip(got, want):
        assert len(g["features"]) == len(w["features"]) == 4
        for a, b in zip(g["features"], w["features"]):
            assert a.shape == b.shape and np.abs(a - b).max() < 1e-4


# ---------------------------------------------------------------------------------------------- hostile input
def test_predict_never_replaces_out_and_names_bad_images(tmp_path, cls_run, capsys):
    pics = _pictures(tmp_path / "pics")
    bad = tmp_path / "pics" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = ["predict", "--model", str(cls_run), str(tmp_path / "pics" / "*.png"), "--out", str(out), "--threads", "1"]
    capsys.readouterr()
    assert main(args) == 2  # an existing --out is not replaced without --overwrite, and is left as it was
    assert "exists; refusing to replace it (add --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    # an undecodable image: named, an error; the run leaves nothing behind
    assert main(["predict", "--model", str(cls_run), str(tmp_path / "pics"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpvit: error: image") and "broken.jpg" in err and "--skip-bad-images" in err
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2*"))
    # --skip-bad-images: the others are predicted, the bad one listed with its reason
    assert main(["predict", "--model", str(cls_run), str(tmp_path / "pics"), "--out", str(tmp_path / "o2"),
                 "--skip-bad-images", "--top-k", "2"]) == 0
    assert "3 image(s)" in capsys.readouterr().out
    entries = json.loads((tmp_path / "o2" / "predictions.json").read_text())
    assert [e["image"] for e in entries] == [str(p) for p in pics] and all(len(e["topk"]) == 2 for e in entries)
    assert entries[0]["topk"][0]["class"] in ("cat", "dog", "fox")
    assert json.loads((tmp_path / "o2" / "skipped.json").read_text())[0]["image"] == str(bad)
    # --overwrite replaces the folder, but never one that holds the images it reads
    assert main(args + ["--overwrite"]) == 0 and not (out / "mine.txt").exists()
    assert main(["predict", "--model", str(cls_run), str(pics[0]), "--out", str(tmp_path / "pics"), "--overwrite"]) == 2
    assert "holds" in capsys.readouterr().err and pics[0].is_file()
    assert main(["predict", "--model", str(cls_run), str(tmp_path / "none*.png"), "--out", str(tmp_path / "o3")]) == 2
    assert "matches no file" in capsys.readouterr().err
    with pytest.raises(InputError, match="not an image"):
        hpvit.predict(cls_run, np.zeros((4, 5, 7), np.uint8))
    with pytest.raises(BadImageError, match="broken.jpg"):
        hpvit.predict(cls_run, [pics[0], bad])


def test_predict_refuses_what_it_cannot_run(tmp_path, cls_run, capsys):
    from hpvit.errors import CheckpointError, ConfigError

    pic = _pictures(tmp_path / "pics", sizes=((20, 30),))[0]
    with pytest.raises(ConfigError, match="no such CUDA device"):
        hpvit.predict(cls_run, pic, device="cuda:99")
    with pytest.raises(InputError, match=r"float64 array must hold uint8 pixels 0\.\.255 or floats in \[0, 1\]"):
        hpvit.predict(cls_run, np.full((8, 8, 3), 7.0))
    from hpvit.models.segmenter import build_segmenter

    seg = build_segmenter(save_small_vit(tmp_path / "p.pth", img_size=32), "paper-seg", 2, 64, channels=8)
    with pytest.raises(ConfigError, match="UperNetSegmenter carries no description"):
        hpvit.predict(seg, pic)
    # a broken model.json: the model still loads and predicts (recipe defaults), with a warning naming the file
    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((cls_run / "model.safetensors").read_bytes())
    (broken / "model.json").write_text("{not json")
    with pytest.warns(UserWarning, match="model.json: the run's preprocessing record cannot be read"):
        assert hpvit.predict(broken, pic)[0]["topk"][0]["class"].startswith("class ")
    if HAS_ONNX:
        import onnx
        from onnx import TensorProto, helper

        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        m.ir_version = 9  # one every onnxruntime of the last years reads
        onnx.save(m, tmp_path / "other.onnx")
        with pytest.raises(ConfigError, match=r"other\.onnx was not written by `hpvit export`"):
            hpvit.predict(tmp_path / "other.onnx", pic)
        (tmp_path / "junk.onnx").write_bytes(b"junk")
        assert main(["predict", "--model", str(tmp_path / "junk.onnx"), str(pic), "--out", str(tmp_path / "o")]) == 2
        assert "junk.onnx: not a readable ONNX file" in capsys.readouterr().err
