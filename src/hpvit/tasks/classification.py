"""Image classification: fine-tune a transformed model (or the plain baseline) and evaluate it.

``hpvit train cls --init SRC --config paper-cls --data PATH --out DIR [--recipe NAME|FILE] ...``
``hpvit eval cls --model DIR_OR_FILE --data PATH``

``--config identity`` trains the plain ViT itself (class-token head; ``--head avg`` for a global
average pooling head), so the paper's comparison is one flag apart. See docs/classification.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.io import write_text_atomic
from ..errors import ConfigError
from ..engine.recipe import Recipe
from ..engine.task import Task
from ._args import AUTO_RECIPE, add_cls_eval_args, add_cls_train_args, subset_count
from ._cli import recipe_from_flags, run_training

TASK = "cls"
MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
PREPROC_FILE = "model.json"
METRIC_UNITS = {"top1": "% of images", "top5": "% of images", "eval_loss": "cross-entropy per image (nats)",
                "eval_count": "images"}


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
    summary_metrics = ("top1", "top5", "eval_loss")  # the per-epoch log line; metrics.jsonl has every metric
    metric_units = METRIC_UNITS

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

    @property
    def eval_split(self) -> str:
        """The split scored after each epoch (named in metrics.jsonl and results.json)."""
        return self.source.eval_split()

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
            "eval_loss": s.get("loss_sum", 0.0) / n, "eval_count": int(s.get("count", 0))}


# -------------------------------------------------------------------- command line
add_train_args = add_cls_train_args
add_eval_args = add_cls_eval_args
AUTO_GPU_MIN_IMAGES = 100_000  # below this (or without a GPU) `--recipe auto` picks the short cifar-mini recipe


def choose_recipe(n_train: int, device_type: str) -> tuple[str, str]:
    """``--recipe auto``: ``(recipe name, why)`` for ``n_train`` training images on ``device_type``.

    The paper's ``imagenet-paper`` recipe (100 epochs, 5 warm-up epochs) only fits a large dataset on a GPU;
    anything smaller or on a CPU gets ``cifar-mini`` (one short epoch sized for a 2-core CPU)."""
    if device_type == "cuda" and n_train >= AUTO_GPU_MIN_IMAGES:
        return "imagenet-paper", f"{n_train:,} training images on a GPU"
    why = "no GPU" if device_type != "cuda" else f"fewer than {AUTO_GPU_MIN_IMAGES:,} training images"
    return "cifar-mini", f"{n_train:,} training images, {why}"


def _device_type(device: "str | None") -> str:
    if device:
        return torch.device(device).type
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_recipe_name(args) -> str:
    """``--recipe`` as given, or for ``auto`` the recipe :func:`choose_recipe` picks for ``--data`` (printed)."""
    from ..data import ImageFolderSource
    from ..engine.logging import log

    if args.recipe != AUTO_RECIPE:
        return args.recipe
    n_train = len(ImageFolderSource(args.data).samples("train"))
    wanted = subset_count(args.train_images, "--train-images")
    n = min(n_train, wanted) if wanted else n_train
    name, why = choose_recipe(n, _device_type(args.device))
    log(f"--recipe auto -> {name} ({why}); pass --recipe imagenet-paper|cifar-mini|FILE.json to choose")
    return name


def build_recipe(args) -> Recipe:
    flags = {"epochs": args.epochs, "img_size": args.img_size, "batch_size": args.batch_size,
             "accum_steps": args.accum_steps, "max_train_samples": subset_count(args.train_images, "--train-images"),
             "max_eval_samples": subset_count(args.eval_images, "--eval-images"), "blr": args.blr, "lr": args.lr,
             "amp": args.amp,
             "ema": args.ema, "grad_checkpointing": args.grad_checkpointing, "num_workers": args.workers,
             "seed": args.seed, "deterministic": args.deterministic}
    return recipe_from_flags(resolve_recipe_name(args), flags, args.set)


def run_train(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = build_recipe(args)
    task = ClassificationTask(args.init, args.data, recipe, args.config, args.num_classes, args.head, args.format)
    return run_training(task, recipe, args)


def run_eval(args) -> int:
    import hpvit
    from ..data import ImageFolderDataset, ImageFolderSource, build_transform
    from ..engine import distributed as D
    from ..engine.loop import evaluate, usable_workers

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
    ds = ImageFolderDataset(src, split, build_transform(r, False), subset_count(args.eval_images, "--eval-images"), 0)
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
        m = evaluate(_T(), model, ds, args.batch_size, usable_workers(args.workers, dist.world_size), dist,
                     desc=f"evaluating {split}")
        m.update({"model": str(mp), "split": split, "img_size": r.img_size, "eval_time_s": round(time.time() - t, 2),
                  "gflops_per_image": round(gflops_per_image(model, r.img_size), 4), "metric_units": METRIC_UNITS})
        if dist.is_main:
            print(json.dumps(m, indent=2))
            if args.json:
                Path(args.json).write_text(json.dumps(m, indent=2))
    finally:
        D.cleanup(dist)
    return 0
