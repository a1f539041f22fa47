"""How close each transform option starts to the plain DeiT-Tiny, before any training.

    python experiments/init_similarity.py [--images N] [--adapted runs/study/adapt/model.safetensors]

Per config: cosine similarity of each stage's output to the plain model's tokens after the same block
(hpvit.analysis.similarity_to_plain, the same numbers `hpvit info --similarity` prints), top-1
agreement with the plain model, and top-1 on the 100-image ImageNet sample (224 px).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import hpvit
from hpvit.analysis import similarity_to_plain

from imagenet_sample_top1 import DATA, load_sample, top1

VARIANTS = {
    "paper-cls (hpvit 0.1)": dict(),
    "+ replicate pools": dict(pool_padding="replicate"),
    "+ class token joined": dict(class_token="join", head="auto"),
    "+ both (paper-cls-fixes)": dict(class_token="join", head="auto", pool_padding="replicate"),
    "+ both, last pool = GAP": dict(class_token="join", head="auto", pool_padding="replicate",
                                    pools=("avgconv", "avgconv", "gap")),
    "fast-cls + both": dict(class_token="join", head="auto", pool_padding="replicate", depth_split="fast"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapted", default=None, help="also measure this hpvit file (e.g. hpvit adapt's output)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    src = DATA / "deit_tiny" / "deit_tiny_patch16_224.pth"
    x, y = load_sample(224)
    plain = hpvit.from_plain(src, "identity")
    models = {k: (lambda kw=kw: hpvit.from_plain(src, "paper-cls", **kw)) for k, kw in VARIANTS.items()}
    if args.adapted:
        models["adapted (hpvit adapt)"] = lambda: hpvit.load(args.adapted)
    out = {"plain": {"top1": top1(plain, x, y)}}
    print("| model | stage 1 | stage 2 | stage 3 | stage 4 | same top-1 as plain | ImageNet-sample top-1 |")
    print("|---|---|---|---|---|---|---|")
    print(f"| plain DeiT-Tiny | 1 | 1 | 1 | 1 | 100 | {out['plain']['top1']:.0f} |")
    for name, build in models.items():
        m = build().eval()
        rows, extra = similarity_to_plain(m, plain, x)
        acc = top1(m, x, y)
        out[name] = {"cosine": [round(r.cosine, 3) for r in rows], "agree1": extra.get("agree1"), "top1": acc}
        cos = " | ".join(f"{r.cosine:.2f}" for r in rows)
        print(f"| {name} | {cos} | {extra.get('agree1', float('nan')):.0f} | {acc:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
