"""``hpvit train det`` and ``hpvit eval det``: Mask R-CNN (FPN) on a transformed or plain ViT backbone."""

from __future__ import annotations

import argparse

from ..config import RECOMMENDED
from .common import (add_device_args, add_format_arg, add_model_arg, add_old_names, add_overwrite_arg, add_run_args,
                     add_subset_args, check_eval_outputs, config_help, dense_recipe, eval_out_dir, eval_overwrite_help,
                     evaluate_saved, parse_key_values, run_training)

TRAIN_HELP = "train Mask R-CNN (FPN) on a transformed or plain ViT backbone with COCO-format data"
EVAL_HELP = "COCO box / mask AP of a trained Mask R-CNN, predictions json and a PNG of predictions"


def add_dense_train_args(p: argparse.ArgumentParser, task: str) -> None:
    """Flags shared by ``train det`` and ``train seg`` (``task``: "det" or "seg")."""
    add_model_arg(p, "the model to start from: a plain ViT checkpoint (file, HF folder, timm:<name>) or a file "
                     "hpvit wrote (e.g. `hpvit adapt`'s output); required unless --dry-run", required=False, old="--init")
    p.add_argument("--config", default=RECOMMENDED[task], help=config_help(task, RECOMMENDED[task]))
    add_format_arg(p)
    p.add_argument("-o", "--out", help="output directory (checkpoint, recipe.json, metrics.jsonl, results.json, PNGs); "
                                       "required unless --dry-run")
    p.set_defaults(required_unless_dry_run=("--model", "--out"))
    p.add_argument("--recipe", default=f"{task}-default",
                   help=f"recipe name or JSON file (default {task}-default, sized for small runs); the paper's rows: "
                        + ("coco-maskrcnn-1x" if task == "det" else "ade20k-upernet-80k, cityscapes-upernet-40k")
                        + " (docs/dense.md)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved schedule (updates, epochs, lr at its milestones, batch per process, input "
                        "sizes) and exit, without reading data or weights")
    p.add_argument("--nproc", type=int, default=None,
                   help="with --dry-run: processes to plan for (default: WORLD_SIZE, else 1)")
    p.add_argument("--dry-run-images", type=int, default=None, metavar="N",
                   help="with --dry-run: training images to plan for (default: the recipe's dataset_images)")
    add_run_args(p)


def add_det_train_args(p: argparse.ArgumentParser) -> None:
    add_dense_train_args(p, "det")
    p.add_argument("--ann", help="COCO instances json (polygon or RLE masks); required unless --dry-run")
    p.add_argument("--data", help="image folder holding the json's file_name images; required unless --dry-run")
    p.set_defaults(required_unless_dry_run=("--model", "--out", "--ann", "--data"))
    add_subset_args(p, slices=True, aliases={"--val-images": "--eval-images"})
    p.add_argument("--eval-ann", default=None, help="evaluation json (default: --ann restricted to --eval-images)")
    p.add_argument("--eval-data", default=None, help="image folder of --eval-ann (default: --data)")
    add_old_names(p, {"--images": "--data", "--val-ann": "--eval-ann", "--val-images-dir": "--eval-data"})
    p.add_argument("--lsj", action="store_true", help="large-scale jitter (scale 0.1-2.0, crop/pad to img-size square)")
    p.add_argument("--rcnn", action="append", metavar="KEY=VALUE",
                   help="torchvision MaskRCNN argument (repeatable), e.g. box_batch_size_per_image=128")


def add_det_eval_args(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, "a `hpvit train det` output directory or its model.safetensors")
    p.add_argument("--ann", required=True, help="COCO instances json to evaluate on")
    p.add_argument("--data", required=True, help="image folder of --ann")
    add_old_names(p, {"--images": "--data"})
    add_subset_args(p, slices=True, train=False, aliases={"--val-images": "--eval-images"})
    p.add_argument("-o", "--out", default=None, help="output directory (default: MODEL_DIR/eval)")
    p.add_argument("--img-size", type=int, default=None, help="longer side (default: the training size)")
    p.add_argument("--short-side", type=int, default=None,
                   help="resize the shorter side to this instead (the 1x protocol's 800), longer side capped by "
                        "--max-long-side")
    p.add_argument("--max-long-side", type=int, default=None, help="with --short-side: longer side at most this (1333)")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass (default 2)")
    p.add_argument("--vis-images", type=int, default=4, metavar="N", help="images drawn into predictions.png (default 4)")
    add_eval_overwrite_arg(p)
    add_device_args(p)


EVAL_FILES = ("results.json", "predictions.json", "predictions.png")  # what eval det|seg write into --out


def add_eval_overwrite_arg(p: argparse.ArgumentParser) -> None:
    add_overwrite_arg(p, help=eval_overwrite_help("--out"))


def check_eval_out(args, out) -> None:
    """``eval det|seg``: what they write into ``out`` replaces nothing they did not write (see check_eval_outputs)."""
    check_eval_outputs([out / n for n in EVAL_FILES], args.overwrite, "--out")


def as_range(spec: "str | None") -> "str | None":
    """A subset flag for the COCO image list: ``N`` -> ``"0:N"`` (the first N), ``START:STOP`` unchanged."""
    return f"0:{int(spec)}" if spec is not None and ":" not in spec else spec


def run_train(args) -> int:
    import torch

    from ..tasks.detection import DetectionTask

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = dense_recipe(args)
    task = DetectionTask(args.model, recipe, config=args.config, ann=args.ann, images=args.data, out=args.out,
                         train_range=as_range(args.train_images), val_ann=args.eval_ann, val_images=args.eval_data,
                         val_range=as_range(args.eval_images), lsj=args.lsj, fmt=args.format,
                         rcnn=parse_key_values(args.rcnn, "--rcnn"))
    return run_training(task, recipe, args)


def run_eval(args) -> int:
    """Evaluate a saved detector: the model, the COCO images and the detection evaluator (no training task)."""
    import torch

    from ..data.coco import CocoSource, collate_detection, parse_range
    from ..engine.recipe import Recipe
    from ..errors import ConfigError
    from ..evaluation.detection import METRIC_UNITS, DetectionEvaluator
    from ..export import load_dense
    from ..tasks.detection import coco_dataset, prepare_detection, visualize

    if args.threads:
        torch.set_num_threads(args.threads)
    out = eval_out_dir(args.model, args.out)
    check_eval_out(args, out)
    model = load_dense(args.model, "det")
    meta = model.hpvit_meta
    src = CocoSource(args.ann, args.data)
    if src.cat_ids != meta["cat_ids"]:
        raise ConfigError(f"{args.ann}: its categories differ from the model's ({len(src.cat_ids)} vs "
                          f"{len(meta['cat_ids'])}); evaluate on data with the training category list")
    rng = as_range(args.eval_images)
    idx = parse_range(rng, len(src.images), "--eval-images")
    img_size = args.img_size or meta["img_size"]
    recipe = Recipe(img_size=img_size, test_short_side=args.short_side, max_long_side=args.max_long_side)
    split = f"{src.ann_file.name}" + (f" images {rng}" if rng else "")
    ds = coco_dataset(src, idx, False, recipe)
    rep = lambda m, dev: {  # noqa: E731
        "model": str(args.model), "ann": str(args.ann), "split": split, "img_size": img_size, "metric_units": METRIC_UNITS,
        "predictions_json": str(out / "predictions.json"),
        "predictions_png": str(visualize(model, coco_dataset(src, idx[: args.vis_images], False, recipe), src.cat_names,
                                         out / "predictions.png"))}
    return evaluate_saved(model, ds, DetectionEvaluator(src, idx, out), device=args.device, batch_size=args.batch_size,
                          desc=f"evaluating {split}", collate_fn=collate_detection, prepare=prepare_detection,
                          headline=("bbox_AP", "segm_AP", "bbox_AP50"), report=rep, results_json=out / "results.json")
