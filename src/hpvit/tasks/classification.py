"""Image classification: fine-tune a transformed model (or the plain baseline) and evaluate it.

``hpvit train cls --init SRC --config paper-cls --data PATH --out DIR [--recipe NAME|FILE] ...``
``hpvit eval cls --model DIR_OR_FILE --data PATH``

``--config identity`` trains the plain ViT itself (class-token head; ``--head avg`` for a global
average pooling head), so the paper's comparison is one flag apart. See docs/classification.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.io import write_text_atomic
from ..errors import ConfigError
from ..engine.recipe import Recipe, load_recipe
from ..engine.task import Task
from ..cli import parse_key_values
from ._cli import run_training

TASK = "cls"
TRAIN_HELP = "fine-tune a classifier on an ImageFolder directory or zip (train/ + val/ or test/)"
EVAL_HELP = "evaluate a fine-tuned classifier (top-1 / top-5)"
MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
PREPROC_FILE = "model.json"


def gflops_per_image(model: nn.Module, img_size: int, in_chans: int = 3) -> float:
    """Forward GFLOPs of one image (FlopCounterMode: 2 FLOPs per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    x = torch.zeros(1, in_chans, img_size, img_size, device=dev)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was)
    return fc.get_total_flops() / 1e9


def _load_model_config(config: str):
    """A preset name, or a JSON file holding HPViTConfig fields."""
    p = Path(config)
    if config.endswith(".json") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; give a preset name (paper-cls, identity, ...) or a JSON file")
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from e
    return config


class ClassificationTask(Task):
    name = "cls"
    primary_metric = "top1"

    def __init__(self, init: str, data: str, recipe: Recipe, config: str = "paper-cls", num_classes: int | None = None,
                 head: str | None = None, fmt: str | None = None):
        self.init, self.data, self.recipe = init, data, recipe
        self.config, self.num_classes_arg, self.head, self.fmt = config, num_classes, head, fmt
        self._source = None
        self.model_config: dict[str, Any] = {}

    # ---------------------------------------------------------------- data
    @property
    def source(self):
        if self._source is None:
            from ..data import ImageFolderSource

            self._source = ImageFolderSource(self.data)
            self._source.samples("train")  # a clear error now if the train split is missing
            self._source.eval_split()
        return self._source

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    def datasets(self):
        from ..data import ImageFolderDataset, build_transform

        r, src = self.recipe, self.source
        train = ImageFolderDataset(src, "train", build_transform(r, True), r.max_train_samples, r.seed)
        ev = ImageFolderDataset(src, src.eval_split(), build_transform(r, False), r.max_eval_samples, r.seed)
        return train, ev

    # ---------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        import hpvit
        from ..checkpoints.native import is_hpvit_file

        n = len(self.classes)
        if self.num_classes_arg is not None and self.num_classes_arg != n:
            raise ConfigError(f"--num-classes {self.num_classes_arg} but {self.data} has {n} classes; drop --num-classes")
        r = self.recipe
        if is_hpvit_file(self.init):
            model = hpvit.load(self.init)
            model.set_drop_path_rate(r.drop_path)  # the recipe's, as for a model built from a plain checkpoint
            if model.num_classes != n:
                model.reset_classifier(n)
        else:
            overrides: dict[str, Any] = {"drop_path_rate": r.drop_path, "img_size": r.img_size}
            if self.head is not None:
                overrides["head"] = self.head
            model = hpvit.from_plain(self.init, _load_model_config(self.config), num_classes=n, format=self.fmt,
                                     **overrides)
        if r.img_size < model.min_input_size:
            raise ConfigError(
                f"img_size {r.img_size} is below the minimum {model.min_input_size} of config {model.config.name!r}; "
                f"use --img-size {model.min_input_size} or more"
            )
        self.model_config = model.config.to_dict()
        self.mixup = None
        from ..data import build_mixup

        self.mixup = build_mixup(r, n)
        if self.mixup is not None and r.batch_size % 2:
            raise ConfigError(f"mixup/cutmix need an even batch size, got {r.batch_size}")
        return model

    # ---------------------------------------------------------------- steps
    def prepare_batch(self, batch, device, train):
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if train and getattr(self, "mixup", None) is not None:
            x, y = self.mixup(x, y)
        return x, y

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)
        if y.ndim == 2:  # soft targets from mixup/cutmix (label smoothing included)
            return torch.sum(-y * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.float(), y, label_smoothing=self.recipe.smoothing)

    def eval_batch(self, model, batch):
        return classification_sums(model, *batch)

    def eval_finalize(self, sums):
        return classification_metrics(sums)

    # ---------------------------------------------------------------- reporting
    def results(self, model):
        return {
            "gflops_per_image": round(gflops_per_image(model, self.recipe.img_size), 4),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "num_classes": len(self.classes),
        }

    def describe(self):
        return {"init": str(self.init), "data": str(self.data), "config": self.model_config,
                "classes": self.classes, "head": self.head}

    def save_model(self, model, out_dir, ema=None):
        import hpvit

        paths = [Path(hpvit.save(model, out_dir / MODEL_FILE))]
        if ema is not None:
            paths.append(Path(hpvit.save(ema, out_dir / EMA_FILE)))
        r = self.recipe
        pre = {"img_size": r.img_size, "interpolation": r.interpolation, "crop_pct": r.crop_pct,
               "mean": list(r.mean), "std": list(r.std), "classes": self.classes}
        write_text_atomic(out_dir / PREPROC_FILE, json.dumps(pre, indent=2))
        return paths


def classification_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    logits = model(x).float()
    k = min(5, logits.shape[-1])
    topk = logits.topk(k, dim=-1).indices
    hit = topk == y[:, None]
    return {"correct1": hit[:, 0].sum().item(), "correct5": hit.any(dim=1).sum().item(), "count": len(y),
            "loss_sum": F.cross_entropy(logits, y, reduction="sum").item()}


def classification_metrics(s: dict[str, float]) -> dict[str, float]:
    n = max(s.get("count", 0.0), 1.0)
    return {"top1": 100.0 * s.get("correct1", 0.0) / n, "top5": 100.0 * s.get("correct5", 0.0) / n,
            "eval_loss": s.get("loss_sum", 0.0) / n, "eval_count": s.get("count", 0.0)}


# -------------------------------------------------------------------- command line
def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", required=True, help="plain ViT checkpoint (file, HF folder, timm:<name>) or an hpvit .safetensors")
    p.add_argument("--config", default="paper-cls", help="paper-cls (default), identity (the plain baseline), ... or a JSON file")
    p.add_argument("--format", default=None, help="force the checkpoint format instead of auto-detecting it")
    p.add_argument("--num-classes", type=int, default=None, help="must match the dataset's classes (default: from the data)")
    p.add_argument("--head", choices=("avg", "token"), default=None,
                   help="classifier head: avg = global average pooling, token = class token (identity only)")
    p.add_argument("--data", required=True, help="ImageFolder directory or .zip with train/ and val/ (or test/)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics.jsonl, results.json, curves.png)")
    p.add_argument("--recipe", default="imagenet-paper", help="recipe name (imagenet-paper, cifar-mini) or JSON file")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size")
    p.add_argument("--accum-steps", type=int, default=None, help="gradient accumulation steps")
    p.add_argument("--max-train-samples", type=int, default=None, help="fixed class-balanced training subset")
    p.add_argument("--max-eval-samples", type=int, default=None, help="fixed class-balanced evaluation subset")
    p.add_argument("--blr", type=float, default=None, help="base lr (lr = blr * global batch / 256)")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None)
    p.add_argument("--ema", action="store_true", default=None, help="keep an EMA of the weights (evaluated too)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic algorithms only")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (finished or not); without it such a run is never replaced")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out training images that cannot be decoded and list them in OUT/skipped-images.txt "
                        "(default: such an image is an error naming the file)")


def build_recipe(args) -> Recipe:
    r = load_recipe(args.recipe)
    flags = {"epochs": args.epochs, "img_size": args.img_size, "batch_size": args.batch_size,
             "accum_steps": args.accum_steps, "max_train_samples": args.max_train_samples,
             "max_eval_samples": args.max_eval_samples, "blr": args.blr, "lr": args.lr, "amp": args.amp,
             "ema": args.ema, "grad_checkpointing": args.grad_checkpointing, "num_workers": args.workers,
             "seed": args.seed, "deterministic": args.deterministic}
    changes = {k: v for k, v in flags.items() if v is not None}
    changes.update(parse_key_values(args.set, "--set"))
    return r.replace(**changes) if changes else r


def run_train(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = build_recipe(args)
    task = ClassificationTask(args.init, args.data, recipe, args.config, args.num_classes, args.head, args.format)
    return run_training(task, recipe, args)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a training output directory or an hpvit .safetensors file")
    p.add_argument("--data", required=True, help="ImageFolder directory or .zip with val/ or test/")
    p.add_argument("--split", default=None, help="split to evaluate (default: val, else test)")
    p.add_argument("--img-size", type=int, default=None, help="default: the training image size (model.json)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training directory")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)


def run_eval(args) -> int:
    import hpvit
    from ..data import ImageFolderDataset, ImageFolderSource, build_transform
    from ..engine import distributed as D
    from ..engine.loop import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    mp = Path(args.model)
    if mp.is_dir():
        f = mp / (EMA_FILE if args.ema else MODEL_FILE)
        if not f.is_file():
            raise ConfigError(f"{mp}: no {f.name} in this directory; pass a training output directory or a .safetensors file")
        mp = f
    elif not mp.is_file():
        raise ConfigError(f"--model {mp}: no such file or directory")
    model = hpvit.load(mp)
    pre_path = mp.parent / PREPROC_FILE
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    r = Recipe().replace(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in pre.items() if k != "classes"})
    if args.img_size:
        r = r.replace(img_size=args.img_size)
    elif not pre:
        raise ConfigError(f"{pre_path} is missing, so the training image size is unknown; pass --img-size")
    src = ImageFolderSource(args.data)
    if pre.get("classes") and pre["classes"] != src.classes:
        raise ConfigError(f"{args.data}: its classes {src.classes[:5]}... differ from the model's {pre['classes'][:5]}...")
    if model.num_classes != len(src.classes):
        raise ConfigError(f"the model has {model.num_classes} classes but {args.data} has {len(src.classes)}")
    split = args.split or src.eval_split()
    ds = ImageFolderDataset(src, split, build_transform(r, False), args.max_eval_samples, 0)
    dist = D.init_distributed(args.device)
    try:
        model.to(dist.device)

        class _T(Task):
            def eval_batch(self, m, b):
                return classification_sums(m, *b)

            def eval_finalize(self, s):
                return classification_metrics(s)

        import time

        t = time.time()
        m = evaluate(_T(), model, ds, args.batch_size, args.workers, dist)
        m.update({"model": str(mp), "split": split, "img_size": r.img_size, "eval_time_s": round(time.time() - t, 2),
                  "gflops_per_image": round(gflops_per_image(model, r.img_size), 4)})
        if dist.is_main:
            print(json.dumps(m, indent=2))
            if args.json:
                Path(args.json).write_text(json.dumps(m, indent=2))
    finally:
        D.cleanup(dist)
    return 0
