"""``hpvit adapt``: align a transformed model to its plain source on unlabeled images (see
:mod:`hpvit.tasks.adapt`)."""

from __future__ import annotations

import argparse

from .common import (add_format_arg, add_model_arg, add_old_names, add_run_args, add_spec_arg, config_help,
                     fit_batch, parse_key_values, recipe_from_flags, run_training, schedule_flags, subset_spec)

HELP = "align a transformed model to its plain source on unlabeled images (distillation, before fine-tuning)"


def add_adapt_args(p: argparse.ArgumentParser) -> None:
    """``hpvit adapt``: label-free distillation toward the plain source (hpvit.tasks.adapt)."""
    add_model_arg(p, "plain ViT checkpoint (file, HF folder, timm:<name>): teacher and source", old="--init")
    p.add_argument("--config", default="paper-cls", help=config_help("cls", "paper-cls", "to align"))
    add_format_arg(p)
    add_spec_arg(p)
    p.add_argument("--data", action="append", required=True, metavar="DIR_OR_ZIP",
                   help="unlabeled images: a folder (searched recursively) or a zip; repeatable")
    p.add_argument("--eval-data", action="append", default=None, metavar="DIR_OR_ZIP",
                   help="held-out unlabeled images: agreement with the plain model is measured on them (repeatable)")
    add_old_names(p, {"--images": "--data", "--holdout": "--eval-data"})
    p.add_argument("-o", "--out", required=True, help="output directory (model.safetensors, metrics.jsonl, results.json...)")
    p.add_argument("--recipe", default="adapt", help="recipe name or JSON file (default: adapt)")
    p.add_argument("--targets", default="features,logits", help="what to match: features, logits or both (default)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the logit term")
    p.add_argument("--feature-weight", type=float, default=1.0, help="weight of the feature (and class-token) term")
    p.add_argument("--logit-weight", type=float, default=1.0, help="weight of the logit term")
    p.add_argument("--train-images", type=subset_spec, default=None, metavar="N",
                   help="adapt on a fixed random subset of N of the --data images (default: all)")
    p.add_argument("--eval-images", type=subset_spec, default=None, metavar="N",
                   help="measure on a fixed random subset of N of the --eval-data images (default: all)")
    add_run_args(p)
    p.set_defaults(func="hpvit.cli.adapt:run")


def build_recipe(args):
    from ..data.subset import subset_count

    from ..data.unlabeled import UnlabeledImages
    from ..errors import HPViTError

    flags = {**schedule_flags(args), "max_train_samples": subset_count(args.train_images, "--train-images")}
    r = recipe_from_flags(args.recipe, flags, args.set)
    try:
        n_train = len(UnlabeledImages(args.data, None, r.max_train_samples, r.seed))
    except HPViTError:  # unreadable images: the task names them, after the output folder is claimed
        return r
    return fit_batch(r, n_train, args)


def run(args) -> int:
    import torch

    from ..data.subset import subset_count
    from ..tasks.adapt import AdaptTask

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = build_recipe(args)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    task = AdaptTask(args.model, args.data, recipe, config=args.config, fmt=args.format, eval_images=args.eval_data,
                     targets=targets, temperature=args.temperature, feature_weight=args.feature_weight,
                     logit_weight=args.logit_weight, max_eval_samples=subset_count(args.eval_images, "--eval-images"),
                     spec_overrides=parse_key_values(args.spec, "--spec"))
    return run_training(task, recipe, args)
