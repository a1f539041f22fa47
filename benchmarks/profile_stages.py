"""Where the time goes: per-stage wall time and FLOP share of a transformed ViT, and the top aten
ops, next to timm's ViT-B.

    PYTHONPATH=src python benchmarks/profile_stages.py --config lite-cls --batch 8 --ops
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import hpvit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="paper-cls")
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--ops", action="store_true", help="also print the torch.profiler op table")
    args = ap.parse_args()
    sd = timm.create_model(args.model).state_dict()
    m = hpvit.from_plain(sd, args.config).reparameterize().eval().requires_grad_(False)
    x = torch.randn(args.batch, 3, 224, 224)
    parts = ["embed"] + [f"stage{s + 1}" for s in range(m.layout.num_stages)] + ["head"]

    def run(rec):
        t = time.perf_counter()
        y, pre = m.embed(x), None
        rec("embed", t)
        for s in range(m.layout.num_stages):
            t = time.perf_counter()
            y, pre = m._run_stage(y, s, pre)
            rec(f"stage{s + 1}", t)
        t = time.perf_counter()
        m.forward_head(m._final(y, pre))
        rec("head", t)

    times = {p: [] for p in parts}
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            flops = {}
            run(lambda p, t: flops.__setitem__(p, fc.get_total_flops() - sum(flops.values())))
        for _ in range(args.iters + 1):
            run(lambda p, t: times[p].append(time.perf_counter() - t))
    total_t = sum(statistics.median(v[1:]) for v in times.values())
    total_f = sum(flops.values())
    print(f"{args.model} -> {args.config}, batch {args.batch}, depths {m.layout.depths}")
    print(f"{'part':<8}{'ms':>9}{'time %':>8}{'GFLOP':>9}{'FLOP %':>8}{'GFLOP/s':>9}")
    for p in parts:
        t = statistics.median(times[p][1:])
        print(f"{p:<8}{t * 1e3:>9.0f}{100 * t / total_t:>8.1f}{flops[p] / 1e9:>9.1f}{100 * flops[p] / total_f:>8.1f}{flops[p] / 1e9 / t:>9.0f}")
    if args.ops:
        with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
            m(x)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
