"""Command-line plumbing shared by the task modules (train/eval commands)."""

from __future__ import annotations

from pathlib import Path


def recipe_from_flags(name: str, flags: dict, set_items: "list[str] | None"):
    """Recipe ``name`` (or a JSON file) with the command's flags that were given (not None) and every
    ``--set KEY=VALUE`` applied, in that order."""
    from ..cli import parse_key_values
    from ..engine.recipe import load_recipe

    changes = {k: v for k, v in flags.items() if v is not None}
    changes.update(parse_key_values(set_items, "--set"))
    r = load_recipe(name)
    return r.replace(**changes) if changes else r


def run_training(task, recipe, args) -> int:
    """Run ``task`` with the shared engine in the folder ``args.out`` (claimed for this run; ``--overwrite`` and
    ``--skip-bad-images`` are honoured when the command defines them); the command line goes into results.json."""
    from ..engine.loop import Trainer

    run_cfg = {k: v for k, v in vars(args).items() if k != "func"}
    Trainer(task, recipe, args.out, resume=args.resume, device=args.device, run_config=run_cfg,
            overwrite=getattr(args, "overwrite", False), skip_bad_images=getattr(args, "skip_bad_images", False)).run()
    return 0


def eval_out_dir(model: str, out: str | None) -> Path:
    """``--out`` if given, else ``eval/`` next to the model (its run directory, or the file's folder)."""
    if out:
        return Path(out)
    mp = Path(model)
    return (mp if mp.is_dir() else mp.parent) / "eval"
