"""How fast the phase-mixing pools of a grid-cls model move away from the subsample under AdamW (issue 27).

    PYTHONPATH=src python benchmarks/pool_growth.py [--steps 8] [--json benchmarks/results/pool_growth.json]

The issue's hypothesis: a zero-initialised conv (``subconv``) does not grow smoothly under AdamW, because
Adam's first update of every weight with a non-zero gradient is ``lr * sign(grad)``: after one step every
one of its ``D * 9`` weights is ``+-lr``, a random-signed 3x3 filter per channel. The gated pools
(``subavg``, ``subgconv``) move ``D`` gates by ``lr`` instead, along a fixed, well-scaled branch.

Real DeiT-Tiny weights, ``grid-cls`` at 112 px, the 100-image ImageNet sample with its labels, batches of
8, AdamW as the recipes build it (``hpvit.engine.optim.param_groups``: weight decay 0.05, layer decay 0.75,
lr 2.5e-4 = cifar-mini's, constant), no augmentation, one thread. Per step and pool: the conv's weight norm
``||W||`` and its mean ``|w| / lr``, the mean ``|g|`` of the gate, and the mixing itself, ``||pool(x) -
sub(x)|| / ||sub(x)||`` on the batch's pool inputs (0 = the subsample, the start).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import hpvit
from hpvit.engine.optim import param_groups
from hpvit.layers import Downsample

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VARIANTS = {  # name -> (pools, new_param_lr_scale)
    "subconv": ("subconv", None),
    "subconv, new_param_lr_scale=0.1": ("subconv", 0.1),
    "subavg": ("subavg", None),
    "subgconv": ("subgconv", None),
}


def load_sample(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = DATA / "imagenet_sample"
    labels = dict(line.split("\t") for line in (root / "labels.tsv").read_text().split("\n") if "\t" in line)
    tf = T.Compose([T.Resize(int(side * 248 / 224), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(side),
                    T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    files = sorted(f for f in (root / "images").iterdir() if f.name in labels)
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    return x, torch.tensor([int(labels[f.name]) for f in files])


def pool_stats(model, inputs: dict, lr_of: dict) -> list[dict]:
    """Per pool: the mixing, the conv's norm and mean |w| in units of its own lr, the gate's mean |g| (and / lr)."""
    rows = []
    for s in range(1, model.layout.num_stages):
        pool = model.stage_pool(s)
        x = inputs[s]
        with torch.no_grad():
            sub = Downsample("sub", pool.dim, padding=pool.padding, tap=pool.tap)(x)
            mix = ((pool(x) - sub).norm() / sub.norm()).item()
        row = dict(stage=s, mixing=mix)
        if pool.conv is not None:
            w = pool.conv.weight
            row.update(conv_norm=w.detach().norm().item(), conv_lr=lr_of[id(w)],
                       conv_mean_abs_over_lr=(w.detach().abs().mean() / lr_of[id(w)]).item())
        if pool.gate is not None:
            g = pool.gate
            row.update(gate_mean_abs=g.detach().abs().mean().item(),
                       gate_mean_abs_over_lr=(g.detach().abs().mean() / lr_of[id(g)]).item())
        rows.append(row)
    return rows


def run(variant: str, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, batch: int) -> list[dict]:
    pools, scale = VARIANTS[variant]
    torch.manual_seed(0)
    model = hpvit.from_plain(DATA / "deit_tiny" / "deit_tiny_patch16_224.pth", config="grid-cls", pools=(pools,) * 3)
    groups = param_groups(model, 0.05, 0.75, new_param_lr_scale=scale)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    opt = torch.optim.AdamW(groups, lr=lr)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    inputs: dict[int, torch.Tensor] = {}
    for s in range(1, model.layout.num_stages):
        model.stage_pool(s).register_forward_pre_hook(lambda m, a, s=s: inputs.__setitem__(s, a[0].detach()))
    out = []
    model.train()
    for step in range(steps + 1):
        i = (step * batch) % len(images)
        xb, yb = images[i:i + batch], labels[i:i + batch]
        loss = F.cross_entropy(model(xb), yb)
        out.append(dict(step=step, loss=loss.item(), pools=pool_stats(model, inputs, lr_of)))
        print(variant, out[-1], flush=True)
        if step < steps:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2.5e-4)
    ap.add_argument("--side", type=int, default=112)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    images, labels = load_sample(args.side)
    res = {v: run(v, images, labels, args.steps, args.lr, args.batch) for v in VARIANTS}
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), results=res), indent=1))


if __name__ == "__main__":
    main()
