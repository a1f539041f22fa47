"""One Mask R-CNN training step on real Penn-Fudan images, before and after the small-data RCNN settings
(issue 26), with torchvision's own Mask R-CNN R50-FPN on the same batches as a reference for the heads' cost.

Every row runs in this one process on the same fixed batches (batch 2, longer side 320 with the training
jitter, the first images of ``instances_train.json``), one thread by default: ``--warmup`` untimed steps, then
``--iters`` timed steps of forward + loss + backward + AdamW step; the median is reported. A row is built the
way ``hpvit train det`` builds it (``build_detector`` with the recipe's RCNN settings, ``build_optimizer``).

    python benchmarks/det_step.py                          # plain-det: det-default's heads vs det-small's
    python benchmarks/det_step.py --configs plain-det grid-det paper-det --json benchmarks/results/det_step.json
    python benchmarks/det_step.py --profile                # the top ops of one step per row
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from hpvit.data.coco import CocoInstances, CocoSource, collate_detection
from hpvit.engine.optim import build_optimizer
from hpvit.engine.recipe import load_recipe
from hpvit.models.detector import build_detector

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HPVIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def batches(n: int, img_size: int):
    src = CocoSource(DATA / "pennfudan" / "instances_train.json", DATA / "pennfudan" / "images")
    torch.manual_seed(0)
    ds = CocoInstances(src, list(range(2 * n)), True, img_size)
    out = []
    for i in range(n):
        images, targets = collate_detection([ds[2 * i], ds[2 * i + 1]])
        out.append((images, [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]))
    return out


def build(row: str, config: str, recipe_name: str, img_size: int):
    torch.manual_seed(0)
    recipe = load_recipe(recipe_name).replace(img_size=img_size)
    if row == "torchvision-r50fpn":
        from torchvision.models.detection import maskrcnn_resnet50_fpn
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, min_size=img_size,
                                      max_size=img_size)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)
    model = build_detector(str(DATA / "deit_tiny" / "deit_tiny_patch16_224.pth"), config, 1, img_size,
                           recipe.drop_path, rcnn=recipe.rcnn)
    return model, build_optimizer(model, recipe, recipe.absolute_lr(1))


def time_row(model, opt, data, warmup: int, iters: int, profile: bool):
    model.train()
    times = []
    for k in range(warmup + iters):
        images, targets = data[k % len(data)]
        t = time.perf_counter()
        loss = sum(model(images, targets).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    table = None
    if profile:
        from torch.profiler import profile as prof
        images, targets = data[0]
        with prof() as p:
            sum(model(images, targets).values()).backward()
        table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return times[warmup:], table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["plain-det"])
    ap.add_argument("--recipes", nargs="+", default=["det-default", "det-small"],
                    help="recipes whose RCNN settings are compared (default: before = det-default, after = det-small)")
    ap.add_argument("--no-torchvision", action="store_true", help="skip the torchvision R50-FPN reference row")
    ap.add_argument("--img-size", type=int, default=320)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = batches(4, args.img_size)
    rows = [(f"{c} {r}", c, r) for c in args.configs for r in args.recipes]
    if not args.no_torchvision:
        rows.append(("torchvision-r50fpn", None, "det-default"))
    results = []
    print(f"images per batch: {[tuple(im.shape[-2:]) for im in data[0][0]]} ...; {args.threads} thread(s); "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    for name, config, recipe in rows:
        model, opt = build(name if config is None else "hpvit", config, recipe, args.img_size)
        times, table = time_row(model, opt, data, args.warmup, args.iters, args.profile)
        med = statistics.median(times)
        rcnn = None if config is None else load_recipe(recipe).rcnn
        results.append({"row": name, "config": config, "recipe": recipe, "rcnn": rcnn, "step_s_median": round(med, 3),
                        "step_s": [round(t, 3) for t in times],
                        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)})
        print(f"{name:32s} median {med:.2f} s/step  (steps {', '.join(f'{t:.2f}' for t in times)})", flush=True)
        if table:
            print(table)
        del model, opt
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "img_size": args.img_size, "batch": 2,
                                               "torch": torch.__version__, "rows": results,
                                               "command": "python " + " ".join(sys.argv)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
