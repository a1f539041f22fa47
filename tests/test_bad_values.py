"""Issue 29 (part A): values that used to train backwards, replace a run's results, corrupt a list or end in a
traceback. Each case builds its hostile input here and must end in one ``hpvit: error:`` line (or a refusal)
that names the problem and the fix; numbers are checked against timm / pycocotools where they can be."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hpvit
from hpvit.cli import main
from hpvit.config import get_config
from hpvit.data.check import SkipBadImages, read_skipped, write_skipped
from hpvit.engine.identity import check_identity, check_out_outside_data
from hpvit.engine.recipe import Recipe
from hpvit.errors import BadImageError, ConfigError

from test_robustness import _folder, _train, tiny_vit  # noqa: F401  (tiny_vit: a fixture)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools, numpy 2


def _one_error_line(err: str, *parts: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("hpvit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ recipe values (defect 3 and --set)
@pytest.mark.parametrize("kv, says", [
    ("clip_grad=-1", "clip_grad must be a positive gradient norm or null"),
    ("min_lr=-0.01", "min_lr must be >= 0"),
    ("weight_decay=-1", "weight_decay must be >= 0"),
    ("std=[0,0,0]", "std must be three positive numbers"),
    ('interpolation="foo"', "interpolation must be one of bicubic"),
    ("betas=[1.5,0.999]", "betas must both be in [0, 1)"),
    ('auto_augment="rand-bogus"', "auto_augment 'rand-bogus': unknown section(s) ['bogus']"),
])
def test_nonsensical_recipe_values_are_refused_before_anything_runs(tmp_path, tiny_vit, capsys, kv, says):
    out = tmp_path / "run"
    assert main(_train(tiny_vit, _folder(tmp_path / "d"), out, "--set", kv)) == 2
    _one_error_line(capsys.readouterr().err, says, kv.split("=")[0])
    assert not out.exists()


def test_auto_augment_strings_match_what_timm_reads():
    """Every policy the recipe accepts builds in timm; timm itself runs "rand-bogus" as its default RandAugment
    without a word, which is why the recipe refuses it."""
    from timm.data import create_transform

    def ops(tf):
        return [type(t).__name__ + str(getattr(t, "num_layers", "")) for t in tf.transforms]

    for ok in ("rand-m9-mstd0.5-inc1", "rand-m7-n3", "augmix-m5-w3", "original", "v0r", "3a", None):
        create_transform(32, is_training=True, auto_augment=Recipe().replace(auto_augment=ok).auto_augment)
    assert ops(create_transform(32, is_training=True, auto_augment="rand-bogus")) == \
        ops(create_transform(32, is_training=True, auto_augment="rand"))
    for bad in ("rand-bogus", "augmix-z3", "randaugment", "rand-m9-x"):
        with pytest.raises(ConfigError, match="auto_augment"):
            Recipe().replace(auto_augment=bad)


# ------------------------------------------------------------------ device flags
@pytest.mark.parametrize("flags, says", [
    (["--threads", "-1"], "--threads -1: give a thread count >= 1"),
    (["--device", "gpu"], "--device 'gpu': not a device hpvit runs on; use cpu, cuda or cuda:N"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is usable here"),
])
def test_device_flags_are_checked_before_anything_loads(tmp_path, tiny_vit, capsys, flags, says):
    if flags[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    out = tmp_path / "run"
    assert main(_train(tiny_vit, _folder(tmp_path / "d"), out, *flags)) == 2
    _one_error_line(capsys.readouterr().err, says)
    assert not out.exists()


# ------------------------------------------------------------------ config JSON types
@pytest.mark.parametrize("fields, says", [
    ({"rel_pos": "no"}, "rel_pos: expected bool, got 'no'"),
    ({"drop_path_rate": "0.1"}, "drop_path_rate: expected float, got '0.1'"),
    ({"patch_stride": 0}, "patch_stride must be an integer >= 1 or null"),
    ({"window_sizes": [7, "7", None, None]}, "window_sizes: expected"),
])
def test_config_json_types_are_checked(tmp_path, fields, says):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps(fields))
    with pytest.raises(ConfigError, match=rf"{f}: .*" + says.replace("(", r"\(").replace(")", r"\)")):
        get_config(str(f))
    f.write_text(json.dumps({"rel_pos": False, "drop_path_rate": 0.1, "patch_stride": None}))
    cfg = get_config(str(f))
    assert cfg.rel_pos is False and cfg.drop_path_rate == 0.1 and cfg.patch_stride is None


# ------------------------------------------------------------------ eval outputs (defect 5)
def _fake_run(d: Path) -> bytes:
    """A training run folder as train writes it (the eval check needs no model: it runs before one loads)."""
    d.mkdir(parents=True)
    (d / "recipe.json").write_text("{}")
    (d / "metrics.jsonl").write_text("")
    (d / "results.json").write_text(json.dumps({"top1": 50.0, "epochs": 1, "steps": 4}))
    return (d / "results.json").read_bytes()


@pytest.mark.parametrize("task", ["cls", "det", "seg"])
def test_eval_never_replaces_a_training_runs_results(tmp_path, capsys, task):
    run = tmp_path / "run"
    before = _fake_run(run)
    tail = {"cls": ["--data", str(tmp_path), "--json", str(run / "results.json")],
            "det": ["--ann", str(tmp_path / "a.json"), "--data", str(tmp_path), "--out", str(run)],
            "seg": ["--data", str(tmp_path), "--out", str(run)]}[task]
    for extra in ([], ["--overwrite"]):
        assert main(["eval", task, "--model", str(run), *tail, *extra]) == 2
        _one_error_line(capsys.readouterr().err, "is a training run's folder", "results.json", "Choose another")
        assert (run / "results.json").read_bytes() == before


def test_eval_replaces_only_its_own_json_without_overwrite(tmp_path, capsys):
    from hpvit.cli.common import check_eval_outputs

    mine, foreign = tmp_path / "ev.json", tmp_path / "notes.json"
    mine.write_text(json.dumps({"top1": 1.0, "eval_time_s": 0.1}))  # what eval cls --json writes
    foreign.write_text("my notes")
    check_eval_outputs([mine], False, "--json")  # evaluating again replaces the earlier eval's file
    (tmp_path / "m.safetensors").write_bytes(b"")  # exists (checked first), unreadable: the refusal must come first
    assert main(["eval", "cls", "--model", str(tmp_path / "m.safetensors"), "--data", str(tmp_path), "--json",
                 str(foreign)]) == 2
    _one_error_line(capsys.readouterr().err, f"{foreign} exists and was not written by hpvit eval", "--overwrite")
    assert foreign.read_text() == "my notes"
    check_eval_outputs([foreign], True, "--json")


# ------------------------------------------------------------------ skipped-images.txt (defect 9 and the double entry)
def test_skipped_image_names_are_written_escaped_one_line_each(tmp_path):
    names = [os.fsdecode(b"train/a/caf\xe9-latin1.jpg"),  # not UTF-8: a surrogate in Python, unwritable as is
             "train/a/tab\there.jpg", "train/a/new\nline.jpg", "train/a/back\\slash.jpg", "train/a/plain.jpg"]
    f = tmp_path / "skipped-images.txt"
    write_skipped(f, [(n, f"image {n} cannot be decoded") for n in names])
    lines = f.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(names) and all(ln.count("\t") == 1 for ln in lines)
    assert lines[0].startswith("train/a/caf\\xe9-latin1.jpg\t") and lines[4].startswith("train/a/plain.jpg\t")
    back = read_skipped(f)
    assert [p for p, _ in back] == names
    assert os.fsencode(back[0][0]) == b"train/a/caf\xe9-latin1.jpg"  # the very bytes of the file's name
    assert back[1][1] == f"image {names[1]} cannot be decoded".replace("\t", " ")


class _Gone(torch.utils.data.Dataset):
    """Two samples; the second image was deleted after the run started."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        if i == 1:
            raise BadImageError("image d/train/a/1.jpg does not exist", "d/train/a/1.jpg")
        return torch.zeros(1), 0


def test_an_image_deleted_mid_training_is_listed_once(tmp_path):
    report = tmp_path / "skipped-images.txt"
    ds = SkipBadImages(_Gone(), report)
    # each DataLoader worker (and each epoch's new workers) holds its own copy of the dataset
    for copy in (pickle.loads(pickle.dumps(ds)) for _ in range(3)):
        assert copy[1][1] == 0  # replaced by the next readable image
    assert report.read_text().splitlines() == ["d/train/a/1.jpg\timage d/train/a/1.jpg does not exist"]


# ------------------------------------------------------------------ --out vs data folders (defect 10)
def test_out_named_like_the_preset_is_not_a_data_folder(tmp_path, monkeypatch):
    from hpvit.tasks.detection import DetectionTask

    ann, imgs = _coco(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain-det").mkdir()  # `cd runs && hpvit train det --config plain-det --out plain-det`
    task = DetectionTask("m.pth", Recipe(), config="plain-det", ann=str(ann), images="imgs", out="plain-det")
    check_out_outside_data(task, "plain-det")  # the config name is no folder of data
    with pytest.raises(ConfigError, match=r"--out imgs/run is inside the data folder imgs \(images\)"):
        check_out_outside_data(task, "imgs/run")


def test_out_inside_data_is_refused_before_the_model_loads(tmp_path, capsys):
    data = _folder(tmp_path / "d")
    out = data / "train" / "new"
    missing = tmp_path / "not-there.pth"  # exists (checked first), but loading it would fail: the refusal comes first
    missing.write_bytes(b"")
    assert main(_train(missing, data, out)) == 2
    _one_error_line(capsys.readouterr().err, f"--out {out} is inside the data folder {data}")
    assert not out.exists()


# ------------------------------------------------------------------ train cls --config with a file hpvit wrote
def test_config_given_with_an_hpvit_file_is_refused_not_ignored(tmp_path, tiny_vit):
    from hpvit.tasks.classification import ClassificationTask

    data = _folder(tmp_path / "d")
    f = tmp_path / "paper.safetensors"
    hpvit.save(hpvit.from_plain(str(tiny_vit), config="paper-cls", num_classes=2, img_size=32), f)
    r = Recipe(img_size=32, batch_size=2, mixup=0, cutmix=0)
    with pytest.raises(ConfigError, match=r"--config grid-cls does not apply: .*paper\.safetensors is a file hpvit "
                                          r"wrote, whose stored config paper-cls .*drop --config"):
        ClassificationTask(str(f), str(data), r, config="grid-cls").build_model()
    assert ClassificationTask(str(f), str(data), r, config=None).build_model().config.name == "paper-cls"
    assert ClassificationTask(str(f), str(data), r, config="paper-cls").build_model().config.name == "paper-cls"


# ------------------------------------------------------------------ resume after images were added
def test_resume_after_images_were_added_is_refused(tmp_path):
    from hpvit.tasks.classification import ClassificationTask

    data = _folder(tmp_path / "d")
    task = ClassificationTask("m.pth", str(data), Recipe())
    started = {"identity": json.dumps(task.describe())}
    check_identity(started, json.loads(started["identity"]), tmp_path / "run")  # the same data: resumes
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(data / "train" / "a" / "new.jpg")
    with pytest.raises(ConfigError, match=r"cannot resume .*train_images_in_data: 8 -> 9.*original --data"):
        check_identity(started, ClassificationTask("m.pth", str(data), Recipe()).describe(), tmp_path / "run")


# ------------------------------------------------------------------ COCO annotations
def _coco(tmp_path: Path, **ann) -> tuple[Path, Path]:
    """One 20x30 (w x h) image with one annotation (``ann`` replaces its fields)."""
    pytest.importorskip("pycocotools", reason="COCO masks need pycocotools (pip install 'hpvit[dense]')")
    imgs = tmp_path / "imgs"
    imgs.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(imgs / "a.jpg")
    a = dict(id=7, image_id=1, category_id=1, bbox=[2, 2, 10, 10], iscrowd=0,
             segmentation=[[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]])
    a.update(ann)
    d = {"images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 30}],
         "categories": [{"id": 1, "name": "thing"}], "annotations": [a]}
    (tmp_path / "ann.json").write_text(json.dumps(d))
    return tmp_path / "ann.json", imgs


def test_compressed_rle_is_decoded_like_pycocotools():
    pytest.importorskip("pycocotools", reason="the peer check needs pycocotools")
    from pycocotools import mask as mask_utils

    from hpvit.data.coco import rle_counts

    g = np.random.default_rng(0)
    for _ in range(20):
        h, w = (int(v) for v in g.integers(1, 40, 2))
        m = np.asfortranarray((g.random((h, w)) < g.random()).astype(np.uint8))
        counts = rle_counts(mask_utils.encode(m)["counts"].decode())
        runs = np.concatenate([np.full(n, k % 2, np.uint8) for k, n in enumerate(counts)])
        assert (runs.reshape(w, h).T == m).all()  # column-major runs, starting with zeros


@pytest.mark.parametrize("counts", ["0X", "bad!", "1"])
def test_malformed_compressed_rle_names_the_file_and_annotation(tmp_path, counts):
    from hpvit.data.coco import CocoFormatError, CocoSource

    ann, imgs = _coco(tmp_path, segmentation={"size": [30, 20], "counts": counts})
    with pytest.raises(CocoFormatError, match=rf"{ann}: annotation id 7 \(image a.jpg\): .*re-encode the mask"):
        CocoSource(ann, imgs)


def test_huge_bbox_is_refused_at_load(tmp_path, capsys):
    from hpvit.data.coco import CocoFormatError, CocoSource

    ann, imgs = _coco(tmp_path, bbox=[10, 10, 1e39, 1e39])
    with pytest.raises(CocoFormatError, match=rf"{ann}: annotation id 7 \(image a.jpg\) has bbox .*reaches far "
                                              "outside the 20x30 image"):
        CocoSource(ann, imgs)
    (tmp_path / "m.pth").write_bytes(b"")  # exists (checked first), unreadable: the data is checked before it loads
    assert main(["train", "det", "--model", str(tmp_path / "m.pth"), "--ann", str(ann), "--data", str(imgs),
                 "--out", str(tmp_path / "run"), "--threads", "1"]) == 2
    _one_error_line(capsys.readouterr().err, "annotation id 7", "reaches far outside")


def test_bow_tie_polygon_is_kept_by_its_mask_area(tmp_path):
    from pycocotools import mask as mask_utils

    from hpvit.data.coco import CocoFormatError, CocoSource

    bow = [2.0, 2.0, 12.0, 12.0, 12.0, 2.0, 2.0, 12.0]  # crosses itself: signed area 0, two filled triangles
    ann, imgs = _coco(tmp_path, segmentation=[bow])
    src = CocoSource(ann, imgs)
    masks, _ = src.masks_of(src.images[0])
    want = int(mask_utils.area(mask_utils.frPyObjects([bow], 30, 20))[0])
    assert want > 0 and int(masks[0].sum()) == want
    ann, imgs = _coco(tmp_path, segmentation=[[2.0, 2.0, 7.0, 7.0, 12.0, 12.0]])  # on one line: no pixel
    with pytest.raises(CocoFormatError, match="polygon 0 has zero area"):
        CocoSource(ann, imgs)
