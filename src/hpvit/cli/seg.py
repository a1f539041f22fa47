"""``hpvit train seg`` and ``hpvit eval seg``: UperNet on a transformed or plain ViT backbone."""

from __future__ import annotations

import argparse

from .common import add_device_args, add_model_arg, add_old_names, add_subset_args, dense_recipe, eval_out_dir, evaluate_saved, run_training
from .det import add_dense_train_args, add_eval_overwrite_arg, check_eval_out

TRAIN_HELP = "train UperNet on a transformed or plain ViT backbone (CamVid / ADE20K / Cityscapes layouts)"
EVAL_HELP = "mIoU / mAcc (and per class) of a trained segmenter, whole-image or sliding-window inference"


def _add_seg_data_args(p: argparse.ArgumentParser, train: bool = False) -> None:
    p.add_argument("--data", required=not train, help="dataset root folder" + ("; required unless --dry-run" if train else ""))
    p.add_argument("--layout", default="camvid", choices=("camvid", "ade20k", "cityscapes"),
                   help="folder layout and label convention (docs/dense.md)")
    p.add_argument("--base-size", type=int, default=None,
                   help="resize images so the longer side is this (before scale jitter / for evaluation); default: "
                        + ("the recipe's base_size, else original" if train else "the training base size"))
    p.add_argument("--mode", default=None if train else "whole", choices=("whole", "slide"),
                   help="inference: whole image or sliding window (default: "
                        + ("the recipe's eval_mode, else whole)" if train else "whole)"))
    p.add_argument("--ignore-value", type=int, default=None,
                   help="raw label value meaning 'not labelled' (default per layout: camvid 11, ade20k 0, "
                        "cityscapes 255); any other value outside the classes is an error")


def add_seg_train_args(p: argparse.ArgumentParser) -> None:
    add_dense_train_args(p, "seg")
    _add_seg_data_args(p, train=True)
    p.set_defaults(required_unless_dry_run=("--model", "--out", "--data"))
    p.add_argument("--train-split", default="train", help="training split folder (default train)")
    p.add_argument("--eval-split", default="val", help="evaluation split folder (default val; '' for none)")
    add_old_names(p, {"--val-split": "--eval-split"})
    add_subset_args(p, slices=True, aliases={"--max-train-images": "--train-images", "--max-val-images": "--eval-images"})
    p.add_argument("--head-channels", type=int, default=128, help="UperNet width (512 in mmseg's ViT-B configs)")


def add_seg_eval_args(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, "a `hpvit train seg` output directory or its model.safetensors")
    _add_seg_data_args(p)
    p.add_argument("--split", default="val", help="split folder to evaluate (default val)")
    add_subset_args(p, slices=True, train=False, aliases={"--max-val-images": "--eval-images"})
    p.add_argument("--crop", type=int, default=None, help="sliding-window size (default: the training crop)")
    p.add_argument("-o", "--out", default=None, help="output directory (default: MODEL_DIR/eval)")
    p.add_argument("--vis-images", type=int, default=3, metavar="N", help="images drawn into predictions.png (default 3)")
    add_eval_overwrite_arg(p)
    add_device_args(p)


def run_train(args) -> int:
    import torch

    from ..tasks.segmentation import SegData, SegmentationTask

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = dense_recipe(args)
    data = SegData(args.data, args.layout, args.train_split, args.eval_split or None, args.train_images,
                   args.eval_images, args.base_size, args.ignore_value)
    task = SegmentationTask(args.model, recipe, data, config=args.config, out=args.out, mode=args.mode,
                            head_channels=args.head_channels, fmt=args.format)
    return run_training(task, recipe, args)


def run_eval(args) -> int:
    """Evaluate a saved segmenter: the model, the dataset and the segmentation evaluator (no training task)."""
    import torch

    from ..data.segmentation import collate_seg, get_layout
    from ..errors import ConfigError
    from ..evaluation.segmentation import METRIC_UNITS, SegmentationEvaluator
    from ..export import load_dense
    from ..tasks.segmentation import prepare_segmentation, seg_subset, visualize

    if args.threads:
        torch.set_num_threads(args.threads)
    out = eval_out_dir(args.model, args.out)
    check_eval_out(args, out)
    model = load_dense(args.model, "seg")
    meta = model.hpvit_meta
    out.mkdir(parents=True, exist_ok=True)
    layout = get_layout(args.layout)
    if list(layout.classes) != list(meta["classes"]):
        raise ConfigError(f"the model was trained on the {meta['layout']} classes; --layout {args.layout} has different "
                          "classes")
    base = args.base_size if args.base_size is not None else meta["base_size"]
    crop = args.crop or meta["crop"]
    ignore = args.ignore_value if args.ignore_value is not None else meta.get("ignore_value")
    ds = seg_subset(args.eval_images, "--eval-images", args.data, args.layout, args.split, False, crop, base,
                    ignore_value=ignore)
    rep = lambda m, dev: {  # noqa: E731
        "model": str(args.model), "data": str(args.data), "split": args.split, "inference": args.mode,
        "metric_units": METRIC_UNITS, "base_size": base, "crop": crop,
        "predictions_png": str(visualize(model, ds, args.vis_images, args.mode, crop, layout.palette,
                                         out / "predictions.png"))}
    return evaluate_saved(model, ds, SegmentationEvaluator(layout.classes, args.mode, crop), device=args.device,
                          batch_size=1, desc=f"evaluating {args.split}", collate_fn=collate_seg,
                          prepare=prepare_segmentation, headline=("mIoU", "mAcc", "aAcc"), report=rep, results_json=out / "results.json",
                          shown=lambda m: {k: v for k, v in m.items() if not k.startswith(("IoU.", "Acc."))})
