"""The ``hpvit`` command line: argument parsing only; the work happens in the modules it calls.

Task commands (``train``/``eval`` with ``cls``/``det``/``seg``) are contributed by the task modules:
each ``hpvit.tasks.<module>`` that defines ``TASK = "<name>"`` plus ``add_train_args(parser)``,
``run_train(args)``, ``add_eval_args(parser)`` and ``run_eval(args)`` appears automatically.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from typing import Callable

from .errors import HPViTError

TASK_MODULES = ("classification", "detection", "segmentation")


def parse_key_values(items: list[str] | None, flag: str = "--set") -> dict:
    """``["a=1", "b=gelu"]`` -> ``{"a": 1, "b": "gelu"}``: values parse as JSON when they can, else stay
    strings. Used by every ``KEY=VALUE`` flag (``--spec``, ``--set``, ``--rcnn``)."""
    import json

    from .errors import ConfigError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


OS_ERRNOS = (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT)


def os_error_message(e: OSError) -> str:
    """``PATH: what happened; what to do`` for the file-system errors a user can fix."""
    what = e.filename or "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}: the disk is full (or over quota); free some space or use another disk, then run again"
    return f"{what}: {e.strerror or 'permission denied'}; check the path's permissions or choose a writable folder"


def _task_modules():
    mods = []
    for name in TASK_MODULES:
        try:
            mods.append(importlib.import_module(f"hpvit.tasks.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"hpvit.tasks.{name}":
                raise
    return mods


def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="paper-cls", help="preset name (paper-cls, paper-det, paper-seg, identity, ...) or a JSON file")
    p.add_argument("--format", default=None, help="force the checkpoint format instead of auto-detecting it")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the source's)")
    p.add_argument("--spec", action="append", default=[], metavar="KEY=VALUE",
                   help="override what weights cannot show, e.g. --spec act=gelu --spec num_heads=16 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from .commands import cmd_convert, cmd_demo, cmd_info

    parser = argparse.ArgumentParser(prog="hpvit", description="Turn plain ViT checkpoints into hierarchical backbones.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="transform a plain ViT, print the reuse report and stage table, save a feature-map PNG")
    p.add_argument("--checkpoint", default=None, help="plain ViT checkpoint (default: a randomly initialised ViT-Tiny)")
    p.add_argument("--image", default=None, help="input image (default: a built-in synthetic scene)")
    p.add_argument("--config", default="paper-cls")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--out", default="hpvit_demo.png", help="PNG to write")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="convert a plain ViT checkpoint into an hpvit .safetensors file")
    p.add_argument("src", help="checkpoint path, Hugging Face folder, or timm:<model name>")
    p.add_argument("-o", "--out", required=True, help="output .safetensors path")
    _add_common_model_args(p)
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--validate", action="store_true", help="check the identity config against the source's own library")
    p.add_argument("--reparameterize", action="store_true", help="merge avg-pool + conv pairs before saving")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="per-stage table: blocks, tokens, window, dim, params, GFLOPs")
    p.add_argument("src", help="plain checkpoint, hpvit .safetensors file, or timm:<model name>")
    _add_common_model_args(p)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--similarity", default=None, metavar="IMAGES",
                   help="folder or zip of images: per stage, cosine similarity of the transformed model's output to "
                        "the plain model's output after the same block (and top-1 agreement when both classify)")
    p.add_argument("--max-images", type=int, default=32, help="images used by --similarity (default 32)")
    p.add_argument("--plain", default=None, help="with --similarity: the plain checkpoint to compare with (default: SRC)")
    p.set_defaults(func=cmd_info)

    from .tasks import adapt as _adapt

    p = sub.add_parser("adapt", help=_adapt.HELP)
    _adapt.add_args(p)
    p.set_defaults(func=_adapt.run)

    try:
        from .bench import add_bench_args, run_bench
    except ModuleNotFoundError as e:
        if e.name != "hpvit.bench":
            raise
    else:
        p = sub.add_parser("bench", help="speed / memory benchmark against timm ViT, Hiera and Swin")
        add_bench_args(p)
        p.set_defaults(func=run_bench)

    tasks = _task_modules()
    if tasks:
        tr = sub.add_parser("train", help="fine-tune a transformed (or plain baseline) model").add_subparsers(dest="task", required=True)
        ev = sub.add_parser("eval", help="evaluate a fine-tuned model").add_subparsers(dest="task", required=True)
        for m in tasks:
            p = tr.add_parser(m.TASK, help=getattr(m, "TRAIN_HELP", None))
            m.add_train_args(p)
            p.set_defaults(func=m.run_train)
            p = ev.add_parser(m.TASK, help=getattr(m, "EVAL_HELP", None))
            m.add_eval_args(p)
            p.set_defaults(func=m.run_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable = args.func
    try:
        rc = func(args)
    except (HPViTError, FileExistsError, FileNotFoundError) as e:
        print(f"hpvit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write outside hpvit's own helpers (a PNG, a JSON): disk full, read-only folder...
        if e.errno not in OS_ERRNOS:
            raise
        print(f"hpvit: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hpvit: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
