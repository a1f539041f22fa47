"""The ``hpvit`` command line: one parser, one error policy.

Every command names the function that runs it as ``"module:function"``, imported only after parsing, so
``hpvit --help`` and every ``hpvit <command> --help`` answer without importing torch.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from typing import Callable, Sequence

from ..errors import HPViTError
from . import adapt, bench, cls, convert, demo, det, export, info, predict, seg
from .common import OS_ERRNOS, check_model_path, check_names, merge_model_args, os_error_message

TASKS = (("cls", cls), ("det", det), ("seg", seg))


class Parser(argparse.ArgumentParser):
    """The parser of every ``hpvit`` command: flags are never abbreviated (``--epoch`` is not ``--epochs``), and an
    unknown flag is answered with the closest flag the command has."""

    _HINTS = "_hpvit_did_you_mean"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        flags = [s for s, a in self._option_string_actions.items() if s.startswith("--") and a.help != argparse.SUPPRESS]
        hints = dict(getattr(ns, self._HINTS, {}))  # a subcommand's parser answers first: it knows the flags
        for tok in extras:
            if tok.startswith("--") and tok not in hints:
                close = difflib.get_close_matches(tok.split("=", 1)[0], flags, n=1, cutoff=0.6)
                if close:
                    hints[tok] = close[0]
        setattr(ns, self._HINTS, hints)
        return ns, extras

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        hints = ns.__dict__.pop(self._HINTS, {})
        if extras:
            tips = "; ".join(f"did you mean {hints[t]} (not {t})?" for t in extras if t in hints)
            self.error(f"unrecognized arguments: {' '.join(extras)}" + (f"; {tips}" if tips else ""))
        return ns


def build_parser(argv: "Sequence[str] | None" = None) -> argparse.ArgumentParser:
    """The full ``hpvit`` parser (``argv`` is accepted for compatibility; every parser is cheap to build)."""
    parser = Parser(prog="hpvit", description="Turn plain ViT checkpoints into hierarchical backbones.")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in (demo, convert, info, export):
        mod.add_parser(sub)
    adapt.add_adapt_args(sub.add_parser("adapt", help=adapt.HELP))
    p = sub.add_parser("bench", help=bench.HELP)
    bench.add_bench_args(p)
    p.set_defaults(func="hpvit.cli.bench:run_bench")
    tr = sub.add_parser("train", help="fine-tune a transformed (or plain baseline) model").add_subparsers(dest="task", required=True)
    ev = sub.add_parser("eval", help="evaluate a fine-tuned model").add_subparsers(dest="task", required=True)
    predict.add_predict_args(sub.add_parser("predict", help=predict.HELP))
    for name, mod in TASKS:
        p = tr.add_parser(name, help=mod.TRAIN_HELP)
        getattr(mod, f"add_{name}_train_args")(p)
        p.set_defaults(func=f"hpvit.cli.{name}:run_train")
        p = ev.add_parser(name, help=mod.EVAL_HELP)
        getattr(mod, f"add_{name}_eval_args")(p)
        p.set_defaults(func=f"hpvit.cli.{name}:run_eval")
    return parser


def resolve_func(func: "Callable | str") -> Callable:
    """A command's function: given directly, or as ``"module:function"`` (imported now)."""
    if callable(func):
        return func
    module, name = func.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: "list[str] | None" = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    merge_model_args(args, parser)
    missing = [f for f in getattr(args, "required_flags", ()) if getattr(args, f[2:].replace("-", "_")) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if not getattr(args, "dry_run", False):
        missing = [f for f in getattr(args, "required_unless_dry_run", ()) if getattr(args, f[2:].replace("-", "_")) is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)} (or --dry-run)")
    elif hasattr(args, "required_unless_dry_run"):
        args.func = "hpvit.cli.common:run_dry_run"
    try:
        check_names(args)  # a wrong --config / --recipe is an error before any file is read
        check_model_path(args)  # so is a --model that does not exist
        if not getattr(args, "torch_free", False):  # predict on an .onnx file runs without torch
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
