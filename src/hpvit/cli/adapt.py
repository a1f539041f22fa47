"""``hpvit adapt``: align a transformed model to its plain source on unlabeled images (see
:mod:`hpvit.tasks.adapt`)."""

from __future__ import annotations

import argparse

from .common import add_run_args, parse_key_values, recipe_from_flags, run_training, subset_spec

HELP = "align a transformed model to its plain source on unlabeled images (distillation, before fine-tuning)"


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
    add_run_args(p)
    p.set_defaults(func="hpvit.cli.adapt:run")


def build_recipe(args):
    from ..data.subset import subset_count

    flags = {"epochs": args.epochs, "img_size": args.img_size, "batch_size": args.batch_size, "blr": args.blr,
             "lr": args.lr, "max_train_samples": subset_count(args.train_images, "--train-images"), "amp": args.amp,
             "num_workers": args.workers, "seed": args.seed}
    return recipe_from_flags(args.recipe, flags, args.set)


def run(args) -> int:
    import torch

    from ..data.subset import subset_count
    from ..tasks.adapt import AdaptTask

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = build_recipe(args)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    task = AdaptTask(args.init, args.images, recipe, config=args.config, fmt=args.format, eval_images=args.holdout,
                     targets=targets, temperature=args.temperature, feature_weight=args.feature_weight,
                     logit_weight=args.logit_weight, max_eval_samples=subset_count(args.eval_images, "--eval-images"),
                     spec_overrides=parse_key_values(args.spec, "--spec"))
    return run_training(task, recipe, args)
