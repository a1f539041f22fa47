"""The shared training engine: layer-decay groups, recipes, data errors, exact resume after a kill,
divergence stop, and 2-process DDP on CPU (gloo). Uses a tiny random ViT and synthetic images so it
runs everywhere in seconds; real-data training is in test_classification.py."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import fault_env
import torch

import hpvit
from hpvit.errors import ConfigError, HPViTError

ROOT = Path(__file__).resolve().parents[1]
SUBPROC_TIMEOUT = 300


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    """A random 4-block, 64-wide timm ViT (patch 16, 32 px) saved as a plain state_dict."""
    from helpers import save_small_vit

    return save_small_vit(tmp_path_factory.mktemp("tiny") / "tiny_vit.pth", img_size=32)


def _write_images(root: Path, split: str, n_per_class: int, classes=("a", "b", "c", "d"), size=20, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed + hash(split) % 1000)
    for ci, c in enumerate(classes):
        d = root / split / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            base = torch.tensor([ci * 60.0, 255 - ci * 60.0, (ci * 97) % 255])
            arr = (base[None, None] + 40 * torch.randn(size, size, 3, generator=g)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(arr.numpy()).save(d / f"{i:03d}.png")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """An ImageFolder directory: train/ (4 classes x 8) and val/ (4 x 4) synthetic images."""
    root = tmp_path_factory.mktemp("imgs")
    _write_images(root, "train", 8)
    _write_images(root, "val", 4)
    return root


@pytest.fixture(scope="module")
def run_data(tiny_data) -> tuple[Path, list[str]]:
    """Data for the subprocess runs: 32 real CIFAR-10 training images (+16 test images) read from the zip
    in place when ../shared/data is present, else the synthetic folder (same sizes)."""
    zp = Path(os.environ.get("HPVIT_SHARED_DATA", ROOT.parent / "shared" / "data")) / "cifar10" / "cifar10.zip"
    if zp.is_file():
        return zp, ["--max-train-samples", "32", "--max-eval-samples", "16"]
    return tiny_data, []


def _hpvit(args: list[str], env_extra: dict | None = None, torchrun: int = 0,
           new_session: bool = False) -> subprocess.CompletedProcess:
    """``hpvit ARGS`` in a subprocess (``new_session``: leading its own process group, as a terminal's job does)."""
    env = dict(os.environ, HPVIT_PLAIN_LOG="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env.update(env_extra or {})
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "hpvit"] + args
    else:
        cmd = [sys.executable, "-m", "hpvit"] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SUBPROC_TIMEOUT, cwd=str(ROOT),
                          start_new_session=new_session)


def _train_args(init: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "cls", "--init", str(init), "--config", "paper-cls", "--data", str(data), "--out", str(out),
            "--recipe", "cifar-mini", "--img-size", "32", "--batch-size", "4", "--workers", "0", "--threads", "1",
            "--set", "log_every_steps=2", "--set", "warmup_epochs=0.5", *extra]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------ layer decay / weight decay
def test_layer_decay_groups_follow_the_hierarchy(tiny_vit):
    from hpvit.engine.optim import layer_id, param_groups

    model = hpvit.from_plain(tiny_vit, "paper-cls", num_classes=10, img_size=32)
    names = dict(model.named_parameters())
    assert any(".downsample." in n for n in names) and any(n.endswith("rel_pos_table") for n in names)
    depth = len(model.blocks)
    assert depth == 4
    for n in names:
        lid = layer_id(n, model)
        if n.startswith(("patch_embed", "pos_embed", "cls_token")):
            assert lid == 0, n
        elif n.startswith("blocks."):
            assert lid == int(n.split(".")[1]) + 1, n  # downsample and rel-pos table go with their block
        else:
            assert n.startswith(("norm", "fc_norm", "head")), n
            assert lid == depth + 1, n
    assert layer_id("blocks.2.downsample.conv.weight", model) == 3
    assert layer_id("blocks.0.attn.rel_pos_table", model) == 1

    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    seen = {}
    for g in groups:
        assert g["lr_scale"] == pytest.approx(0.5 ** (depth + 1 - g["layer_id"]))
        for n in g["param_names"]:
            seen[n] = g
    assert set(seen) == set(names)  # every trainable parameter exactly once
    for n, p in names.items():
        wd = seen[n]["weight_decay"]
        if p.ndim <= 1 or n in ("pos_embed", "cls_token") or n.endswith("rel_pos_table"):
            assert wd == 0.0, n
        else:
            assert wd == 0.05, n
    assert seen["head.weight"]["lr_scale"] == 1.0
    assert seen["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.5 ** (depth + 1))
    assert seen["blocks.0.qkv.weight" if "blocks.0.qkv.weight" in seen else "blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05


def test_identity_baseline_groups(tiny_vit):
    from hpvit.engine.optim import param_groups

    model = hpvit.from_plain(tiny_vit, "identity", num_classes=10)
    groups = param_groups(model, 0.05, 0.75)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["cls_token"]["layer_id"] == 0 and by_name["cls_token"]["weight_decay"] == 0.0
    assert by_name["pos_embed"]["weight_decay"] == 0.0
    assert by_name["blocks.3.mlp.fc1.weight"]["layer_id"] == 4


def test_wrapped_backbone_prefix(tiny_vit):
    """Task models that wrap a backbone answer the contract with their own names (hpvit.models.contract.Wraps):
    backbone layer ids and no-decay names carry the path to the backbone, everything else is head."""
    from torch import nn

    from hpvit.engine.optim import param_groups
    from hpvit.models.contract import Wraps

    class Wrapper(Wraps, nn.Module):
        wrapped = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone = hpvit.from_plain(tiny_vit, "paper-cls", num_classes=0, img_size=32)
            self.decoder = nn.Conv2d(64, 8, 1)

    w = Wrapper()
    groups = param_groups(w, 0.05, 0.5)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["backbone.patch_embed.proj.weight"]["layer_id"] == 0
    assert by_name["backbone.blocks.1.downsample.conv.weight"]["layer_id"] == 2
    assert by_name["backbone.pos_embed"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.0.attn.rel_pos_table"]["weight_decay"] == 0.0
    assert by_name["decoder.weight"]["layer_id"] == 5 and by_name["decoder.weight"]["lr_scale"] == 1.0


# ------------------------------------------------------------------ recipes and schedule
def test_packaged_recipes_load():
    from hpvit.engine.recipe import list_recipes, load_recipe

    assert {"imagenet-paper", "cifar-mini"} <= set(list_recipes())
    r = load_recipe("imagenet-paper")
    assert (r.epochs, r.layer_decay, r.weight_decay, r.drop_path, r.mixup, r.cutmix) == (100, 0.65, 0.05, 0.1, 0.8, 1.0)
    assert r.absolute_lr(8) == pytest.approx(5e-4 * 1024 / 256)  # 128 x 8 GPUs = MAE's 1024
    assert "MAE" in r.source


def test_bad_recipe_key_and_value(tmp_path):
    from hpvit.engine.recipe import load_recipe

    f = tmp_path / "r.json"
    f.write_text(json.dumps({"epochs": 2, "layer_decayy": 0.7}))
    with pytest.raises(ConfigError, match="unknown recipe key.*layer_decayy.*valid keys"):
        load_recipe(f)
    f.write_text(json.dumps({"amp": "fp8"}))
    with pytest.raises(ConfigError, match="amp must be"):
        load_recipe(f)
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*cifar-mini"):
        load_recipe("nope")


def test_warmup_cosine_schedule():
    from hpvit.engine.schedule import LRSchedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr_scale": 0.5}], lr=1.0)
    s = LRSchedule(opt, base_lr=1.0, min_lr=0.0, warmup_steps=10, total_steps=110)
    assert s.apply(0) == 0.0 and s.apply(5) == pytest.approx(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)  # lr_scale applied
    assert s.apply(10) == pytest.approx(1.0) and s.apply(60) == pytest.approx(0.5) and s.apply(110) == pytest.approx(0.0)


@pytest.mark.parametrize("kind", ["step", "poly"])
def test_step_and_poly_schedules_match_torch(kind):
    """After warmup, the dense recipes' schedules equal torch's own schedulers: MultiStepLR (Mask R-CNN 1x)
    and PolynomialLR (mmseg's poly with min_lr 0)."""
    from hpvit.engine.schedule import LRSchedule

    warm, total, base = 20, 220, 1e-3
    ours = LRSchedule(None, base, 0.0, warm, total, kind, milestones=(warm + 100, warm + 160), factor=0.1, power=0.9)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    ref = (torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[100, 160], gamma=0.1) if kind == "step"
           else torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total - warm, power=0.9))
    for t in range(total - warm):
        assert ours.lr_at(warm + t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12), t
        opt.step()
        ref.step()
    assert ours.lr_at(warm // 2) == pytest.approx(base / 2)


def test_iteration_budget_plan_and_dry_run(capsys):
    """An iteration budget becomes whole epochs; --dry-run prints the plan without data or weights."""
    from hpvit.cli import main
    from hpvit.engine.schedule import Plan

    from hpvit.engine.recipe import load_recipe

    r = load_recipe("ade20k-upernet-80k")
    plan = Plan.of(r, 1263)
    assert plan.epochs == 64 and plan.total_steps == 80832 >= r.iterations and plan.warmup_steps == 1500
    assert main(["train", "seg", "--recipe", "ade20k-upernet-80k", "--dry-run", "--nproc", "8"]) == 0
    out = capsys.readouterr().out
    assert "global batch 16" in out and "80,000 iterations" in out and "lr 0.0001 " in out and "slide" in out
    assert main(["train", "det", "--recipe", "coco-maskrcnn-1x", "--dry-run", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "global batch 4 (the recipe assumes 16; --accum-steps 4 keeps it)" in out and "lr 2.5e-05" in out
    assert "x0.1 after epochs 8, 11" in out and "480..800" in out
    with pytest.raises(SystemExit):  # without --dry-run the data and model flags are required
        main(["train", "det", "--recipe", "coco-maskrcnn-1x"])


# ------------------------------------------------------------------ data
def test_zip_read_in_place_and_dir_equivalent(tmp_path, tiny_data):
    from hpvit.data import ImageFolderDataset, ImageFolderSource

    z = tmp_path / "d.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(tiny_data.rglob("*.png")):
            zf.write(f, "mydata/" + str(f.relative_to(tiny_data)))
    sz, sd = ImageFolderSource(z), ImageFolderSource(tiny_data)
    assert sz.classes == sd.classes == ["a", "b", "c", "d"]
    assert sz.splits() == ["train", "val"] and sz.eval_split() == "val"
    a, b = ImageFolderDataset(sz, "val"), ImageFolderDataset(sd, "val")
    assert len(a) == len(b) == 16
    for i in (0, 7, 15):
        assert a.samples[i][1] == b.samples[i][1]
        assert a[i][0].tobytes() == b[i][0].tobytes()
    sub = ImageFolderDataset(sd, "train", max_samples=8, seed=3)
    assert sorted(c for _, c in sub.samples) == [0, 0, 1, 1, 2, 2, 3, 3]  # class-balanced subset


def test_data_errors(tmp_path, tiny_data):
    from hpvit.data import ImageFolderSource

    with pytest.raises(ConfigError, match="does not exist"):
        ImageFolderSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no train/, val/ or test/ split"):
        ImageFolderSource(tmp_path / "empty")
    only_train = tmp_path / "ot"
    _write_images(only_train, "train", 1)
    with pytest.raises(ConfigError, match="no val/ or test/ split"):
        ImageFolderSource(only_train).eval_split()
    only_val = tmp_path / "ov"
    _write_images(only_val, "val", 1)
    with pytest.raises(ConfigError, match="no 'train' split"):
        ImageFolderSource(only_val).samples("train")


def test_cli_reports_missing_data_clearly(tmp_path, tiny_vit, capsys):
    from hpvit.cli import main

    rc = main(["train", "cls", "--init", str(tiny_vit), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
               "--recipe", "cifar-mini"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "hpvit: error:" in err and "does not exist" in err and "ImageFolder" in err
    rc = main(["train", "cls", "--init", str(tiny_vit), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
               "--recipe", "cifar-mini", "--set", "bogus=1"])
    assert rc == 2 and "unknown recipe key" in capsys.readouterr().err


def test_seeded_dataset_is_reproducible_and_leaves_global_rng_alone(tiny_data):
    from hpvit.data import ImageFolderDataset, ImageFolderSource, SeededDataset, build_transform
    from hpvit.engine.recipe import load_recipe

    r = load_recipe("cifar-mini").replace(img_size=32)
    ds = SeededDataset(ImageFolderDataset(ImageFolderSource(tiny_data), "train", build_transform(r, True)), seed=1)
    state = torch.get_rng_state()
    x1 = ds[5][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(ds[5][0], x1)
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], x1)


def test_sampler_resume_and_sharding():
    from hpvit.data import ResumableSampler

    s = ResumableSampler(10, shuffle=True, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=4)
    assert list(s) == full[4:]
    shards = []
    for r in range(3):
        t = ResumableSampler(10, rank=r, world_size=3, shuffle=True, seed=3)
        t.set_epoch(2)
        shards.append(list(t))
    assert all(len(x) == 4 for x in shards) and set(sum(shards, [])) == set(range(10))


# ------------------------------------------------------------------ resume after a kill
# 2 epochs of 32 images / batch 4 = 8 steps; mixup, RandAugment, random erasing, drop path and EMA on
EXACT_EXTRA = ("--epochs", "2", "--ema", "--deterministic", "--set", "ckpt_every_steps=3", "--set", "ema_decay=0.9")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_vit, run_data) -> Path:
    """The uninterrupted run the interrupted ones must equal, bit for bit."""
    data, subset = run_data
    out = tmp_path_factory.mktemp("full") / "full"
    full = _hpvit(_train_args(tiny_vit, data, out, *EXACT_EXTRA, *subset))
    assert full.returncode == 0, full.stderr[-3000:]
    return out


def _assert_same_run(full: Path, cut: Path) -> None:
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = _weights(full / name), _weights(cut / name)
        assert a.keys() == b.keys()
        diff = [k for k in a if not torch.equal(a[k], b[k])]
        assert not diff, f"{name}: resumed weights differ from the uninterrupted run in {diff[:5]}"
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, cut))
    assert ra["top1"] == rb["top1"] and ra["rank_param_digests"] == rb["rank_param_digests"]
    # metrics.jsonl has no duplicated steps after the resume, and the same losses
    train = [[(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"] for d in (full, cut)]
    assert train[1] == train[0] and [s for s, _ in train[1]] == sorted({s for s, _ in train[1]})


def test_resume_after_kill_is_bit_exact(tmp_path, tiny_vit, run_data, full_run):
    """Kill (SIGKILL) a run mid-epoch, resume it, and require the final weights to equal an
    uninterrupted run's bit for bit."""
    data, subset = run_data
    extra = [*EXACT_EXTRA, *subset]
    # checkpoints at updates 3, 6, 8 (epoch end), 11, 14...
    killed = _hpvit(_train_args(tiny_vit, data, tmp_path / "cut", *extra), fault_env(14))
    assert killed.returncode != 0, "the fault hook should have killed the run"
    assert not (tmp_path / "cut" / "results.json").exists()
    ck = torch.load(tmp_path / "cut" / "checkpoint-last.pt", weights_only=True)
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 4, 12)  # mid-epoch, 2 updates lost

    resumed = _hpvit(_train_args(tiny_vit, data, tmp_path / "cut", *extra, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    _assert_same_run(full_run, tmp_path / "cut")

    # a finished run refuses to be overwritten without --overwrite
    again = _hpvit(_train_args(tiny_vit, data, full_run, *extra))
    assert again.returncode == 2 and "finished run" in again.stderr and "--overwrite" in again.stderr


def test_ctrl_c_saves_a_resumable_checkpoint_and_resume_is_exact(tmp_path, tiny_vit, run_data, full_run, capsys):
    """SIGINT to the run's process group mid-epoch, as Ctrl-C in a terminal sends it (the DataLoader worker gets it
    too): the run stops after the next update with a checkpoint of it (update 11: neither an epoch's end nor one of
    ckpt_every_steps=3), exit 130 with the resume advice; --resume (in this process) then ends equal to the
    uninterrupted run."""
    from hpvit.cli import main

    data, subset = run_data
    extra, out = [*EXACT_EXTRA, *subset, "--workers", "1"], tmp_path / "int"
    stopped = _hpvit(_train_args(tiny_vit, data, out, *extra), fault_env(10, "SIGINT"), new_session=True)
    err = stopped.stderr
    assert stopped.returncode == 130, err[-3000:]
    assert "SIGINT: stopping after the current update" in err and "Traceback" not in err
    assert f"stopped (SIGINT) after update 11 (epoch 2, step 3/8); resumable checkpoint {out / 'checkpoint-last.pt'}" \
        f". Continue with the same command plus --resume" in err and "hpvit: interrupted" in err
    ck = torch.load(out / "checkpoint-last.pt", weights_only=True)
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 3, 11)
    assert not (out / "results.json").exists()

    try:
        assert main([str(a) for a in _train_args(tiny_vit, data, out, *extra, "--resume")]) == 0
    finally:
        torch.use_deterministic_algorithms(False)  # --deterministic set it for this process
    assert "resumed from" in capsys.readouterr().err
    _assert_same_run(full_run, out)


def test_resume_with_changed_settings_is_refused(tmp_path, tiny_vit, tiny_data, capsys):
    """A refused --resume (other settings, or an unreadable checkpoint) writes nothing: recipe.json still tells
    the run's own recipe (issue 29, defect 8)."""
    from hpvit.cli import main
    from hpvit.engine.checkpoint import save_checkpoint

    out = tmp_path / "o"
    save_checkpoint(out / "checkpoint-last.pt", {"recipe": json.dumps({"seed": 5}), "world_size": 1})
    (out / "recipe.json").write_text('{"seed": 5}')
    rc = main(_train_args(tiny_vit, tiny_data, out, "--resume", "--set", "smoothing=0.3"))
    err = capsys.readouterr().err
    assert rc == 2 and "cannot resume" in err and "seed" in err
    (out / "checkpoint-last.pt").write_bytes(b"not a checkpoint")
    assert main(_train_args(tiny_vit, tiny_data, out, "--resume")) == 2
    assert "cannot read the training checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-last.pt", "recipe.json"]
    assert (out / "recipe.json").read_text() == '{"seed": 5}'


def _finished_run_files(out: Path) -> dict[str, bytes]:
    """A finished run's folder as the engine leaves it (contents made up): name -> bytes."""
    files = {"model.safetensors": b"old model", "model_ema.safetensors": b"old ema", "recipe.json": b'{"seed": 0}',
             "metrics.jsonl": b'{"kind": "train", "step": 1, "loss": 1.0}\n', "curves.png": b"png",
             "checkpoint-last.pt": b"ckpt", "events.out.tfevents.1.host.1.0": b"events",
             "results.json": json.dumps({"epochs": 1, "model_files": [str(out / "model.safetensors"),
                                                                     "elsewhere/model_ema.safetensors"]}).encode()}
    out.mkdir(parents=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def test_overwrite_deletes_the_old_run_only_once_the_new_one_has_started(tmp_path, tiny_vit, tiny_data, capsys):
    """--overwrite with data that fails its check leaves the old run whole (no model without its results.json, so
    the next run without --overwrite is still refused); once a run really starts, all of the old one goes
    (issue 29, defect 4)."""
    from hpvit.cli import main

    out = tmp_path / "run"
    files = _finished_run_files(out)
    assert main(_train_args(tiny_vit, tmp_path / "missing", out, "--overwrite")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert main(_train_args(tiny_vit, tiny_data, out)) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files

    assert main(_train_args(tiny_vit, tiny_data, out, "--overwrite", "--epochs", "1", "--no-keep-checkpoint")) == 0
    err = capsys.readouterr().err
    assert (f"--overwrite: deleted the previous run's model.safetensors, model_ema.safetensors, "
            f"events.out.tfevents.1.host.1.0, checkpoint-last.pt, metrics.jsonl, curves.png, results.json in {out}") in err
    assert "checkpoint-last.pt (" in err and "deleted (--no-keep-checkpoint)" in err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("events.")) == [  # (TensorBoard's, if installed)
        "curves.png", "metrics.jsonl", "model.json", "model.safetensors", "recipe.json", "results.json"]
    assert json.loads((out / "recipe.json").read_text())["epochs"] == 1


# ------------------------------------------------------------------ what the console and TensorBoard show
def test_console_shows_the_first_step_and_the_loss_metrics_jsonl_records(tmp_path, tiny_vit, tiny_data, capsys):
    """Issue 29, first contact 9 and 10: a plain log line at the first step (not only every log_every_steps), the
    console loss at a logged step equal to metrics.jsonl's (the mean over the logging window), the recipe line
    without blr when lr wins; and ckpt_every_minutes (here: any time) checkpoints after every update mid-epoch."""
    from helpers import update_hook

    from hpvit.cli import main

    out, saved = tmp_path / "run", []
    with update_hook(lambda t, u: saved.append(torch.load(t.ckpt_path, weights_only=True)["global_step"])):
        assert main(_train_args(tiny_vit, tiny_data, out, "--epochs", "1", "--lr", "0.001", "--set",
                                "log_every_steps=3", "--set", "ckpt_every_minutes=1e-9")) == 0
    err = capsys.readouterr().err
    recipe_line = next(ln for ln in err.splitlines() if "recipe cifar-mini:" in ln)
    assert ", lr 0.001," in recipe_line and "blr" not in recipe_line and "mixup 0.8" in recipe_line
    shown = dict(re.findall(r"epoch 1/1 (\d+)/8 \| loss (\S+) ", err))
    logged = {str(r["step"]): f"{r['loss']:.4g}" for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"}
    assert sorted(shown, key=int) == ["1", "3", "6", "8"] and sorted(logged, key=int) == ["3", "6", "8"]
    assert {k: shown[k] for k in logged} == logged
    assert saved == [1, 2, 3, 4, 5, 6, 7, 7]  # the epoch's end is checkpointed after its evaluation


def test_plain_progress_says_something_when_quiet_too_long(capsys):
    from hpvit.engine.logging import Progress, recipe_summary
    from hpvit.engine.recipe import Recipe
    from hpvit.engine.task import Task
    from hpvit.tasks.detection import DetectionTask
    from hpvit.tasks.segmentation import SegmentationTask

    p = Progress(100, "epoch 1/1", every=50, force_plain=True)
    p.update(), p.update()
    p.quiet_s = 0.0  # as when a slow step took longer than quiet_s since the last line
    p.update()
    assert re.findall(r"epoch 1/1 (\d+)/100", capsys.readouterr().err) == ["1", "3"]
    # det / seg runs mix no batches: their recipe line does not name mixup / cutmix
    assert not Task.batch_mixing and not DetectionTask.batch_mixing and not SegmentationTask.batch_mixing
    line = recipe_summary(Recipe(), batch_mixing=False)
    assert "mixup" not in line and "cutmix" not in line and "blr 0.0005" in line


def test_tensorboard_events_equal_metrics_jsonl_across_a_resume(tmp_path, tiny_vit, tiny_data, capsys):
    """Issue 30 item 4: the event file holds exactly metrics.jsonl's records (read back with TensorBoard's own
    reader, orphaned data kept), once each after a run stopped past its checkpoint is resumed."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (optional: pip install "
                                              "'hpvit[tensorboard]'); without it no event files are written")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers import interrupt_after

    from hpvit.cli import main

    out = tmp_path / "run"
    args = _train_args(tiny_vit, tiny_data, out, "--epochs", "2", "--set", "log_every_steps=1", "--set",
                       "ckpt_every_steps=2")
    with interrupt_after(11):  # logged, after the checkpoint of update 10: the resume cuts it from metrics.jsonl
        assert main(args) == 130

    def events() -> dict[str, list[tuple[int, float]]]:
        files = list(out.glob("events.out.tfevents.*"))
        assert len(files) == 1, files
        acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0}, purge_orphaned_data=False)
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    assert events()["train/loss"][-1][0] == 11
    assert main(args + ["--resume"]) == 0
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        for k, v in r.items():
            if k not in ("kind", "epoch", "step", "split", "images", "time"):
                expected.setdefault(f"{r['kind']}/{k}", []).append((r["step"], v))
    got = events()
    assert {"train/loss", "train/lr", "train/images_per_s", "eval/top1", "eval/eval_loss"} <= set(got)
    assert got.keys() == expected.keys() and [s for s, _ in got["train/loss"]] == list(range(1, 17))
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


# ------------------------------------------------------------------ divergence
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_vit, tiny_data):
    from hpvit.engine import DivergenceError, Trainer
    from hpvit.engine.recipe import load_recipe
    from hpvit.tasks.classification import ClassificationTask

    recipe = load_recipe("cifar-mini").replace(img_size=32, batch_size=4, num_workers=0, ckpt_every_steps=2,
                                               log_every_steps=1, epochs=1)

    class NaNAt5(ClassificationTask):
        calls = 0

        def loss(self, model, batch):
            NaNAt5.calls += 1
            out = super().loss(model, batch)
            return out * float("nan") if NaNAt5.calls == 5 else out

    task = NaNAt5(str(tiny_vit), str(tiny_data), recipe)
    out = tmp_path / "run"
    with pytest.raises(DivergenceError) as ei:
        Trainer(task, recipe, out).run()
    msg = str(ei.value)
    assert isinstance(ei.value, HPViTError)
    assert "diverged" in msg and "nan" in msg and "update 5" in msg and "checkpoint-last.pt" in msg and "update 4" in msg
    ck = torch.load(out / "checkpoint-last.pt", weights_only=True)
    assert ck["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (out / "results.json").exists()


# ------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_in_sync(tmp_path, tiny_vit, run_data):
    data, subset = run_data
    out = tmp_path / "ddp"
    r = _hpvit(_train_args(tiny_vit, data, out, "--epochs", "1", *subset), torchrun=2)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["global_batch"] == 8
    assert "2 process(es) on cpu (gloo)" in r.stderr and "per-process batch 4" in r.stderr and "global batch 8" in r.stderr
    d = res["rank_param_digests"]
    assert len(d) == 2 and d[0] == d[1] and res["ranks_in_sync"]
    # the saved model is the one both ranks hold
    from hpvit.engine.loop import param_digest

    assert param_digest(hpvit.load(out / "model.safetensors")) == d[0]
    assert res["eval_count"] == 16  # every val image evaluated exactly once across the two ranks
    assert res["steps"] == 4  # 32 images / (2 x 4) per step


def test_accumulation_bf16_checkpointing_ema_smoke(tmp_path, tiny_vit, tiny_data, capsys):
    """Gradient accumulation + bf16 autocast + gradient checkpointing + EMA + identity baseline in one run."""
    from hpvit.cli import main

    out = tmp_path / "o"
    args = _train_args(tiny_vit, tiny_data, out, "--epochs", "1", "--accum-steps", "2", "--amp", "bf16",
                       "--grad-checkpointing", "--ema")
    args[args.index("paper-cls")] = "identity"
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    err = capsys.readouterr().err
    assert "per-process batch 4 x accum 2, global batch 8" in err
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 4 and "ema_top1" in res and res["config"]["recipe"]["amp"] == "bf16"
    assert (out / "model_ema.safetensors").is_file()


def test_recipe_line_names_counts_by_their_flags():
    """The recipe line says `train_images 100` (the --train-images flag), never the internal max_train_samples."""
    from hpvit.engine.logging import recipe_summary
    from hpvit.engine.recipe import Recipe

    line = recipe_summary(Recipe(max_train_samples=100, max_eval_samples=20))
    assert "train_images 100" in line and "eval_images 20" in line and "max_" not in line
