"""``hpvit train cls`` and ``hpvit eval cls``: arguments, the recipe the flags resolve to, and running.

``hpvit train cls --model SRC [--config grid-lite-cls] --data PATH --out DIR [--recipe NAME|FILE] ...``
``hpvit eval cls --model DIR_OR_FILE --data PATH``
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..config import RECOMMENDED
from ..errors import ConfigError, HPViTError
from .common import (AUTO_RECIPE, add_device_args, add_format_arg, add_model_arg, add_old_names, add_overwrite_arg,
                     add_run_args, add_subset_args, check_classifier_config, check_eval_outputs, class_count,
                     config_help, eval_overwrite_help, evaluate_saved, fit_batch,
                     recipe_from_flags, run_training, schedule_flags)

TRAIN_HELP = "fine-tune a classifier on an ImageFolder directory or zip (train/ + val/ or test/)"
EVAL_HELP = "evaluate a fine-tuned classifier (top-1 / top-5)"


def add_cls_train_args(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, "the model to start from: a plain ViT checkpoint (file, HF folder, timm:<name>) or a file "
                     "hpvit wrote", old="--init")
    # default None: a file hpvit wrote keeps its stored config (another --config is an error); a plain
    # checkpoint gets RECOMMENDED["cls"] (tasks/classification.py: DEFAULT_CONFIG)
    p.add_argument("--config", default=None, help=config_help("cls", RECOMMENDED["cls"]) + "; a file hpvit wrote "
                   "keeps its stored config, and another --config is an error")
    add_format_arg(p)
    p.add_argument("--num-classes", type=class_count, default=None, help="must match the dataset's classes (default: from the data)")
    p.add_argument("--head", choices=("avg", "token"), default=None,
                   help="classifier head: avg = global average pooling, token = class token (identity only)")
    p.add_argument("--data", required=True, help="ImageFolder directory or .zip with train/ and val/ (or test/)")
    p.add_argument("-o", "--out", required=True,
                   help="output directory (checkpoints, recipe.json, metrics.jsonl, results.json, curves.png)")
    p.add_argument("--recipe", default=AUTO_RECIPE,
                   help="recipe name (imagenet-paper, cifar-mini), a JSON file, or auto (default): imagenet-paper on a "
                        "GPU with >= 100,000 training images, else cifar-mini; the choice is printed and written to "
                        "OUT/recipe.json")
    add_subset_args(p, slices=False, aliases={"--max-train-samples": "--train-images",
                                              "--max-eval-samples": "--eval-images"})
    add_run_args(p)


def add_cls_eval_args(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, "a training output directory or an hpvit .safetensors file")
    p.add_argument("--data", required=True, help="ImageFolder directory or .zip with val/ or test/")
    p.add_argument("--split", default=None, help="split to evaluate (default: val, else test)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the training image size, model.json)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    add_subset_args(p, slices=False, train=False, aliases={"--max-eval-samples": "--eval-images"})
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (at most the usable cores)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training directory")
    # --out (-o), the flag every command writes with; --json, its old name here, still works (dest kept)
    p.add_argument("-o", "--out", dest="json", default=None, metavar="FILE.json",
                   help="also write the metrics to this JSON file (an earlier eval's is replaced; any other existing "
                        "file only with --overwrite)")
    add_old_names(p, {"--json": "--out"})
    add_overwrite_arg(p, help=eval_overwrite_help("--out"))
    add_device_args(p)


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
    import torch

    if device:
        return torch.device(device).type
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_recipe_name(args) -> str:
    """``--recipe`` as given, or for ``auto`` the recipe :func:`choose_recipe` picks for ``--data`` (printed)."""
    from ..engine.logging import log

    if args.recipe != AUTO_RECIPE:
        return args.recipe
    name, why = choose_recipe(train_count(args), _device_type(args.device))
    log(f"--recipe auto -> {name} ({why}); pass --recipe imagenet-paper|cifar-mini|FILE.json to choose")
    return name


def train_count(args) -> int:
    """Training images the run will use (the train split's file list, no image decoded; --train-images applied)."""
    from ..data import ImageFolderSource
    from ..data.subset import subset_count

    n_train = len(ImageFolderSource(args.data).samples("train"))
    wanted = subset_count(args.train_images, "--train-images")
    return min(n_train, wanted) if wanted else n_train


def build_recipe(args):
    from ..data.subset import subset_count

    flags = {**schedule_flags(args), "max_train_samples": subset_count(args.train_images, "--train-images"),
             "max_eval_samples": subset_count(args.eval_images, "--eval-images")}
    recipe = recipe_from_flags(resolve_recipe_name(args), flags, args.set)
    try:
        n_train = train_count(args)
    except HPViTError:  # unreadable data: the task names it, after the output folder is claimed
        return recipe
    return fit_batch(recipe, n_train, args)


def run_train(args) -> int:
    import torch

    from ..tasks.classification import ClassificationTask

    check_classifier_config(args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = build_recipe(args)
    task = ClassificationTask(args.model, args.data, recipe, config=args.config, num_classes=args.num_classes,
                              head=args.head, fmt=args.format)
    return run_training(task, recipe, args)


def run_eval(args) -> int:
    """Evaluate a saved classifier: the model, the dataset and the classification evaluator (no training task)."""
    import torch

    from ..data import ImageFolderDataset, ImageFolderSource, build_transform
    from ..data.subset import subset_count
    from ..engine.loop import usable_workers
    from ..engine.recipe import Recipe
    from ..evaluation.classification import METRIC_UNITS, ClassificationEvaluator
    from ..export import load
    from ..tasks.classification import EMA_FILE, MODEL_FILE, PREPROC_FILE
    from ..utils import count_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.json:
        check_eval_outputs([args.json], args.overwrite, "--json")
    mp = Path(args.model)
    if mp.is_dir():
        f = mp / (EMA_FILE if args.ema else MODEL_FILE)
        if not f.is_file():
            raise ConfigError(f"{mp}: no {f.name} in this directory; pass a training output directory or a .safetensors file")
        mp = f
    elif not mp.is_file():
        raise ConfigError(f"--model {mp}: no such file or directory")
    model = load(mp)
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
    rep = lambda m, dev: {  # noqa: E731
        "model": str(mp), "split": split, "img_size": r.img_size, "metric_units": METRIC_UNITS,
        "gflops_per_image": round(count_flops(model, torch.zeros(1, model.spec.in_chans, r.img_size, r.img_size,
                                                                 device=dev)) / 1e9, 4)}
    return evaluate_saved(model, ds, ClassificationEvaluator(), device=args.device, batch_size=args.batch_size,
                          desc=f"evaluating {split}", workers=usable_workers(args.workers, int(os.environ.get("WORLD_SIZE", "1"))),
                          headline=("top1", "top5"), report=rep, results_json=args.json)
