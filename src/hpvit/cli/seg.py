"""``hpvit train seg`` and ``hpvit eval seg``: UperNet on a transformed or plain ViT backbone."""

from __future__ import annotations

import argparse

from .common import add_subset_args
from .det import add_dense_train_args

TRAIN_HELP = "train UperNet on a transformed or plain ViT backbone (CamVid / ADE20K / Cityscapes layouts)"
EVAL_HELP = "mIoU / mAcc (and per class) of a trained segmenter, whole-image or sliding-window inference"
RUN_TRAIN = "hpvit.tasks.segmentation:run_train"
RUN_EVAL = "hpvit.tasks.segmentation:run_eval"


def _add_seg_data_args(p: argparse.ArgumentParser, train: bool = False) -> None:
    p.add_argument("--data", required=not train, help="dataset root folder" + ("; required unless --dry-run" if train else ""))
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
    _add_seg_data_args(p, train=True)
    p.set_defaults(required_unless_dry_run=("--init", "--out", "--data"))
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
