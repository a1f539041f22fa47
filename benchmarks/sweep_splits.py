"""Stage-depth sweep behind the efficiency presets: cost and latency of ViT-B transformed with
different blocks-per-stage splits, against timm's ViT-B, timed round-robin in one process.

    /root/venv/bin/python benchmarks/sweep_splits.py --batch 8 --iters 5 --json benchmarks/results/sweep_splits.json

Every split keeps all 12 pre-trained blocks and the four levels 1/4..1/32 (a 0 means the level is the
pooled map without a transformer block); pools are merged (reparameterize) as deployed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch

import hpvit
from hpvit.bench import count_gflops

SPLITS = [(2, 2, 6, 2), (1, 1, 8, 2), (1, 2, 7, 2), (0, 2, 8, 2), (0, 1, 9, 2), (0, 0, 10, 2), (0, 0, 11, 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224").eval()
    sd = vit.state_dict()
    models = {"timm vit_base_patch16_224": vit}
    for s in SPLITS:
        models["hpvit-B " + "-".join(map(str, s))] = hpvit.from_plain(sd, "paper-cls", depths=s).reparameterize().eval()
    for m in models.values():
        m.requires_grad_(False)
    gflops = {k: count_gflops(m, 224, "cpu") for k, m in models.items()}
    x = torch.randn(args.batch, 3, 224, 224)
    times = {k: [] for k in models}
    with torch.no_grad():
        for r in range(args.warmup + args.iters):
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                if r >= args.warmup:
                    times[k].append(time.perf_counter() - t)
            print(f"round {r + 1} done", flush=True)
    ref = statistics.median(times["timm vit_base_patch16_224"])
    rows = []
    print(f"{'model':<28}{'GFLOPs':>8}{'ms':>9}{'img/s':>8}{'lat/ViT':>9}{'GFLOP/s':>9}")
    for k in models:
        lat = statistics.median(times[k])
        rows.append(dict(name=k, gflops=gflops[k], latency_ms=lat * 1e3, img_per_s=args.batch / lat,
                         latency_ratio_vs_vit=lat / ref, achieved_gflops_per_s=gflops[k] * args.batch / lat))
        print(f"{k:<28}{gflops[k]:>8.1f}{lat * 1e3:>9.0f}{args.batch / lat:>8.2f}{lat / ref:>9.2f}{gflops[k] * args.batch / lat:>9.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(batch=args.batch, iters=args.iters, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
