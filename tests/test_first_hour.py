"""A new user's first hour (issue 11): fast --help, one subset naming scheme, defaults that fit the data,
one hpvit.load for every file hpvit writes, saved files that describe themselves, readable pictures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import pytest
import torch
from PIL import Image

import hpvit
from hpvit.cli import build_parser, main
from hpvit.config import RECOMMENDED
from hpvit.errors import CheckpointError

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory) -> Path:
    """A random 4-block, 64-wide timm ViT (patch 16) saved as a plain state dict."""
    from helpers import save_small_vit

    return save_small_vit(tmp_path_factory.mktemp("init") / "tiny_vit.pth", img_size=64)


@pytest.fixture(scope="module")
def deep_init(tmp_path_factory) -> Path:
    """A random 12-block, 32-wide ViT: deep enough for every depth split."""
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=12, embed_dim=32, num_heads=2, img_size=64)
    p = tmp_path_factory.mktemp("init") / "deep_vit.pth"
    torch.save(m.state_dict(), p)
    return p


def _images(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """ImageFolder train/ and val/ with classes a, b of random 40x40 pictures."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = torch.randint(0, 255, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(root / split / c / f"{i}.png")
    return root


class FigureTexts:
    """Every title, text and legend label of the figures saved while active (matplotlib figures only)."""

    def __init__(self, monkeypatch):
        from matplotlib.figure import Figure

        self.texts: list[str] = []
        self.markers: list[str] = []
        self.xticks: list[float] = []
        original = Figure.savefig

        def savefig(fig, *a, **k):
            for ax in fig.axes:
                self.texts += [ax.get_title()] + [t.get_text() for t in ax.texts]
                self.markers += [ln.get_marker() for ln in ax.lines]
                lo, hi = ax.get_xlim()
                self.xticks += [t for t in ax.get_xticks() if lo <= t <= hi]
            self.texts += [t.get_text() for t in fig.texts]
            for leg in fig.legends:
                self.texts += [t.get_text() for t in leg.get_texts()]
            return original(fig, *a, **k)

        monkeypatch.setattr(Figure, "savefig", savefig)

    def has(self, part: str) -> bool:
        return any(part in t for t in self.texts)


# ------------------------------------------------------------------ command line
HELP_PROBE = """
import contextlib, io, sys
sys.argv[0] = "hpvit"  # as the console script starts
from hpvit.cli import build_parser
for cmd in ([], ["train", "cls"], ["eval", "cls"], ["train", "det"], ["eval", "det"], ["train", "seg"], ["eval", "seg"],
            ["info"], ["demo"], ["convert"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser(cmd + ["--help"]).parse_args(cmd + ["--help"])
    assert "usage: hpvit" in out.getvalue(), cmd
print(sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules))
"""


def test_help_imports_no_torch():
    """`hpvit --help` and every subcommand's --help parse without importing torch (so they answer at once)."""
    r = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "hpvit", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "train" in r.stdout and "eval" in r.stdout


def test_one_subset_naming_scheme_with_old_aliases():
    p = build_parser()
    a = p.parse_args(["train", "cls", "--init", "x", "--data", "d", "--out", "o", "--max-train-samples", "8",
                      "--max-eval-samples", "4"])
    assert (a.train_images, a.eval_images) == ("8", "4")
    a = p.parse_args(["train", "seg", "--init", "x", "--data", "d", "--out", "o", "--max-train-images", "5",
                      "--eval-images", "0:3"])
    assert (a.train_images, a.eval_images) == ("5", "0:3")
    a = p.parse_args(["train", "det", "--model", "x", "--ann", "a", "--data", "i", "--out", "o", "--train-images", "0:100",
                      "--val-images", "100:128"])
    assert (a.train_images, a.eval_images) == ("0:100", "100:128")
    with pytest.raises(SystemExit):
        p.parse_args(["train", "cls", "--init", "x", "--data", "d", "--out", "o", "--train-images", "many"])
    from hpvit.data.subset import subset_count, subset_indices

    assert subset_indices("3", 10, "--eval-images") == [0, 1, 2] and subset_indices("8:", 10, "--x") == [8, 9]
    with pytest.raises(hpvit.ConfigError, match="class-balanced"):
        subset_count("0:10", "--train-images")


def test_info_accepts_every_preset(deep_init, capsys):
    assert {"plain-det", "plain-seg"} <= set(hpvit.list_presets())  # the plain baselines are presets too
    for name in hpvit.list_presets():
        assert main(["info", str(deep_init), "--config", name, "--img-size", "64"]) == 0, name
        assert "total" in capsys.readouterr().out


def test_recipe_auto_and_worker_cap():
    from hpvit.engine.loop import usable_cores, usable_workers
    from hpvit.cli.cls import choose_recipe

    assert choose_recipe(5_000, "cpu")[0] == "cifar-mini"
    assert choose_recipe(1_281_167, "cpu")[0] == "cifar-mini"  # 100 epochs of ImageNet on a CPU is not a default
    assert choose_recipe(50_000, "cuda")[0] == "cifar-mini"
    assert choose_recipe(1_281_167, "cuda")[0] == "imagenet-paper"
    assert usable_workers(10_000, 1, verbose=False) == usable_cores()
    assert usable_workers(0, 1) == 0 and usable_workers(64, 10_000, verbose=False) == 1


# ------------------------------------------------------------------ a classification run with the defaults
def test_default_train_cls_tells_what_it_does(tmp_path, tiny_init, capsys, monkeypatch):
    data, out = _images(tmp_path / "d"), tmp_path / "run"
    figs = FigureTexts(monkeypatch)
    rc = main(["train", "cls", "--model", str(tiny_init), "--data", str(data), "--out", str(out), "--img-size", "32",
               "--batch-size", "4", "--workers", "10000", "--threads", "1", "--set", "auto_augment=null"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "--recipe auto -> cifar-mini" in err and "recipe cifar-mini:" in err and "workers requested" in err
    assert json.loads((out / "recipe.json").read_text())["name"] == "cifar-mini"
    assert "epoch 1/1: top1" in err and "evaluating val" in err
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["epoch"] for r in recs} == {1}  # train and eval records of the first epoch are both epoch 1
    ev = [r for r in recs if r["kind"] == "eval"][0]
    assert ev["split"] == "val" and ev["images"] == 4 and ev["eval_count"] == 4 and isinstance(ev["eval_count"], int)
    res = json.loads((out / "results.json").read_text())
    assert res["eval_split"] == "val" and res["metric_units"]["top1"].startswith("%") and res["eval_count"] == 4
    assert "1e+" not in err
    assert figs.has("training loss (") and "o" in figs.markers  # curves: every logged point drawn with a marker
    assert Image.open(out / "curves.png").size[0] >= 800

    # the run folder loads with hpvit.load and describes its own conversion
    model = hpvit.load(out)
    rep = model.reuse_report()
    assert str(tiny_init) in rep.source and len(rep.reused) > 0 and "<random init>" not in rep.summary()
    assert main(["info", str(out / "model.safetensors"), "--config", "identity"]) == 0
    text = capsys.readouterr().out
    assert "--config identity ignored" in text and f"config {RECOMMENDED['cls']}" in text and str(tiny_init) in text
    with pytest.raises(CheckpointError, match="training checkpoint"):
        hpvit.load(out / "checkpoint-last.pt")

    assert main(["eval", "cls", "--model", str(out), "--data", str(data), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "evaluating val (4 images)" in err
    assert "hpvit eval: top1 " in err and "% (evaluating val, 4 images" in err  # one line besides the JSON

    # export takes the run folder too, at the training size, and says the input the file really takes
    pytest.importorskip("onnxruntime", reason="onnxruntime (a test extra) is needed to run the exported file")
    from hpvit.export import run_onnx

    onnx = tmp_path / "cls.onnx"
    assert main(["export", str(out), "-o", str(onnx)]) == 0
    text = capsys.readouterr().out
    assert "input images (1, 3, 32, 32)" in text and "32 px (its training size (model.json))" in text
    assert "batch fixed at 1" in text
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        want = model.eval()(x)
    assert (torch.as_tensor(run_onnx(onnx, x)[0]) - want).abs().max() < 1e-3  # the run's model, as PyTorch runs it
    with pytest.raises(Exception):  # the batch really is fixed
        run_onnx(onnx, torch.rand(2, 3, 32, 32))


def test_failed_train_leaves_no_folder(tmp_path, capsys):
    data, out = _images(tmp_path / "d"), tmp_path / "new" / "run"
    rc = main(["train", "cls", "--model", str(tmp_path / "missing.pth"), "--data", str(data), "--out", str(out),
               "--recipe", "cifar-mini", "--workers", "0"])
    assert rc == 2 and "missing.pth" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ one load() for detectors and segmenters
def _seg_task_meta(model, config: str) -> dict:
    from hpvit.tasks.segmentation import segmenter_meta

    return segmenter_meta(model, config, "camvid", crop=64, base_size=None, head_channels=32)


def test_load_returns_detector_and_segmenter(tmp_path, tiny_init, capsys):
    from hpvit.export import save_dense
    from hpvit.models.detector import MaskRCNNModel
    from hpvit.models.segmenter import UperNetSegmenter
    from hpvit.models.detector import build_detector
    from hpvit.models.segmenter import build_segmenter
    from hpvit.tasks.detection import detector_meta

    det = build_detector(str(tiny_init), "plain-det", 2, 64, rcnn={"rpn_post_nms_top_n_test": 20}).eval()
    src = SimpleNamespace(cat_ids=[1, 2], cat_names=["cat", "dog"])
    (tmp_path / "det").mkdir()
    save_dense(det, tmp_path / "det" / "model.safetensors", detector_meta(det, "plain-det", src, 64))
    seg = build_segmenter(str(tiny_init), "paper-seg", 11, 64, channels=32).eval()
    save_dense(seg, tmp_path / "seg.safetensors", _seg_task_meta(seg, "paper-seg"))

    d2 = hpvit.load(tmp_path / "det")  # a training folder works as well as the file
    s2 = hpvit.load(tmp_path / "seg.safetensors")
    assert isinstance(d2, MaskRCNNModel) and isinstance(s2, UperNetSegmenter)
    assert d2.hpvit_meta["cat_names"] == ["cat", "dog"] and s2.hpvit_meta["task"] == "seg"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(seg(x), s2.eval()(x))
    assert str(tiny_init) in s2.body.vit.reuse_report().source and len(s2.body.vit.reuse_report().reused) > 0

    assert main(["info", str(tmp_path / "seg.safetensors"), "--img-size", "64"]) == 0
    text = capsys.readouterr().out
    assert "UperNet segmenter (11 classes), backbone paper-seg" in text and "reused" in text
    assert main(["info", str(tmp_path / "det" / "model.safetensors"), "--img-size", "64"]) == 0
    assert "Mask R-CNN detector (2 classes), backbone plain-det" in capsys.readouterr().out
    png = tmp_path / "demo.png"
    assert main(["demo", "--model", str(tmp_path / "seg.safetensors"), "--img-size", "64", "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000
    assert main(["demo", "--model", str(tmp_path / "det" / "model.safetensors"), "--img-size", "64",
                 "--out", str(png), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "4-level feature pyramid" in err and "--format" not in err

    # export: a segmenter gives its transformed backbone's pyramid at the training crop; a plain baseline cannot
    pytest.importorskip("onnxruntime", reason="onnxruntime (a test extra) is needed to run the exported file")
    from hpvit.export import compare_onnx

    onnx = tmp_path / "seg.onnx"
    assert main(["export", str(tmp_path / "seg.safetensors"), "-o", str(onnx)]) == 0
    text = capsys.readouterr().out
    assert "exporting its backbone's 4-level pyramid" in text and "input images (1, 3, 64, 64)" in text
    assert "p1, p2, p3, p4" in text
    assert compare_onnx(s2.body.vit, onnx, torch.rand(1, 3, 64, 64), pyramid=True) < 1e-3
    assert main(["export", str(tmp_path / "det"), "-o", str(tmp_path / "det.onnx")]) == 2
    err = capsys.readouterr().err
    assert "plain plain-det backbone" in err and "paper-det, paper-seg" in err and not (tmp_path / "det.onnx").exists()


# ------------------------------------------------------------------ pictures
def test_segmentation_picture_has_titles_and_legend(tmp_path, monkeypatch):
    from hpvit.data.segmentation import get_layout
    from hpvit.evaluation.segmentation import draw_segmentation, spread_indices

    assert spread_indices(101, 3) == [0, 50, 100] and spread_indices(2, 3) == [0, 1]
    figs = FigureTexts(monkeypatch)
    lay = get_layout("camvid")
    lab = torch.zeros(40, 60, dtype=torch.long)
    lab[:20] = 1
    pred = torch.full((40, 60), 2, dtype=torch.long)
    rows = [(torch.rand(3, 40, 60), lab, pred), (torch.rand(3, 40, 60), lab, lab)]
    path = draw_segmentation(rows, lay.palette, tmp_path / "p.png", lay.classes, ["a.png", "b.png"], "val split")
    w, h = Image.open(path).size
    assert w >= 800 and h >= 400
    assert figs.has("a.png") and figs.has("ground truth") and figs.has("prediction (100.0% of labelled pixels right)")
    assert {lay.classes[0], lay.classes[1], lay.classes[2]} <= set(figs.texts)  # legend names the classes shown


def test_detection_picture_shows_ground_truth_and_says_when_nothing_is_detected(tmp_path, monkeypatch):
    from hpvit.evaluation.detection import draw_predictions

    figs = FigureTexts(monkeypatch)
    img = torch.rand(3, 64, 80)
    target = {"boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]), "labels": torch.tensor([2]),
              "masks": torch.zeros(1, 64, 80, dtype=torch.uint8)}
    weak = {"boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.05]),
            "masks": torch.zeros(1, 1, 64, 80)}
    strong = {**weak, "scores": torch.tensor([0.9])}
    path = draw_predictions([img, img], [weak, strong], ["cat", "dog"], tmp_path / "d.png", targets=[target, target],
                            titles=["000001.jpg", "000002.jpg"])
    w, h = Image.open(path).size
    assert w >= 600 and h >= 500
    assert figs.has("000001.jpg: ground truth (1 object)") and figs.has("no detections above threshold 0.30")
    assert figs.has("best: cat 0.05") and figs.has("predictions: 1 with score >= 0.30") and figs.has("cat 0.90")


# ------------------------------------------------------------------ small image sets, explained metrics (issue 21)
def test_adapt_on_a_small_set_fits_the_batch_and_explains_its_metrics(tmp_path, tiny_init, capsys, monkeypatch):
    imgs = _images(tmp_path / "d", n_train=3, n_val=0) / "train"  # 6 unlabeled images, recipe batch 32
    out = tmp_path / "adapt"
    base = ["adapt", "--model", str(tiny_init), "--data", str(imgs), "--eval-data", str(imgs), "--img-size", "32",
            "--epochs", "1", "--workers", "0", "--threads", "1"]
    assert main(base + ["--out", str(out), "--batch-size", "32"]) == 2  # a batch the user chose: named, not changed
    err = capsys.readouterr().err
    assert "--batch-size 6 (or less) would fit" in err and "recipe.json" not in err and not out.exists()
    figs = FigureTexts(monkeypatch)
    assert main(base + ["--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "using batch_size 6, the largest that fits" in err
    assert "agree1 = % of held-out images whose top-1 class is the plain model's top-1 class" in err
    res = json.loads((out / "results.json").read_text())
    assert res["metric_units"]["agree1"].startswith("%") and "nats" in res["metric_units"]["kl"]
    assert res["global_batch"] == 6
    assert figs.has("agree1: % of held-out images") and figs.has("%")  # the unit, in words, on curves.png
    assert figs.xticks and all(t == int(t) for t in figs.xticks)  # one step, one epoch: no fractional ticks


def test_train_cls_checks_the_batch_before_reading_any_image(tmp_path, tiny_init, capsys):
    data = _images(tmp_path / "d", n_train=2, n_val=1)
    (data / "val" / "a" / "broken.png").write_bytes(b"not a png")  # decoding the eval set would fail on it
    rc = main(["train", "cls", "--model", str(tiny_init), "--data", str(data), "--out", str(tmp_path / "run"),
               "--recipe", "cifar-mini", "--train-images", "4", "--batch-size", "8", "--workers", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "4 training images do not fill one optimizer step of batch_size 8" in err and "--batch-size 4" in err
    assert "broken" not in err and not (tmp_path / "run").exists()
