"""Command-line arguments of ``hpvit train`` / ``hpvit eval`` for every task, kept free of heavy imports.

``hpvit train cls --help`` builds its parser from this module alone (no torch, no timm), so every
``--help`` answers in well under a second; the task modules are imported only to run a command.

Subsets share one naming scheme across tasks: ``--train-images`` and ``--eval-images`` take a count
``N`` (classification: a fixed class-balanced subset of N images; detection and segmentation: the
first N images) or, for detection and segmentation, a slice ``START:STOP`` of the images in their
listed order. The older per-task names stay as aliases (their help says so).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Callable

AUTO_RECIPE = "auto"
_SUBSET = re.compile(r"^\s*(\d+)\s*$|^\s*(-?\d*)\s*:\s*(-?\d*)\s*$")


def subset_spec(value: str) -> str:
    """argparse type of ``--train-images`` / ``--eval-images``: ``N`` or ``START:STOP`` (checked, kept as text)."""
    m = _SUBSET.match(value)
    if not m:
        raise argparse.ArgumentTypeError(f"expects a count N or a slice START:STOP (e.g. 1000 or 0:100), got {value!r}")
    if m.group(1) is not None and int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"expects a count >= 1, got {value!r}")
    return value.strip()


def subset_indices(spec: "str | None", n: int, flag: str) -> "list[int] | None":
    """The image indices ``spec`` selects out of ``n`` (None: all). ``N`` -> the first N; ``A:B`` -> that slice."""
    from ..errors import ConfigError

    if spec is None or spec == "":
        return None
    if ":" not in spec:
        return list(range(min(int(spec), n)))
    a, b = spec.split(":", 1)
    idx = list(range(n))[int(a) if a.strip() else 0:int(b) if b.strip() else n]
    if not idx:
        raise ConfigError(f"{flag} {spec!r} selects no image out of {n}; give a non-empty START:STOP or a count N")
    return idx


def subset_count(spec: "str | None", flag: str) -> "int | None":
    """``N`` as an int (classification subsets are class-balanced counts, not slices)."""
    from ..errors import ConfigError

    if spec is None:
        return None
    if ":" in spec:
        raise ConfigError(f"{flag} {spec!r}: classification subsets are fixed class-balanced samples, so give a "
                          "count N (e.g. 1000), not a slice")
    return int(spec)


def _alias(p: argparse.ArgumentParser, old: str, new: str, dest: str, metavar: str) -> None:
    """``old`` as a second spelling of ``new`` (same destination), marked as the old name in ``--help``."""
    p.add_argument(old, dest=dest, type=subset_spec, default=None, metavar=metavar,
                   help=f"old name of {new} (kept as an alias)")


def add_subset_args(p: argparse.ArgumentParser, slices: bool, train: bool = True,
                    aliases: "dict[str, str] | None" = None) -> None:
    """``--train-images`` (when ``train``) and ``--eval-images``; ``aliases`` maps old flag -> new flag."""
    what = ("N (the first N images) or START:STOP (a slice, images in listed order)" if slices
            else "N: a fixed class-balanced subset of N images")
    metavar = "N|A:B" if slices else "N"
    if train:
        p.add_argument("--train-images", type=subset_spec, default=None, metavar=metavar,
                       help=f"train on a subset: {what} (default: all)")
    p.add_argument("--eval-images", type=subset_spec, default=None, metavar=metavar,
                   help=f"evaluate on a subset: {what} (default: all)")
    for old, new in (aliases or {}).items():
        _alias(p, old, new, new.lstrip("-").replace("-", "_"), metavar)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Flags every training command shares (threads, device, resume/overwrite, bad images)."""
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (finished or not); without it such a run is never replaced")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out training images that cannot be decoded and list them in OUT/skipped-images.txt "
                        "(default: such an image is an error naming the file)")


# ---------------------------------------------------------------------------------- classification
def add_cls_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", required=True, help="plain ViT checkpoint (file, HF folder, timm:<name>) or an hpvit .safetensors")
    p.add_argument("--config", default="paper-cls", help="paper-cls (default), identity (the plain baseline), ... or a JSON file")
    p.add_argument("--format", default=None, help="force the checkpoint format instead of auto-detecting it")
    p.add_argument("--num-classes", type=int, default=None, help="must match the dataset's classes (default: from the data)")
    p.add_argument("--head", choices=("avg", "token"), default=None,
                   help="classifier head: avg = global average pooling, token = class token (identity only)")
    p.add_argument("--data", required=True, help="ImageFolder directory or .zip with train/ and val/ (or test/)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, recipe.json, metrics.jsonl, results.json, curves.png)")
    p.add_argument("--recipe", default=AUTO_RECIPE,
                   help="recipe name (imagenet-paper, cifar-mini), a JSON file, or auto (default): imagenet-paper on a "
                        "GPU with >= 100,000 training images, else cifar-mini; the choice is printed and written to "
                        "OUT/recipe.json")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size")
    p.add_argument("--accum-steps", type=int, default=None, help="gradient accumulation steps")
    add_subset_args(p, slices=False, aliases={"--max-train-samples": "--train-images",
                                              "--max-eval-samples": "--eval-images"})
    p.add_argument("--blr", type=float, default=None, help="base lr (lr = blr * global batch / 256)")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None)
    p.add_argument("--ema", action="store_true", default=None, help="keep an EMA of the weights (evaluated too)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (at most the usable cores)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic algorithms only")
    _add_run_args(p)


def add_cls_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a training output directory or an hpvit .safetensors file")
    p.add_argument("--data", required=True, help="ImageFolder directory or .zip with val/ or test/")
    p.add_argument("--split", default=None, help="split to evaluate (default: val, else test)")
    p.add_argument("--img-size", type=int, default=None, help="default: the training image size (model.json)")
    p.add_argument("--batch-size", type=int, default=64)
    add_subset_args(p, slices=False, train=False, aliases={"--max-eval-samples": "--eval-images"})
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (at most the usable cores)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training directory")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)


# ---------------------------------------------------------------------------------- dense tasks
def add_dense_train_args(p: argparse.ArgumentParser, default_config: str, configs: str) -> None:
    """Flags shared by ``train det`` and ``train seg``."""
    p.add_argument("--init", required=True, help="plain ViT checkpoint (file, HF folder, timm:<name>)")
    p.add_argument("--config", default=default_config, help=configs)
    p.add_argument("--format", default=None, help="force the checkpoint format instead of auto-detecting it")
    p.add_argument("--out", required=True, help="output directory (checkpoint, recipe.json, metrics.jsonl, results.json, PNGs)")
    p.add_argument("--recipe", default=None, help="recipe JSON file (default: the task's built-in defaults, printed at start)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size")
    p.add_argument("--accum-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="absolute learning rate")
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--layer-decay", type=float, default=None)
    p.add_argument("--drop-path", type=float, default=None)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None)
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (at most the usable cores)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N epochs (and at the end)")
    p.add_argument("--ckpt-every-steps", type=int, default=None)
    _add_run_args(p)


def add_det_train_args(p: argparse.ArgumentParser) -> None:
    add_dense_train_args(p, "paper-det", "paper-det (transformed backbone, default) or plain-det (the ViTDet-style plain baseline)")
    p.add_argument("--ann", required=True, help="COCO instances json (polygon or RLE masks)")
    p.add_argument("--images", required=True, help="folder holding the json's file_name images")
    add_subset_args(p, slices=True, aliases={"--val-images": "--eval-images"})
    p.add_argument("--val-ann", default=None, help="validation json (default: --ann restricted to --eval-images)")
    p.add_argument("--val-images-dir", default=None, help="image folder of --val-ann (default: --images)")
    p.add_argument("--lsj", action="store_true", help="large-scale jitter (scale 0.1-2.0, crop/pad to img-size square)")
    p.add_argument("--rcnn", action="append", metavar="KEY=VALUE",
                   help="torchvision MaskRCNN argument (repeatable), e.g. box_batch_size_per_image=128")


def add_det_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a `hpvit train det` output directory or its model.safetensors")
    p.add_argument("--ann", required=True, help="COCO instances json to evaluate on")
    p.add_argument("--images", required=True, help="image folder of --ann")
    add_subset_args(p, slices=True, train=False, aliases={"--val-images": "--eval-images"})
    p.add_argument("--out", default=None, help="output directory (default: MODEL_DIR/eval)")
    p.add_argument("--img-size", type=int, default=None, help="default: the training size")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--vis-images", type=int, default=4, help="images drawn into predictions.png")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)


def _add_seg_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset root folder")
    p.add_argument("--layout", default="camvid", choices=("camvid", "ade20k", "cityscapes"),
                   help="folder layout and label convention (docs/dense.md)")
    p.add_argument("--base-size", type=int, default=None,
                   help="resize images so the longer side is this (before scale jitter / for evaluation); default: original")
    p.add_argument("--mode", default="whole", choices=("whole", "slide"), help="inference: whole image or sliding window")
    p.add_argument("--ignore-value", type=int, default=None,
                   help="raw label value meaning 'not labelled' (default per layout: camvid 11, ade20k 0, "
                        "cityscapes 255); any other value outside the classes is an error")


def add_seg_train_args(p: argparse.ArgumentParser) -> None:
    add_dense_train_args(p, "paper-seg", "paper-seg (transformed backbone, default) or plain-seg (the BEiT-style plain baseline)")
    _add_seg_data_args(p)
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val", help="evaluation split ('' for none)")
    add_subset_args(p, slices=True, aliases={"--max-train-images": "--train-images", "--max-val-images": "--eval-images"})
    p.add_argument("--head-channels", type=int, default=128, help="UperNet width (512 in mmseg's ViT-B configs)")


def add_seg_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a `hpvit train seg` output directory or its model.safetensors")
    _add_seg_data_args(p)
    p.add_argument("--split", default="val")
    add_subset_args(p, slices=True, train=False, aliases={"--max-val-images": "--eval-images"})
    p.add_argument("--crop", type=int, default=None, help="sliding-window size (default: the training crop)")
    p.add_argument("--out", default=None, help="output directory (default: MODEL_DIR/eval)")
    p.add_argument("--vis-images", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)


# ---------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class TaskCLI:
    """One task's ``train``/``eval`` subcommands: help texts, argument builders, and where the code that runs
    them lives (``module`` is imported only when the command runs)."""

    name: str
    module: str
    train_help: str
    eval_help: str
    add_train: Callable[[argparse.ArgumentParser], None]
    add_eval: Callable[[argparse.ArgumentParser], None]


TASKS: tuple[TaskCLI, ...] = (
    TaskCLI("cls", "hpvit.tasks.classification",
            "fine-tune a classifier on an ImageFolder directory or zip (train/ + val/ or test/)",
            "evaluate a fine-tuned classifier (top-1 / top-5)", add_cls_train_args, add_cls_eval_args),
    TaskCLI("det", "hpvit.tasks.detection",
            "train Mask R-CNN (FPN) on a transformed or plain ViT backbone with COCO-format data",
            "COCO box / mask AP of a trained Mask R-CNN, predictions json and a PNG of predictions",
            add_det_train_args, add_det_eval_args),
    TaskCLI("seg", "hpvit.tasks.segmentation",
            "train UperNet on a transformed or plain ViT backbone (CamVid / ADE20K / Cityscapes layouts)",
            "mIoU / mAcc (and per class) of a trained segmenter, whole-image or sliding-window inference",
            add_seg_train_args, add_seg_eval_args),
)


# ---------------------------------------------------------------------------------- adapt
def add_adapt_args(p: argparse.ArgumentParser) -> None:
    """``hpvit adapt``: label-free distillation toward the plain source (hpvit.tasks.adapt)."""
    p.add_argument("--init", required=True, help="plain ViT checkpoint (file, HF folder, timm:<name>): teacher and source")
    p.add_argument("--config", default="paper-cls", help="hierarchical preset or JSON file (default paper-cls)")
    p.add_argument("--format", default=None, help="force the checkpoint format instead of auto-detecting it")
    p.add_argument("--spec", action="append", default=[], metavar="KEY=VALUE", help="override the inferred plain spec")
    p.add_argument("--images", action="append", required=True, metavar="DIR_OR_ZIP",
                   help="unlabeled images: a folder (searched recursively) or a zip; repeatable")
    p.add_argument("--holdout", action="append", default=None, metavar="DIR_OR_ZIP",
                   help="held-out unlabeled images: top-1 agreement with the plain model is measured on them")
    p.add_argument("--out", required=True, help="output directory (model.safetensors, metrics.jsonl, results.json...)")
    p.add_argument("--recipe", default="adapt", help="recipe name or JSON file (default: adapt)")
    p.add_argument("--targets", default="features,logits", help="what to match: features, logits or both (default)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the logit term")
    p.add_argument("--feature-weight", type=float, default=1.0, help="weight of the feature (and class-token) term")
    p.add_argument("--logit-weight", type=float, default=1.0, help="weight of the logit term")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None, help="student and teacher input size during adaptation")
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size")
    p.add_argument("--blr", type=float, default=None, help="base lr (lr = blr * global batch / 256)")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--train-images", type=subset_spec, default=None, metavar="N",
                   help="adapt on a fixed random subset of N of the images (default: all)")
    p.add_argument("--eval-images", type=subset_spec, default=None, metavar="N",
                   help="measure on a fixed random subset of N of the --holdout images (default: all)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None)
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=None)
    _add_run_args(p)
