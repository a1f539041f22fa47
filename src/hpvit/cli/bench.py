"""``hpvit bench``: speed and memory against timm's ViT, Hiera and Swin (see :mod:`hpvit.bench`)."""

from __future__ import annotations

import argparse
import json

from .common import add_old_names

HELP = "speed / memory benchmark against timm ViT, Hiera and Swin"


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="base",
                   help="comma-separated model names or groups (base, small, tiny, all); default: base. "
                        "hpvit models are hpvit-{T,S,B}/VARIANT (--list shows them all)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to time the models (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and inputs dtype (default fp32)")
    p.add_argument("--batch", default="8", help="comma-separated batch sizes, e.g. 1,8 (default 8)")
    p.add_argument("--img-size", type=int, default=224, help="input side in pixels (default 224)")
    p.add_argument("--warmup", type=int, default=2, help="discarded round-robin rounds")
    p.add_argument("--iters", type=int, default=7, help="measured round-robin rounds (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-modes", default="infer,train,train_ckpt", metavar="MODES",
                   help="which peak memories to measure, comma-separated from infer, train, train_ckpt (default: all "
                        "three; each is one fresh process per model and batch)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny models (unless --models is given), batch 1, 1+2 rounds")
    p.add_argument("-o", "--out", dest="json", default=None, metavar="FILE.json", help="write the results here (JSON)")
    add_old_names(p, {"--json": "--out"})  # --out, the flag every command writes with; --json, its old name
    p.add_argument("--plot", default=None, help="write a PNG of cost against throughput here")
    p.add_argument("--list", action="store_true", help="list the model names of the groups and exit")


def run_bench(args: argparse.Namespace) -> int:
    from ..bench import benchmark, format_table, group_models, plot, resolve_models
    from ..utils import write_text_atomic

    if args.list:
        for g in ("tiny", "small", "base"):
            print(f"{g}: " + ", ".join(group_models(g)))
        return 0
    from ..bench import MEMORY_MODES
    from ..errors import ConfigError

    modes = tuple(m.strip() for m in args.memory_modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MEMORY_MODES]
    if bad or not modes:
        raise ConfigError(f"--memory-modes {args.memory_modes!r}: choose from {', '.join(MEMORY_MODES)} (comma-separated)")
    result = benchmark(
        models=resolve_models("hpvit-T/paper-cls,vit_tiny_patch16_224" if args.quick and args.models == "base" else args.models),
        device=args.device, dtype=args.dtype,
        batches=[1] if args.quick and args.batch == "8" else [int(b) for b in args.batch.split(",")],
        img=args.img_size, warmup=1 if args.quick else args.warmup, iters=2 if args.quick else args.iters,
        threads=args.threads, memory=not args.no_memory, compile=args.compile, log=lambda s: print(s, flush=True),
        memory_modes=modes,
    )
    print()
    print(format_table(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
