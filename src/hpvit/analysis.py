"""Cost analysis: parameters and FLOPs per stage (torch.utils.flop_counter, which counts 2 FLOPs per
multiply-add and sees fused attention)."""

from __future__ import annotations

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


def count_flops(fn, *args) -> int:
    """FLOPs of ``fn(*args)`` under no_grad, counted by FlopCounterMode."""
    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc:
        fn(*args)
    return fc.get_total_flops()


def stage_table(model, img_size: int | tuple[int, int] = 224) -> tuple[list[StageRow], dict]:
    """Per-stage rows (plus stem and head) for a HierarchicalViT at ``img_size`` (per image).

    Stage FLOPs are differences of cumulative counts (the forward stopped after each stage), so they
    do not depend on how the model organises its modules internally.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.zeros(1, model.spec.in_chans, h, w)
    was_training = model.training
    model.eval()
    try:
        total = count_flops(model, x)
        stem_flops = count_flops(model.patch_embed, x)
        n = model.layout.num_stages
        cum = [count_flops(lambda s=s: model.forward_intermediates(x, indices=[s], stop_early=True, intermediates_only=True))
               for s in range(n)]
    finally:
        model.train(was_training)
    gh, gw = model.patch_embed.grid(h, w)
    rows: list[StageRow] = []
    stem_params = sum(p.numel() for n_, p in model.named_parameters() if n_.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token", "norm_pre")))
    rows.append(StageRow("stem", "-", f"{gh}x{gw}", gh * gw, "-", model.embed_dim, stem_params, stem_flops / 1e9))
    start = 0
    prev = stem_flops
    named = dict(model.named_parameters())
    for s, depth in enumerate(model.layout.depths):
        idx = range(start, start + depth)
        params = sum(p.numel() for i in idx for p in model.blocks[i].parameters())
        params += sum(p.numel() for k, p in named.items() if k.startswith(f"empty_stages.{s}."))
        wins = sorted({str(model.layout.windows[i] or "global") for i in idx}, key=lambda v: (v == "global", v))
        wins_str = "/".join(f"{v}x{v}" if v != "global" else v for v in wins) or "-"
        tokens = gh * gw + (model.num_prefix_tokens if s == 0 else 0)
        blocks = f"{idx.start + 1}-{idx.stop}" if depth else "0"
        rows.append(StageRow(f"stage{s + 1} (1/{model.strides[s]})", blocks, f"{gh}x{gw}", tokens, wins_str,
                             model.embed_dim, params, (cum[s] - prev) / 1e9))
        prev = cum[s]
        start += depth
        gh, gw = (gh + 1) // 2, (gw + 1) // 2
    head_params = sum(p.numel() for k, p in named.items() if k.startswith(("norm.", "fc_norm", "head")))
    rows.append(StageRow("head", "-", "-", 0, "-", model.embed_dim, head_params, max(total - prev, 0) / 1e9))
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
