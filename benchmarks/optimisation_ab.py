"""Before/after of the layer-level inference shortcuts (issue 22), in ONE process, round-robin.

Each hpvit model runs twice per round: as shipped, and with the shortcuts switched off (the NCHW patch
convolution, the padded-copy pools, the position embedding resampled on every call: the formulation
before issue 22, kept in the code for graph export). timm's ViT-B runs in the same rounds as the yardstick.
Reports wall-clock medians and, per process, CPU-time minima (steadier on a loaded machine with 1 thread).

    PYTHONPATH=src python benchmarks/optimisation_ab.py --threads 2 --batch 8 --rounds 7 \
        --json benchmarks/results/optimisation_ab.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import timm
import torch

import hpvit
import hpvit.layers.pooling as pooling
import hpvit.models.hierarchical as hierarchical
from hpvit.layers import PatchEmbed


@contextlib.contextmanager
def unoptimised():
    saved = PatchEmbed.forward, pooling.is_graph_capture, hierarchical.is_graph_capture
    PatchEmbed.forward = PatchEmbed.reference
    pooling.is_graph_capture = hierarchical.is_graph_capture = lambda: True
    try:
        yield
    finally:
        PatchEmbed.forward, pooling.is_graph_capture, hierarchical.is_graph_capture = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="lite-cls,grid-lite-cls,paper-cls")
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vit = timm.create_model(args.model).eval().requires_grad_(False)
    sd = vit.state_dict()
    work = {args.model: (vit, contextlib.nullcontext)}
    for cfg in args.configs.split(","):
        m = hpvit.from_plain(sd, cfg).reparameterize().eval().requires_grad_(False)
        work[cfg] = (m, contextlib.nullcontext)
        work[f"{cfg} (before)"] = (m, unoptimised)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    wall = {k: [] for k in work}
    cpu = {k: [] for k in work}
    with torch.no_grad():
        for r in range(args.warmup + args.rounds):
            for k, (m, ctx) in work.items():
                with ctx():
                    t0, c0 = time.perf_counter(), time.process_time()
                    m(x)
                    t1, c1 = time.perf_counter(), time.process_time()
                if r >= args.warmup:
                    wall[k].append(t1 - t0)
                    cpu[k].append(c1 - c0)
            print(f"round {r + 1}: " + ", ".join(f"{k}={wall[k][-1] * 1e3:.0f}ms" for k in work if wall[k]), flush=True)
    ref = args.model
    rows = []
    print(f"\nbatch {args.batch}, {args.img_size} px, {args.threads} threads, {args.rounds} rounds")
    print(f"{'model':<22}{'wall ms':>9}{'/ ViT':>7}{'cpu ms':>9}{'/ ViT':>7}")
    for k in work:
        w, c = statistics.median(wall[k]), min(cpu[k])
        rw, rc = w / statistics.median(wall[ref]), c / min(cpu[ref])
        rows.append(dict(name=k, wall_ms_median=w * 1e3, cpu_ms_min=c * 1e3, wall_ratio_to_vit=rw, cpu_ratio_to_vit=rc,
                         wall_ms_all=[t * 1e3 for t in wall[k]]))
        print(f"{k:<22}{w * 1e3:>9.0f}{rw:>7.3f}{c * 1e3:>9.0f}{rc:>7.3f}")
    if args.json:
        res = dict(batch=args.batch, img_size=args.img_size, threads=args.threads, rounds=args.rounds,
                   torch=torch.__version__, note="measured on a shared, loaded machine unless stated", rows=rows)
        hpvit.utils.write_text_atomic(args.json, json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
