"""Every preset at initialisation (issue 19): how close it starts to the plain DeiT-Tiny, before any training.

    python experiments/grid_init.py [--json experiments/results/grid_init.json]

Per row, on the 100-image ImageNet sample: top-1, agreement with the plain model's class, and the cosine
similarity of each stage's output to the plain model's tokens after the same block (the numbers
``hpvit info SRC --config C --similarity IMAGES`` prints; the plain model sees the unshifted image, so a
grid model that equals it on the 2-px-shifted image scores below 1 there). 224 px for every preset and
design choice; 112 px (the CIFAR-10 study's size) for the choice of the surviving phase. Same
preprocessing as experiments/imagenet_sample_top1.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import hpvit
from hpvit.analysis import similarity_to_plain

from imagenet_sample_top1 import DATA, load_sample, top1

DEIT = DATA / "deit_tiny" / "deit_tiny_patch16_224.pth"
PRESETS = ["paper-cls", "fast-cls", "lite-cls", "paper-det", "paper-seg",
           "grid-cls", "grid-fast-cls", "grid-lite-cls", "grid-det", "grid-seg"]
CHOICES: dict[str, tuple[str, dict]] = {
    "grid-cls, sub_phase=0 (6-px shift)": ("grid-cls", dict(sub_phase=0)),
    "grid-cls, sub_phase=2 (-2 px)": ("grid-cls", dict(sub_phase=2)),
    "grid-cls, sub_phase=3 (-6 px)": ("grid-cls", dict(sub_phase=3)),
    "grid-cls, prefix_merge=mean": ("grid-cls", dict(prefix_merge="mean")),
    "grid-cls, 7x7 local windows instead of phases": ("grid-cls", dict(attention="window", window_sizes=(7, 7, None, None))),
    "grid-cls, avg+conv pools instead of the subsample": ("grid-cls", dict(pools=("avgconv",) * 3)),
    "grid-cls, no blocks at 1/32 (0-0-12-0)": ("grid-cls", dict(depths=(0, 0, 12, 0))),
    "grid-cls, class token dropped (avg head)": ("grid-cls", dict(class_token="drop", head="avg")),
}
AT_112 = ["grid-cls", "grid-lite-cls", "grid-cls, sub_phase=0 (6-px shift)", "grid-cls, sub_phase=2 (-2 px)",
          "grid-cls, sub_phase=3 (-6 px)", "grid-cls, no blocks at 1/32 (0-0-12-0)"]


def build(row: str):
    cfg, over = CHOICES.get(row, (row, {}))
    return hpvit.from_plain(str(DEIT), config=cfg, **over)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    plain = hpvit.from_plain(str(DEIT), config="identity")
    out: dict = {}
    for size, rows in ((224, PRESETS + list(CHOICES)), (112, AT_112)):
        x, y = load_sample(size)
        res = out.setdefault(str(size), {"plain (identity)": {"top1": round(top1(plain, x, y), 1)}})
        print(f"\n{size} px, {len(y)} images; plain top-1 {res['plain (identity)']['top1']}%\n"
              "| row | stage 1 | stage 2 | stage 3 | stage 4 | same class as plain (%) | top-1 (%) |\n|---|---|---|---|---|---|---|")
        for row in rows:
            t = time.time()
            m = build(row).eval()
            stages, extra = similarity_to_plain(m, plain, x)
            acc = round(top1(m, x, y), 1) if m.num_classes else None
            res[row] = {"cosine": [round(r.cosine, 3) for r in stages], "agree1": extra.get("agree1"), "top1": acc}
            cos = " | ".join(f"{r.cosine:.2f}" for r in stages)
            agree = "-" if extra.get("agree1") is None else f"{extra['agree1']:.0f}"
            print(f"| {row} | {cos} | {agree} | {'-' if acc is None else f'{acc:.0f}'} |  ({time.time() - t:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
