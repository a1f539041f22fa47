"""Top-1 of hpvit models (or a plain checkpoint) on the 100-image ImageNet sample in ../shared/data.

    python experiments/imagenet_sample_top1.py MODEL [MODEL ...] [--img-size 224] [--json OUT.json]

MODEL: an hpvit .safetensors file, a run folder holding model.safetensors, or a plain checkpoint
(evaluated as the plain model itself, config 'identity'). Preprocessing as timm's DeiT eval: resize
the shorter side to img_size x 248/224 (bicubic; as ../shared/data/README.md), centre crop img_size, ImageNet mean/std.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

import hpvit
from hpvit.checkpoints.native import is_hpvit_file

DATA = Path(os.environ.get("HPVIT_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def load_sample(img_size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    root = DATA / "imagenet_sample"
    rows = [line.split("\t") for line in (root / "labels.tsv").read_text().splitlines()[1:] if "\t" in line]
    tf = T.Compose([T.Resize(round(img_size * 248 / 224), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size),
                    T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    x = torch.stack([tf(Image.open(root / "images" / f).convert("RGB")) for f, _ in rows])
    return x, torch.tensor([int(c) for _, c in rows])


def load_model(src: str):
    p = Path(src)
    if p.is_dir() and (p / "model.safetensors").is_file():
        p = p / "model.safetensors"
    if is_hpvit_file(p):
        return hpvit.load(p)
    return hpvit.from_plain(src, "identity")


@torch.no_grad()
def top1(model, x: torch.Tensor, y: torch.Tensor, batch: int = 25) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    return 100.0 * (pred == y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    x, y = load_sample(args.img_size)
    out = {}
    for m in args.models:
        t = time.time()
        out[m] = round(top1(load_model(m), x, y), 2)
        print(f"{m}: top-1 {out[m]:.1f}% on {len(y)} images at {args.img_size} px ({time.time() - t:.0f}s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
