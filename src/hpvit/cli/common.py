"""What every ``hpvit`` command shares: ``KEY=VALUE`` flags, subsets, run flags, recipes, progress steps.

Nothing heavy is imported at module level: building any parser (``--help``) must not import torch.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import re
import sys
import time
from pathlib import Path

from ..config import RECOMMENDED
from ..errors import ConfigError, OutputError

AUTO_RECIPE = "auto"
_SUBSET = re.compile(r"^\s*(\d+)\s*$|^\s*(-?\d*)\s*:\s*(-?\d*)\s*$")
OS_ERRNOS = (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT)
MAX_CLASSES = 100_000  # --num-classes above this is a typo, not a dataset (ImageNet-21k has 21,841 classes)


def parse_key_values(items: "list[str] | None", flag: str = "--set") -> dict:
    """``["a=1", "b=gelu"]`` -> ``{"a": 1, "b": "gelu"}``: values parse as JSON when they can, else stay
    strings. Used by every ``KEY=VALUE`` flag (``--spec``, ``--set``, ``--rcnn``)."""
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


def os_error_message(e: OSError) -> str:
    """``PATH: what happened; what to do`` for the file-system errors a user can fix."""
    what = e.filename or "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}: the disk is full (or over quota); free some space or use another disk, then run again"
    return f"{what}: {e.strerror or 'permission denied'}; check the path's permissions or choose a writable folder"


def config_help(task: str, default: "str | None", what: str = "") -> str:
    """The ``--config`` help of a command, written from the preset registry: the default (None: the recommended
    preset, which a file hpvit wrote replaces by its own stored config), hpvit's grid-* presets, then the rest."""
    from ..config import presets_for

    names = presets_for(task)
    grid = [n for n in names if n.startswith("grid-")]
    rest = [n for n in names if n not in grid]
    shown = default or RECOMMENDED[task]
    note = ", the recommended start" if shown == RECOMMENDED[task] else f"; recommended: {RECOMMENDED[task]}"
    if default is None:
        note += "; a file hpvit wrote uses its own stored config"
    return (f"preset{' ' + what if what else ''} (default {shown}{note}): {', '.join(grid)} (hpvit's own: they start "
            f"at the plain model's function); {', '.join(rest)} (the paper's layouts and the plain baseline); or a JSON "
            "file (docs/cli.md)")


def add_common_model_args(p: argparse.ArgumentParser, config_default: "str | None" = RECOMMENDED["cls"]) -> None:
    p.add_argument("--config", default=config_default, help=config_help("cls", config_default))
    add_format_arg(p)
    p.add_argument("--num-classes", type=class_count, default=None, help="classifier size (default: the source's)")
    add_spec_arg(p)


def class_count(value: str) -> int:
    """argparse type of ``--num-classes``: an integer from 0 (no classifier head) to :data:`MAX_CLASSES`."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number of classes, got {value!r}") from None
    if not 0 <= n <= MAX_CLASSES:
        raise argparse.ArgumentTypeError(f"expects 0 (no classifier head) to {MAX_CLASSES:,} classes, got {value}; "
                                         "give the number of classes of your dataset")
    return n


def add_format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default=None,
                   help="force the checkpoint format (timm, deit, mae, hf, dinov2, clip...) instead of auto-detecting it")


def add_spec_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", action="append", default=[], metavar="KEY=VALUE",
                   help="override what weights cannot show, e.g. --spec act=gelu --spec num_heads=16 (repeatable)")


def add_model_arg(p: argparse.ArgumentParser, help: str, required: bool = True, old: "str | None" = None) -> None:
    """``--model``: the model a command reads (``old``: the flag's old name, still accepted)."""
    p.add_argument("--model", required=required, default=None, metavar="MODEL", help=help)
    if old:
        add_old_names(p, {old: "--model"})


def add_model_positional(p: argparse.ArgumentParser, help: str) -> None:
    """``MODEL`` as the first argument, or ``--model MODEL`` as in every other command (merged by
    :func:`merge_model_args`)."""
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=help)
    p.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                   help="the same as the MODEL argument (the flag every command uses for the model to read)")


def merge_model_args(args, parser: argparse.ArgumentParser) -> None:
    """``MODEL`` or ``--model MODEL`` (exactly one) into ``args.model``."""
    if not hasattr(args, "model_flag"):
        return
    flag = args.__dict__.pop("model_flag")
    if args.model and flag and args.model != flag:
        parser.error(f"the model is given twice ({args.model} and --model {flag}); give one")
    args.model = args.model or flag
    if not args.model:
        parser.error("the following arguments are required: MODEL (or --model MODEL)")


# ---------------------------------------------------------------------------------- subsets
def subset_spec(value: str) -> str:
    """argparse type of ``--train-images`` / ``--eval-images``: ``N`` or ``START:STOP`` (checked, kept as text)."""
    m = _SUBSET.match(value)
    if not m:
        raise argparse.ArgumentTypeError(f"expects a count N or a slice START:STOP (e.g. 1000 or 0:100), got {value!r}")
    if m.group(1) is not None and int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"expects a count >= 1, got {value!r}")
    return value.strip()


class _OldName(argparse.Action):
    """An old spelling of a flag: hidden from ``--help``, still works (it runs the new flag's action) and says
    the new name once on stderr."""

    def __init__(self, option_strings, dest, target: argparse.Action, **kw):
        super().__init__(option_strings, dest, **kw)
        self.target = target

    def __call__(self, parser, namespace, values, option_string=None):
        new = self.target.option_strings[-1]
        if not getattr(self, "_noted", False):
            self._noted = True
            print(f"hpvit: note: {option_string} is the old name of {new}; it still works (see docs/cli.md)",
                  file=sys.stderr)
        self.target(parser, namespace, values, new)


def add_old_names(p: argparse.ArgumentParser, names: "dict[str, str]") -> None:
    """Old flag -> its new flag (already added to ``p``): the old one keeps working, hidden from ``--help``."""
    for old, new in names.items():
        t = p._option_string_actions[new]
        if t.required:  # argparse would not count the old spelling as giving it: main() checks it instead
            t.required = False
            t.help = f"{t.help} (required)"
            p.set_defaults(required_flags=tuple(p.get_default("required_flags") or ()) + (new,))
        p.add_argument(old, action=_OldName, target=t, dest=t.dest, nargs=t.nargs, type=t.type, choices=t.choices,
                       metavar=t.metavar, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_subset_args(p: argparse.ArgumentParser, slices: bool, train: bool = True,
                    aliases: "dict[str, str] | None" = None) -> None:
    """``--train-images`` (when ``train``) and ``--eval-images``; ``aliases`` maps old flag -> new flag.

    Subsets share one naming scheme across tasks: a count ``N`` (classification: a fixed class-balanced
    subset of N images; detection and segmentation: the first N images) or, for detection and
    segmentation, a slice ``START:STOP`` of the images in their listed order."""
    what = ("N (the first N images) or START:STOP (a slice, images in listed order)" if slices
            else "N: a fixed class-balanced subset of N images")
    metavar = "N|A:B" if slices else "N"
    if train:
        p.add_argument("--train-images", type=subset_spec, default=None, metavar=metavar,
                       help=f"train on a subset: {what} (default: all)")
    p.add_argument("--eval-images", type=subset_spec, default=None, metavar=metavar,
                   help=f"evaluate on a subset: {what} (default: all)")
    add_old_names(p, aliases or {})


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--device``, worded the same in every command that runs a model."""
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's choice)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu); "
                                                   "anything else, or cuda without a GPU, is an error")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_output(out: "str | Path", *, overwrite: bool, suffix: str, why: str,
                 sources: "list[tuple[str | Path | None, str]]" = ()) -> Path:
    """The one rule for the file ``convert``, ``export`` and ``demo`` write, checked before anything is read: it
    ends in ``suffix`` (``why`` says why), it is none of the ``(path, what)`` ``sources`` the command reads (not
    even with ``--overwrite``: that would destroy the input), and an existing file is replaced only with
    ``--overwrite``."""
    out = Path(out)
    if out.suffix.lower() != suffix:
        raise ConfigError(f"output {out} must end in {suffix} ({why}); choose e.g. -o {out.with_suffix(suffix).name}")
    for src, what in sources:
        if src and _same_file(out, Path(src)):
            raise OutputError(f"-o {out} is {what} ({src}); writing there would destroy it, even with --overwrite. "
                              "Choose another output path")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists; refusing to overwrite it (add --overwrite to replace it, or choose another path)")
    return out


def add_overwrite_arg(p: argparse.ArgumentParser, what: str = "OUT", help: "str | None" = None) -> None:
    """The one overwrite flag (``--overwrite``; ``--force`` is its old name); ``help`` replaces the usual text."""
    p.add_argument("--overwrite", action="store_true",
                   help=help or f"replace {what} if it exists; without it nothing already there is ever replaced")
    add_old_names(p, {"--force": "--overwrite"})


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    """The training schedule flags every training command (train cls|det|seg, adapt) accepts; each one, when
    given, replaces the recipe key of the same meaning (``--set KEY=VALUE`` reaches every other key)."""
    p.add_argument("--epochs", type=int, default=None, help="training epochs (recipe key epochs)")
    p.add_argument("--img-size", type=int, default=None, help="training input side in pixels (recipe key img_size)")
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size (recipe key batch_size)")
    p.add_argument("--accum-steps", type=int, default=None, help="gradient accumulation steps (recipe key accum_steps)")
    p.add_argument("--blr", type=float, default=None, help="base learning rate: lr = blr * global batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute learning rate (overrides --blr)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up length in epochs (may be fractional)")
    p.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise lr decay in (0, 1]: the deeper a block, the closer its lr to the full lr")
    p.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate of the deepest block")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None, help="mixed precision (default: the recipe's)")
    p.add_argument("--ema", action="store_true", default=None, help="keep an EMA of the weights (evaluated too)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass (less memory, slower)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (at most the usable cores)")
    p.add_argument("--seed", type=int, default=None, help="random seed (recipe key seed)")
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic algorithms only")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="evaluate every N epochs (and after the last one)")
    p.add_argument("--ckpt-every-steps", type=int, default=None, metavar="N",
                   help="also save a resumable checkpoint every N optimizer steps (default: at each epoch's end)")


def schedule_flags(args) -> dict:
    """Recipe keys of :func:`add_schedule_args`'s flags (None: not given, the recipe's value stays)."""
    return {"epochs": args.epochs, "img_size": args.img_size, "batch_size": args.batch_size,
            "accum_steps": args.accum_steps, "blr": args.blr, "lr": args.lr, "warmup_epochs": args.warmup_epochs,
            "layer_decay": args.layer_decay, "drop_path": args.drop_path, "amp": args.amp, "ema": args.ema,
            "grad_checkpointing": args.grad_checkpointing, "num_workers": args.workers, "seed": args.seed,
            "deterministic": args.deterministic, "eval_every_epochs": args.eval_every,
            "ckpt_every_steps": args.ckpt_every_steps}


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Flags every training command shares (schedule, threads, device, resume/overwrite, bad images)."""
    add_schedule_args(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key (repeatable)")
    add_device_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_overwrite_arg(p, "the run already in --out (finished or not)")
    p.add_argument("--keep-checkpoint", action=argparse.BooleanOptionalAction, default=True,
                   help="keep OUT/checkpoint-last.pt (optimizer state, as large as 3x the model) once the run is "
                        "finished (default); --no-keep-checkpoint deletes it then")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out training images that cannot be decoded and list them in OUT/skipped-images.txt "
                        "(default: such an image is an error naming the file)")


def check_device_flags(args) -> None:
    """``--threads`` and ``--device`` checked before anything is read (a negative thread count or a GPU that is not
    there would otherwise end in a traceback, ``--device gpu`` silently on the CPU)."""
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 0:
        raise ConfigError(f"--threads {threads}: give a thread count >= 1 (0, or no --threads: torch's choice)")
    if getattr(args, "device", None) is not None:
        from ..engine.distributed import check_device

        check_device(args.device)


def check_names(args) -> None:
    """``--config`` / ``--recipe`` checked before anything is read: an unknown name is an error at once, with
    the closest known name. The device flags are checked here too (:func:`check_device_flags`)."""
    check_device_flags(args)
    for flag, kind in (("config", "config preset"), ("recipe", "recipe")):
        value = getattr(args, flag, None)
        if not isinstance(value, str) or value == AUTO_RECIPE or value.endswith(".json") or Path(value).exists():
            continue
        if flag == "config":
            from ..config import list_presets

            names = list_presets()
        else:
            from ..engine.recipe import list_recipes

            names = list_recipes()
        if value not in names:
            close = difflib.get_close_matches(value, names, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"--{flag} {value!r}: unknown {kind}; {hint}choose from {', '.join(names)} "
                              "or pass a JSON file path")


def check_model_path(args) -> None:
    """``--model`` / ``MODEL`` checked before anything is printed or claimed: a path that does not exist is an error
    at once (a ``timm:<name>`` source is fetched by its reader)."""
    model = getattr(args, "model", None)
    if isinstance(model, str) and not model.startswith("timm:") and not Path(model).exists():
        raise ConfigError(f"--model {model}: no such file or folder; give a plain ViT checkpoint (a file, a Hugging "
                          "Face folder or timm:<model name>) or a file or run folder hpvit wrote")


def check_classifier_config(config: "str | None") -> None:
    """``train cls --config grid-seg``: a preset (or JSON config) without a classifier head is an error naming the
    presets a classifier can start from."""
    from ..config import get_config, presets_for

    if config is None:
        return
    cfg = get_config(config)
    if cfg.head == "none":
        raise ConfigError(f"--config {config}: {cfg.name} has no classifier head (it is made for detection or "
                          f"segmentation); train cls takes {', '.join(presets_for('cls'))} or a JSON file of one")


# ---------------------------------------------------------------------------------- running
def recipe_from_flags(name: str, flags: dict, set_items: "list[str] | None"):
    """Recipe ``name`` (or a JSON file) with the command's flags that were given (not None) and every
    ``--set KEY=VALUE`` applied, in that order."""
    from ..engine.recipe import load_recipe

    changes = {k: v for k, v in flags.items() if v is not None}
    changes.update(parse_key_values(set_items, "--set"))
    r = load_recipe(name)
    return r.replace(**changes) if changes else r


def fit_batch(recipe, n_train: int, args):
    """Check, before any image is decoded, that ``n_train`` training images fill one optimizer step.

    When they do not and the batch size came from the recipe, the largest batch that fits is used (with a
    note); a batch size the user chose is an error that names the batch that would fit."""
    import os

    from ..engine.logging import log

    world = max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    per_rank, b, acc = n_train // world, recipe.batch_size, recipe.accum_steps
    if per_rank // b // acc >= 1:
        return recipe
    fits = per_rank // acc
    chosen = args.batch_size is not None or "batch_size" in parse_key_values(args.set, "--set")
    where = f"{n_train} training image{'s' if n_train != 1 else ''}" + (f" over {world} processes" if world > 1 else "")
    if fits < 1:
        raise ConfigError(f"{where} cannot fill one optimizer step even at batch size 1 with accum_steps {acc}; "
                          f"use more images (at least {acc * world})" + (" or lower --accum-steps" if acc > 1 else ""))
    if chosen:
        raise ConfigError(f"{where} do not fill one optimizer step of batch_size {b} x accum_steps {acc}; "
                          f"--batch-size {fits} (or less) would fit, or use more images")
    log(f"note: {where} do not fill one optimizer step of the recipe's batch_size {b} x accum_steps {acc}; "
        f"using batch_size {fits}, the largest that fits (pass --batch-size to choose)")
    return recipe.replace(batch_size=fits)


def run_training(task, recipe, args) -> int:
    """Run ``task`` with the shared engine in the folder ``args.out`` (checked to lie outside the task's data, then
    claimed for this run; ``--overwrite`` and ``--skip-bad-images`` are honoured when the command defines them);
    the command line goes into results.json."""
    from ..engine.identity import check_out_outside_data
    from ..engine.loop import Trainer

    check_out_outside_data(task, args.out)  # before the folder is claimed or the model loads
    run_cfg = {k: v for k, v in vars(args).items() if k != "func"}
    Trainer(task, recipe, args.out, resume=args.resume, device=args.device, run_config=run_cfg,
            overwrite=getattr(args, "overwrite", False), skip_bad_images=getattr(args, "skip_bad_images", False),
            keep_checkpoint=getattr(args, "keep_checkpoint", True)).run()
    return 0


def dense_recipe(args):
    """The recipe ``train det|seg`` runs: ``--recipe`` (name or JSON), then the flags given, then ``--set``."""
    return recipe_from_flags(args.recipe, schedule_flags(args), args.set)


def run_dry_run(args) -> int:
    """``hpvit train det|seg ... --dry-run``: print the resolved schedule; read no data, build no model."""
    import os

    from ..engine.schedule import describe_plan

    world = args.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise ConfigError(f"--nproc must be >= 1, got {world}")
    for line in describe_plan(dense_recipe(args), world, args.dry_run_images):
        print(line)
    return 0


def evaluate_saved(model, ds, evaluator, *, device, batch_size: int, desc: str, workers: int = 0, collate_fn=None,
                   prepare=None, report=None, results_json=None, shown=None, headline: "tuple[str, ...]" = ()) -> int:
    """``hpvit eval cls|det|seg``: run ``evaluator`` over ``ds`` with the saved ``model`` on every process of
    the run (single or torchrun), then, on the main process, add ``eval_time_s`` and ``report(metrics, device)``
    (the command's extra entries, pictures...), write ``results_json`` (when given), print ``shown(metrics)``
    (default: all of them) as JSON on stdout and a one-line summary of the ``headline`` metrics on stderr."""
    from ..engine import distributed as D
    from ..engine.loop import evaluate
    from ..utils import write_text_atomic

    dist = D.init_distributed(device)
    try:
        model.to(dist.device)
        t = time.time()
        m = evaluate(evaluator, model, ds, batch_size, workers, dist, desc=desc, collate_fn=collate_fn, prepare=prepare)
        if dist.is_main:
            m["eval_time_s"] = round(time.time() - t, 2)
            if report is not None:
                m.update(report(m, dist.device))
            if results_json is not None:
                write_text_atomic(results_json, json.dumps(m, indent=2))
            print(json.dumps(shown(m) if shown else m, indent=2))
            print(eval_summary(m, headline, desc, len(ds), results_json), file=sys.stderr, flush=True)
    finally:
        D.cleanup(dist)
    return 0


def _written_by_eval(path: Path) -> bool:
    """Whether ``path`` is a metrics file ``hpvit eval`` wrote (a JSON object with ``eval_time_s`` and no training
    keys: a training run's results.json has ``epochs`` and ``steps``)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "eval_time_s" in d and not {"epochs", "steps"} & d.keys()


def eval_overwrite_help(flag: str) -> str:
    return (f"replace files in {flag} that hpvit eval did not write; without it only an earlier eval's outputs are "
            "replaced. A training run's files are never replaced")


def check_eval_outputs(files: "list[Path]", overwrite: bool, flag: str) -> None:
    """Before ``hpvit eval`` loads anything: refuse to write its ``files`` (the metrics JSON first) where they would
    replace something it did not write. A training run's own files (results.json, metrics.jsonl... or anything
    already in a run folder) are never replaced, even with ``--overwrite``; another existing file only with it. The
    outputs of an earlier ``hpvit eval`` (recognised by its metrics JSON) are replaced: evaluating again is safe."""
    from ..engine.loop import RECIPE_FILE
    from ..engine.rundir import LOCK_NAME, RUN_FILES
    from ..errors import OutputError

    files = [Path(f) for f in files]
    again = files[0].is_file() and _written_by_eval(files[0])
    for f in files:
        run = [n for n in (RECIPE_FILE, *RUN_FILES, LOCK_NAME) if (f.parent / n).exists()]
        if run and (f.name in (RECIPE_FILE, *RUN_FILES) or (f.exists() and not again)):
            given, other = (f, f.parent / "eval" / f.name) if flag == "--json" else (f.parent, f.parent / "eval")
            raise OutputError(f"{flag} {given}: {f.parent} is a training run's folder (it holds {', '.join(run[:3])}) "
                              f"and hpvit eval would replace its {f.name}; a run's files are never replaced by eval. "
                              f"Choose another {flag} (e.g. {other})")
    there = [f for f in files if f.exists()]
    if there and not again and not overwrite:
        raise OutputError(f"{there[0]} exists and was not written by hpvit eval; refusing to replace it. Pass "
                          f"--overwrite to replace it, or choose another {flag}")


def eval_summary(m: dict, headline: "tuple[str, ...]", desc: str, n: int, results_json=None) -> str:
    """``eval: top1 75.0%, top5 92.1% (evaluating val, 500 images, 12.3s; all metrics above [and in FILE])``."""
    units = m.get("metric_units") or {}
    parts = [f"{k} {m[k]:.4g}{'%' if str(units.get(k, '')).startswith('%') else ''}" for k in headline
             if isinstance(m.get(k), (int, float))]
    where = f"; also in {results_json}" if results_json else ""
    return (f"hpvit eval: {', '.join(parts) or 'done'} ({desc}, {n} images, {m.get('eval_time_s', 0):.1f}s; "
            f"all metrics in the JSON above{where})")


def eval_out_dir(model: str, out: "str | None") -> Path:
    """``--out`` if given, else ``eval/`` next to the model (its run directory, or the file's folder)."""
    if out:
        return Path(out)
    mp = Path(model)
    return (mp if mp.is_dir() else mp.parent) / "eval"


class Steps:
    """Numbered steps of a long command on stderr: a tqdm bar on a terminal, else one log line per step."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.bar = total, desc, 0, None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False,
                            bar_format="{desc}: {n}/{total} {postfix} [{elapsed}]")

    def step(self, what: str) -> None:
        """Mark the previous step done and announce ``what`` (the next one)."""
        if self.bar is not None:
            if self.n:
                self.bar.update(1)
            self.bar.set_postfix_str(what)
        else:
            print(f"[hpvit {time.strftime('%H:%M:%S')}] {self.desc} {self.n + 1}/{self.total}: {what}", file=sys.stderr,
                  flush=True)
        self.n += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.total - self.bar.n)
            self.bar.close()
