"""Classification end to end on real data: DeiT-Tiny fine-tuned on a few hundred CIFAR-10 images read
from the zip in place (skips with the reason when ../shared/data is absent), then `hpvit eval cls`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import shared_path

RESULT_KEYS = {"top1", "top5", "epochs", "wall_time_s", "images_per_s", "gflops_per_image", "config", "train_images",
               "eval_images", "world_size", "global_batch", "ranks_in_sync"}


def test_tiny_real_cifar_training_and_eval(tmp_path, deit_tiny_path, capsys):
    from hpvit.cli import main

    data = shared_path("cifar10", "cifar10.zip")
    out = tmp_path / "run"
    rc = main(["train", "cls", "--init", str(deit_tiny_path), "--config", "paper-cls", "--data", str(data),
               "--out", str(out), "--recipe", "cifar-mini", "--epochs", "1", "--img-size", "32", "--batch-size", "16",
               "--max-train-samples", "192", "--max-eval-samples", "64", "--workers", "0", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    assert "192 train / 64 eval images" in err and "global batch 16" in err

    res = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(res), RESULT_KEYS - set(res)
    assert res["epochs"] == 1 and res["train_images"] == 192 and res["eval_images"] == 64 and res["steps"] == 12
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["eval_count"] == 64
    assert res["images_per_s"] > 0 and res["wall_time_s"] > 0
    assert res["config"]["recipe"]["name"] == "cifar-mini" and res["config"]["task"]["config"]["name"] == "paper-cls"
    # GFLOPs of the transformed DeiT-Tiny at 32 px: far above the plain model's (4 tokens) and finite
    assert 0.05 < res["gflops_per_image"] < 1.0
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" and math.isfinite(r["loss"]) for r in recs)
    assert [r for r in recs if r["kind"] == "eval"][-1]["top1"] == res["top1"]
    assert (out / "curves.png").stat().st_size > 1000 and (out / "model.safetensors").is_file()

    # eval cls on the output directory reproduces the final evaluation exactly
    rc = main(["eval", "cls", "--model", str(out), "--data", str(data), "--max-eval-samples", "64", "--workers", "0",
               "--out", str(tmp_path / "ev.json")])
    assert rc == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["split"] == "test" and ev["img_size"] == 32 and ev["eval_count"] == 64
    assert ev["top1"] == pytest.approx(res["top1"]) and ev["top5"] == pytest.approx(res["top5"])


def test_plain_baseline_is_one_flag_apart(tmp_path, deit_tiny_path):
    """--config identity trains the plain ViT itself (class-token head) with the same command; --head avg
    gives it a global-average-pooling head."""
    from hpvit.engine.recipe import load_recipe
    from hpvit.tasks.classification import ClassificationTask

    data = shared_path("cifar10", "cifar10.zip")
    r = load_recipe("cifar-mini").replace(img_size=64)
    plain = ClassificationTask(str(deit_tiny_path), str(data), r, config="identity").build_model()
    assert plain.head_type == "token" and plain.stride == 16 and plain.num_classes == 10
    gap = ClassificationTask(str(deit_tiny_path), str(data), r, config="identity", head="avg").build_model()
    assert gap.head_type == "avg"
    hier = ClassificationTask(str(deit_tiny_path), str(data), r, config="paper-cls").build_model()
    assert hier.stride == 4 and hier.layout.depths == (2, 2, 6, 2)
    # the transformed model reuses every plain block weight
    sd_p, sd_h = plain.state_dict(), hier.state_dict()
    assert torch.equal(sd_p["blocks.5.mlp.fc1.weight"], sd_h["blocks.5.mlp.fc1.weight"])


def test_eval_errors(tmp_path, capsys):
    from hpvit.cli import main

    rc = main(["eval", "cls", "--model", str(tmp_path), "--data", str(tmp_path)])
    assert rc == 2 and "no model.safetensors" in capsys.readouterr().err
