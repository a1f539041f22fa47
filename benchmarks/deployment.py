"""The deployment tables (issue 22 item 3): what a user deploying a model needs, each table from one run.

1. ``table``: latency at batch 1, throughput at batch 8 and 32, peak inference memory, for timm's ViT /
   Hiera / Swin and the hpvit presets (random init, no download), all timed round-robin in ONE
   ``hpvit.bench.benchmark`` run (medians; peak memory in fresh processes).
2. ``sizes``: how the cost of the dense backbones (``paper-det``, ``grid-det``, ``plain-det``: forward -> the 4 maps
   Mask R-CNN / UperNet read) grows with the image side (224, 384, 512, 1024 px): GFLOPs, batch-1 latency,
   peak inference memory; one benchmark run per size (the backbones round-robin within it), and a plot.

    PYTHONPATH=src python benchmarks/deployment.py table --threads 2 \
        --json benchmarks/results/deployment_table.json
    PYTHONPATH=src python benchmarks/deployment.py sizes --threads 2 \
        --json benchmarks/results/deployment_sizes.json --plot benchmarks/results/deployment_sizes.png

``--size T|S|B`` picks the ViT size of every row (B by default); ``--quick`` runs 1 warm-up + 2 rounds.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hpvit.bench import SIZES, TIMM_FAMILY, benchmark  # noqa: E402
from hpvit.utils import atomic_write, write_text_atomic  # noqa: E402

TABLE_VARIANTS = ("paper-cls", "fast-cls", "lite-cls", "grid-cls", "grid-lite-cls")
SWEEP_VARIANTS = ("paper-det", "grid-det", "plain-det")


def table_models(size: str) -> list[str]:
    word = SIZES[size]
    return [TIMM_FAMILY[f].format(size=word) for f in ("vit", "hiera", "swin")] + [f"hpvit-{size}/{v}" for v in TABLE_VARIANTS]


def format_deployment(result: dict[str, Any], command: str) -> str:
    """Markdown: one row per model, batch-1 latency, batch-8/32 throughput, inference memory per batch."""
    by = {}
    for r in result["models"]:
        by.setdefault(r["name"], {})[r["batch"]] = r
    batches = sorted({r["batch"] for r in result["models"]})
    head = ["model", "params (M)", "GFLOPs"]
    head += [f"latency b{b} (ms)" for b in batches if b == 1] + [f"img/s b{b}" for b in batches if b > 1]
    head += [f"peak infer mem b{b} (MB)" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for name, rows in by.items():
        any_row = next(iter(rows.values()))
        cells = [name, f(any_row["params_m"], ".1f"), f(any_row["gflops"], ".1f")]
        cells += [f(rows[b]["latency_ms"], ".0f") for b in batches if b == 1]
        cells += [f(rows[b]["img_per_s"], ".2f") for b in batches if b > 1]
        cells += [f(rows[b].get("peak_mem_infer_mb"), ".0f") for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{result['device']}, {result['dtype']}, {result['img_size']} px, {result['threads']} threads, "
                 f"{result['iters']} rounds (medians), torch {result['torch']}; large-GEMM ceiling "
                 f"{result['matmul_gflops_per_s']:.0f} GFLOP/s. Command: `{command}`")
    return "\n".join(lines)


def format_sizes(sweep: list[dict[str, Any]], command: str) -> str:
    lines = ["| backbone | image (px) | GFLOPs | latency b1 (ms) | GFLOP/s | peak infer mem (MB) |", "|---|---|---|---|---|---|"]
    for res in sweep:
        for r in res["models"]:
            mem = r.get("peak_mem_infer_mb")
            lines.append(f"| {r['name']} | {res['img_size']} | {r['gflops']:.1f} | {r['latency_ms']:.0f} | "
                         f"{r['achieved_gflops_per_s']:.0f} | {'-' if mem is None else format(mem, '.0f')} |")
    r0 = sweep[0]
    lines.append(f"\n{r0['device']}, {r0['dtype']}, batch 1, {r0['threads']} threads, {r0['iters']} rounds (medians) per "
                 f"size, torch {r0['torch']}. Command: `{command}`")
    return "\n".join(lines)


def plot_sizes(sweep: list[dict[str, Any]], path: str, title: str) -> None:
    names = [r["name"] for r in sweep[0]["models"]]
    sizes = [res["img_size"] for res in sweep]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    keys = (("gflops", "GFLOPs / image"), ("latency_ms", "latency, batch 1 (ms)"), ("peak_mem_infer_mb", "peak inference memory (MB)"))
    for ax, (key, label) in zip(axes, keys):
        for name in names:
            ys = [next(r for r in res["models"] if r["name"] == name).get(key) for res in sweep]
            pts = [(s, y) for s, y in zip(sizes, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name.replace("hpvit-", ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_xlabel("image side (px)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", color="gray")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"), force=True)
    plt.close(fig)


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["table", "sizes"])
    ap.add_argument("--size", default="B", choices=sorted(SIZES))
    ap.add_argument("--models", default=None, help="comma-separated, instead of the default rows")
    ap.add_argument("--batch", default="1,8,32", help="table: batch sizes (default 1,8,32)")
    ap.add_argument("--img-sizes", default="224,384,512,1024", help="sizes: image sides")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 measured rounds")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None, help="write the markdown table here")
    ap.add_argument("--plot", default=None, help="sizes: write the PNG here")
    args = ap.parse_args()
    warmup, iters = (1, 2) if args.quick else (args.warmup, args.iters)
    command = "PYTHONPATH=src python benchmarks/deployment.py " + " ".join(sys.argv[1:])
    common = dict(device=args.device, dtype=args.dtype, warmup=warmup, iters=iters, threads=args.threads,
                  memory=not args.no_memory, memory_modes=("infer",), log=lambda s: print(s, flush=True))
    if args.what == "table":
        models = args.models.split(",") if args.models else table_models(args.size)
        res = benchmark(models=models, batches=[int(b) for b in args.batch.split(",")], img=224, **common)
        md = format_deployment(res, command)
        out: Any = res
    else:
        models = args.models.split(",") if args.models else [f"hpvit-{args.size}/{v}" for v in SWEEP_VARIANTS]
        out = [benchmark(models=models, batches=[1], img=int(s), **common) for s in args.img_sizes.split(",")]
        md = format_sizes(out, command)
        if args.plot:
            plot_sizes(out, args.plot, f"dense backbones (ViT-{args.size}, random init): cost vs image side "
                                       f"({out[0]['device']}, {out[0]['dtype']}, {out[0]['threads']} threads, batch 1)")
            print(f"wrote {args.plot}")
    print()
    print(md)
    if args.json:
        write_text_atomic(args.json, json.dumps(dict(command=command, result=out), indent=1))
        print(f"wrote {args.json}")
    if args.md:
        write_text_atomic(args.md, md + "\n")


if __name__ == "__main__":
    main()
