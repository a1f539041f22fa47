"""Cost analysis: parameters and FLOPs per stage (torch.utils.flop_counter, which counts 2 FLOPs per
multiply-add and sees fused attention)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class StageRow:
    name: str
    blocks: str
    grid: str
    tokens: int
    window: str
    dim: int
    params: int
    gflops: float


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total FLOPs of ``model(x)`` and FLOPs per module name (FlopCounterMode's hierarchical names)."""
    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc:
        model(x)
    per = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    return fc.get_total_flops(), per


def _module_flops(per: dict[str, int], suffix: str) -> int:
    pat = re.compile(r"(^|\.)" + re.escape(suffix) + "$")
    return sum(v for k, v in per.items() if pat.search(k))


def stage_table(model, img_size: int | tuple[int, int] = 224) -> tuple[list[StageRow], dict]:
    """Per-stage rows (plus stem and head) for a HierarchicalViT at ``img_size`` (per image)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.zeros(1, model.spec.in_chans, h, w)
    was_training = model.training
    model.eval()
    total, per = count_flops(model, x)
    model.train(was_training)
    gh, gw = model.patch_embed.grid(h, w)
    rows: list[StageRow] = []
    stem_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token", "norm_pre")))
    stem_flops = _module_flops(per, "patch_embed")
    rows.append(StageRow("stem", "-", f"{gh}x{gw}", gh * gw, "-", model.embed_dim, stem_params, stem_flops / 1e9))
    start = 0
    for s, depth in enumerate(model.layout.depths):
        idx = range(start, start + depth)
        params = sum(p.numel() for i in idx for p in model.blocks[i].parameters())
        flops = sum(_module_flops(per, f"blocks.{i}") for i in idx)
        wins = sorted({str(model.layout.windows[i] or "global") for i in idx}, key=lambda v: (v == "global", v))
        wins_str = "/".join(f"{v}x{v}" if v != "global" else v for v in wins)
        tokens = gh * gw + (model.num_prefix_tokens if s == 0 else 0)
        rows.append(StageRow(f"stage{s + 1} (1/{model.strides[s]})", f"{idx.start + 1}-{idx.stop}", f"{gh}x{gw}", tokens, wins_str, model.embed_dim, params, flops / 1e9))
        start += depth
        gh, gw = (gh + 1) // 2, (gw + 1) // 2
    head_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("norm.", "fc_norm", "head")))
    accounted = sum(r.gflops for r in rows) * 1e9
    rows.append(StageRow("head", "-", "-", 0, "-", model.embed_dim, head_params, max(total - accounted, 0) / 1e9))
    totals = dict(params=sum(p.numel() for p in model.parameters()), gflops=total / 1e9, img_size=(h, w))
    return rows, totals


def format_table(rows: list[StageRow], totals: dict) -> str:
    head = f"{'part':<16}{'blocks':>8}{'grid':>10}{'tokens':>8}{'window':>14}{'dim':>6}{'params(M)':>11}{'GFLOPs':>9}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r.name:<16}{r.blocks:>8}{r.grid:>10}{r.tokens:>8}{r.window:>14}{r.dim:>6}{r.params / 1e6:>11.3f}{r.gflops:>9.3f}")
    out.append("-" * len(head))
    out.append(f"{'total':<16}{'':>8}{'':>10}{'':>8}{'':>14}{'':>6}{totals['params'] / 1e6:>11.3f}{totals['gflops']:>9.3f}")
    out.append(f"(per image at {totals['img_size'][0]}x{totals['img_size'][1]}; FLOPs = 2 x multiply-adds, torch.utils.flop_counter)")
    return "\n".join(out)
