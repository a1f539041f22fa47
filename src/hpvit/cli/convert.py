"""``hpvit convert``: a plain ViT checkpoint -> an hpvit .safetensors file (config, spec and reuse report in its
metadata). The arguments are built without importing torch; the command's own imports happen when it runs."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from .common import Steps, add_common_model_args, add_model_positional, add_overwrite_arg, check_output
from .source import build_model


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a plain ViT checkpoint into an hpvit .safetensors file")
    add_model_positional(p, "checkpoint path, Hugging Face folder, or timm:<model name>")
    p.add_argument("-o", "--out", required=True, help="output .safetensors path")
    add_common_model_args(p)
    add_overwrite_arg(p)
    p.add_argument("--validate", action="store_true", help="check the identity config against the source's own library")
    p.add_argument("--reparameterize", action="store_true", help="merge avg-pool + conv pairs before saving")
    p.set_defaults(func="hpvit.cli.convert:cmd_convert")


def _warn_non_finite(state_dict: dict, src: str) -> list[str]:
    """Print a warning naming the tensors of ``src`` that hold NaN or inf values; returns their names."""
    import torch

    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        print(f"hpvit: warning: {len(bad)} tensor(s) of {src} hold NaN or inf values, e.g. {bad[:3]}; the converted "
              "model will output NaN. The source checkpoint is damaged (or diverged in training): use another copy",
              file=sys.stderr)
    return bad


def _file_state(path: Path) -> "tuple[int, int] | None":
    """``(size, mtime_ns)`` of a source file (None for a folder or a hub name): what tells a changed file."""
    if not path.is_file():
        return None
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def cmd_convert(args) -> int:
    src_path = Path(args.model)
    out = check_output(args.out, overwrite=args.overwrite, suffix=".safetensors",
                       why="hpvit writes safetensors + JSON metadata",
                       sources=[(src_path, "the checkpoint being converted")])
    before = _file_state(src_path)
    steps = Steps(4 if args.validate else 3, "convert")
    try:
        model, plain = build_model(args.model, args.config, args.num_classes, args.format, args.spec, steps)
        if plain is None:
            raise ConfigError(f"{args.model} is already an hpvit file; nothing to convert")
        return _finish_convert(args, out, model, plain, steps, src_path, before)
    finally:
        steps.close()


def _finish_convert(args, out: Path, model, plain, steps: Steps, src_path: Path, before: "tuple[int, int] | None") -> int:
    """Report, optionally validate, and write the converted ``model`` (the rest of ``hpvit convert``)."""
    from ..export import save
    from ..verify import validate_identity

    print(plain.summary())  # names the detected format once
    _warn_non_finite(plain.state_dict, args.model)
    print(model.reuse_report().summary())
    if args.validate:
        steps.step("validating the identity config against the source's own library")
        res = validate_identity(args.model, plain=plain)
        print(f"validate: identity config vs {res['library']}: max |diff| {res['max_abs_diff']:.3g}, "
              f"max rel diff {res['max_rel_diff']:.3g} -> {'OK' if res['ok'] else 'MISMATCH'}")
        if not res["ok"]:
            print("hpvit: error: validation failed; nothing was written", file=sys.stderr)
            return 1
    if args.reparameterize:
        model.reparameterize()
    if before is not None and _file_state(src_path) != before:
        raise CheckpointError(f"{src_path} changed while it was being converted (is a copy or download still "
                              f"writing it?); nothing was written to {out}. Run convert again once the file is complete")
    steps.step(f"writing {out}")
    save(model, out, force=args.overwrite)
    print(f"wrote {out} (config {model.config.name}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)")
    return 0
