"""The ``hpvit`` command line: argument parsing only; the work happens in the modules it calls.

Task commands (``train``/``eval`` with ``cls``/``det``/``seg``) are listed in
:data:`hpvit.tasks._args.TASKS`, whose argument builders import nothing heavy. Every command names the
function that runs it as ``"module:function"``, imported only after parsing, so ``hpvit --help`` and
every ``hpvit <command> --help`` answer without importing torch (``adapt`` and ``bench`` build their
arguments in their own modules, which are imported only when that command is given).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from typing import Callable, Sequence

from .errors import HPViTError

ADAPT_HELP = "align a transformed model to its plain source on unlabeled images (distillation, before fine-tuning)"
BENCH_HELP = "speed / memory benchmark against timm ViT, Hiera and Swin"


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


def _add_common_model_args(p: argparse.ArgumentParser, config_default: "str | None" = "paper-cls") -> None:
    p.add_argument("--config", default=config_default,
                   help="preset name (paper-cls, paper-det, paper-seg, fast-cls, lite-cls, identity, plain-det, plain-seg) "
                        "or a JSON file" + (f" (default {config_default})" if config_default else
                                            " (default paper-cls; an hpvit file uses its own stored config)"))
    p.add_argument("--format", default=None, help="force the checkpoint format instead of auto-detecting it")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the source's)")
    p.add_argument("--spec", action="append", default=[], metavar="KEY=VALUE",
                   help="override what weights cannot show, e.g. --spec act=gelu --spec num_heads=16 (repeatable)")


def _command_of(argv: "Sequence[str] | None") -> "str | None":
    """The subcommand ``argv`` names (its first non-option word); None when unknown (then every command is built)."""
    if argv is None:
        return None
    return next((a for a in argv if not a.startswith("-")), "")


def _add_demo_convert_info(sub) -> None:
    p = sub.add_parser("demo", help="transform a plain ViT, print the reuse report and stage table, save a feature-map PNG")
    p.add_argument("--checkpoint", default=None,
                   help="plain ViT checkpoint or a file hpvit wrote (default: a randomly initialised ViT-Tiny)")
    p.add_argument("--image", default=None, help="input image (default: a built-in synthetic scene)")
    p.add_argument("--config", default="paper-cls", help="preset for a plain checkpoint (default paper-cls)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--out", default="hpvit_demo.png", help="PNG to write")
    p.set_defaults(func="hpvit.commands:cmd_demo")

    p = sub.add_parser("convert", help="convert a plain ViT checkpoint into an hpvit .safetensors file")
    p.add_argument("src", help="checkpoint path, Hugging Face folder, or timm:<model name>")
    p.add_argument("-o", "--out", required=True, help="output .safetensors path")
    _add_common_model_args(p)
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--validate", action="store_true", help="check the identity config against the source's own library")
    p.add_argument("--reparameterize", action="store_true", help="merge avg-pool + conv pairs before saving")
    p.set_defaults(func="hpvit.commands:cmd_convert")

    p = sub.add_parser("info", help="per-stage table: blocks, tokens, window, dim, params, GFLOPs")
    p.add_argument("src", help="plain checkpoint, a file hpvit wrote (classifier, detector, segmenter), or timm:<model name>")
    _add_common_model_args(p, config_default=None)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--similarity", default=None, metavar="IMAGES",
                   help="folder or zip of images: per stage, cosine similarity of the transformed model's output to "
                        "the plain model's output after the same block (and top-1 agreement when both classify)")
    p.add_argument("--max-images", type=int, default=32, help="images used by --similarity (default 32)")
    p.add_argument("--plain", default=None, help="with --similarity: the plain checkpoint to compare with (default: SRC)")
    p.set_defaults(func="hpvit.commands:cmd_info")


def _add_lazy_commands(sub, command: "str | None") -> None:
    """``bench`` defines its arguments in its own (heavy) module: import it only when the command line
    names it (or when the whole parser is wanted, ``command`` None). ``adapt``'s live in tasks/_args.py."""
    from .tasks._args import add_adapt_args

    p = sub.add_parser("adapt", help=ADAPT_HELP)
    add_adapt_args(p)
    p.set_defaults(func="hpvit.tasks.adapt:run")
    p = sub.add_parser("bench", help=BENCH_HELP)
    if command in (None, "bench"):
        try:
            from .bench import add_bench_args, run_bench
        except ModuleNotFoundError as e:
            if e.name != "hpvit.bench":
                raise
        else:
            add_bench_args(p)
            p.set_defaults(func=run_bench)


def _add_task_commands(sub) -> None:
    from .tasks._args import TASKS

    tr = sub.add_parser("train", help="fine-tune a transformed (or plain baseline) model").add_subparsers(dest="task", required=True)
    ev = sub.add_parser("eval", help="evaluate a fine-tuned model").add_subparsers(dest="task", required=True)
    for t in TASKS:
        p = tr.add_parser(t.name, help=t.train_help)
        t.add_train(p)
        p.set_defaults(func=f"{t.module}:run_train")
        p = ev.add_parser(t.name, help=t.eval_help)
        t.add_eval(p)
        p.set_defaults(func=f"{t.module}:run_eval")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write an ONNX file of a model: classifier logits or the 4-level pyramid")
    p.add_argument("model", help="a file hpvit wrote (.safetensors) or a plain ViT checkpoint (converted with --config)")
    p.add_argument("-o", "--out", required=True, help="output .onnx path")
    p.add_argument("--config", default=None, help="preset for a plain checkpoint (default paper-cls)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size for a plain checkpoint")
    p.add_argument("--pyramid", action="store_true", help="export the backbone's pyramid (p1..p4, NCHW) instead of logits")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic")
    p.add_argument("--img-size", type=int, default=224, help="input side the graph is exported for (default 224)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--check", action="store_true", help="run the file with onnxruntime and print the max abs diff to PyTorch")
    p.set_defaults(func="hpvit.export:cmd_export")


def build_parser(argv: "Sequence[str] | None" = None) -> argparse.ArgumentParser:
    """The full ``hpvit`` parser; with ``argv``, ``adapt``/``bench`` arguments are built only when argv names them."""
    parser = argparse.ArgumentParser(prog="hpvit", description="Turn plain ViT checkpoints into hierarchical backbones.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_convert_info(sub)
    _add_export(sub)
    _add_lazy_commands(sub, _command_of(argv))
    _add_task_commands(sub)
    return parser


def resolve_func(func: "Callable | str") -> Callable:
    """A command's function: given directly, or as ``"module:function"`` (imported now)."""
    if callable(func):
        return func
    module, name = func.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        importlib.import_module("hpvit.models.registry")  # what `import hpvit` does outside the CLI (timm names)
        rc = resolve_func(args.func)(args)
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
