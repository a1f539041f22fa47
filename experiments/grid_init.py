"""The grid-* presets at initialisation (issue 19): top-1 on the 100-image ImageNet sample and agreement
with the plain DeiT-Tiny, before any training, per preset and per design choice.

    python experiments/grid_init.py [--img-size 224 112] [--json experiments/results/grid_init.json]

Rows: the plain model, ``paper-cls``, the three ``grid-*`` classification splits, and the choices the
study must make (which phase the subsample pools keep, ``sub_phase``; merging the class-token copies by
``keep`` or ``mean``; the 1/32 stage). Same preprocessing as experiments/imagenet_sample_top1.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import hpvit

from imagenet_sample_top1 import DATA, load_sample

DEIT = DATA / "deit_tiny" / "deit_tiny_patch16_224.pth"
ROWS: dict[str, tuple[str, dict]] = {
    "plain (identity)": ("identity", {}),
    "paper-cls": ("paper-cls", {}),
    "grid-cls": ("grid-cls", {}),
    "grid-fast-cls": ("grid-fast-cls", {}),
    "grid-lite-cls": ("grid-lite-cls", {}),
    "grid-cls, sub_phase=1": ("grid-cls", dict(sub_phase=1)),
    "grid-cls, sub_phase=2": ("grid-cls", dict(sub_phase=2)),
    "grid-cls, sub_phase=3": ("grid-cls", dict(sub_phase=3)),
    "grid-lite-cls, sub_phase=1": ("grid-lite-cls", dict(sub_phase=1)),
    "grid-lite-cls, sub_phase=2": ("grid-lite-cls", dict(sub_phase=2)),
    "grid-cls, prefix_merge=mean": ("grid-cls", dict(prefix_merge="mean")),
    "grid-cls, no 1/32 stage (2-2-8, 3 stages)": ("grid-cls", dict(depths=(2, 2, 8), num_stages=3,
                                                                   window_sizes=(None,) * 3, pools=("subconv",) * 2)),
}


@torch.no_grad()
def predict(model, x: torch.Tensor, batch: int = 25) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i: i + batch]) for i in range(0, len(x), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, nargs="+", default=[224, 112])
    ap.add_argument("--rows", nargs="+", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    plain_src = hpvit.load_plain(str(DEIT))
    out: dict = {}
    for size in args.img_size:
        x, y = load_sample(size)
        ref = None
        print(f"\n{size} px, {len(y)} images\n| row | top-1 % | same class as plain % | s |\n|---|---|---|---|")
        for row in args.rows or ROWS:
            cfg, over = ROWS[row]
            t = time.time()
            logits = predict(hpvit.from_plain(plain_src, config=cfg, **over), x)
            ref = logits if ref is None else ref
            top1 = 100.0 * (logits.argmax(-1) == y).float().mean().item()
            agree = 100.0 * (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
            out.setdefault(str(size), {})[row] = dict(top1=round(top1, 1), agree_plain=round(agree, 1),
                                                      config=cfg, overrides={k: list(v) if isinstance(v, tuple) else v
                                                                             for k, v in over.items()})
            print(f"| {row} | {top1:.1f} | {agree:.1f} | {time.time() - t:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
