"""Cost analysis: parameters and FLOPs per stage (torch.utils.flop_counter, which counts 2 FLOPs per
multiply-add and sees fused attention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .utils import count_flops


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
        r = getattr(model, "dilations", (1,) * n)[s]
        if r > 1 and depth:  # phase attention: the layout applies inside each of the r x r phase grids
            wins_str = f"{r}x{r} phases: {wins_str}"
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
    head = f"{'part':<16}{'blocks':>8}{'grid':>10}{'tokens':>8}{'window':>26}{'dim':>6}{'params(M)':>11}{'GFLOPs':>9}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r.name:<16}{r.blocks:>8}{r.grid:>10}{r.tokens:>8}{r.window:>26}{r.dim:>6}{r.params / 1e6:>11.3f}{r.gflops:>9.3f}")
    out.append("-" * len(head))
    out.append(f"{'total':<16}{'':>8}{'':>10}{'':>8}{'':>26}{'':>6}{totals['params'] / 1e6:>11.3f}{totals['gflops']:>9.3f}")
    out.append(f"(per image at {totals['img_size'][0]}x{totals['img_size'][1]}; FLOPs = 2 x multiply-adds, torch.utils.flop_counter)")
    return "\n".join(out)


# ---------------------------------------------------------------------- distance to the plain model
def plain_block_outputs(plain, x: torch.Tensor, blocks: "list[int]") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run a plain model (a HierarchicalViT with the ``identity`` config) on images ``x``.

    Returns the token sequences ``(B, P + h * w, D)`` after each 0-based block in ``blocks`` and the
    final output after ``norm`` (the input of ``forward_head``).
    """
    t = plain.embed(x)
    outs, want = [], set(blocks)
    for i, blk in enumerate(plain.blocks):
        t = blk(t)
        if i in want:
            outs.append(t)
    return outs, plain.norm(t)


def tokens_to_map(t: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """A token sequence ``(B, P + h * w, D)`` -> its map ``(B, D, h, w)`` (prefix tokens dropped)."""
    b, _, d = t.shape
    return t[:, prefix:].transpose(1, 2).reshape(b, d, grid[0], grid[1])


def map_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean cosine similarity ``(B,)`` of two ``(B, D, H, W)`` maps, after average-pooling both
    to the coarser of their grids (a 56x56 stride-4 map is compared with a 14x14 plain map 4x4 token
    block by block)."""
    h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
    a = F.adaptive_avg_pool2d(a.float(), (h, w))
    b = F.adaptive_avg_pool2d(b.float(), (h, w))
    return F.cosine_similarity(a, b, dim=1).flatten(1).mean(1)


def stage_reference_blocks(model) -> list[int]:
    """For each stage of ``model``, the 0-based plain block whose output it is compared with: the stage's
    last block (an empty stage: the last block before it; -1 = the patch embedding)."""
    out = []
    for s, d in enumerate(model.layout.depths):
        out.append(model.layout.stage_ends[s] if d else sum(model.layout.depths[:s]) - 1)
    return out


@dataclass
class SimilarityRow:
    stage: str
    grid: str
    plain_block: int
    cosine: float
    cosine_std: float


@torch.no_grad()
def similarity_to_plain(model, plain, images: torch.Tensor, batch_size: int = 16) -> tuple[list[SimilarityRow], dict]:
    """How far a transformed ``model`` is from its ``plain`` source (``identity`` config) on ``images``.

    Per stage: the cosine similarity between the stage's output map and the plain model's tokens after
    the same block (:func:`map_cosine`), mean and std over images. Also, when both have a classifier:
    ``agree1`` (% of images where both predict the same class) and ``top1_plain_in_top5``.
    """
    model.eval()
    plain.eval()
    refs = stage_reference_blocks(model)
    sims: list[list[torch.Tensor]] = [[] for _ in refs]
    agree, in5, n = 0, 0, 0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        final, maps = model.forward_intermediates(x)
        outs, p_final = plain_block_outputs(plain, x, [r for r in refs if r >= 0])
        grid = plain.patch_embed.grid(x.shape[-2], x.shape[-1])
        by_block = dict(zip([r for r in refs if r >= 0], outs))
        for s, r in enumerate(refs):
            if r >= 0:
                sims[s].append(map_cosine(maps[s], tokens_to_map(by_block[r], plain.num_prefix_tokens, grid)))
        if model.num_classes > 0 and plain.num_classes == model.num_classes:
            a, b = model.forward_head(final), plain.forward_head(p_final)
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            in5 += (a.topk(min(5, a.shape[-1]), -1).indices == b.argmax(-1, keepdim=True)).any(-1).sum().item()
        n += len(x)
    rows = []
    h, w = model.patch_embed.grid(images.shape[-2], images.shape[-1])
    for s, r in enumerate(refs):
        if sims[s]:
            c = torch.cat(sims[s])
            rows.append(SimilarityRow(f"stage{s + 1} (1/{model.strides[s]})", f"{h}x{w}", r + 1, c.mean().item(),
                                      c.std().item() if len(c) > 1 else 0.0))
        h, w = (h + 1) // 2, (w + 1) // 2
    extra = {"images": n}
    if model.num_classes > 0 and plain.num_classes == model.num_classes:
        extra.update(agree1=100.0 * agree / max(n, 1), plain_top1_in_top5=100.0 * in5 / max(n, 1))
    return rows, extra


def format_similarity(rows: list[SimilarityRow], extra: dict) -> str:
    head = f"{'stage':<16}{'grid':>10}{'plain block':>13}{'cosine':>9}{'std':>7}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r.stage:<16}{r.grid:>10}{r.plain_block:>13}{r.cosine:>9.3f}{r.cosine_std:>7.3f}")
    out.append(f"(cosine similarity to the plain model's tokens after the same block, maps average-pooled to the "
               f"coarser grid; {extra['images']} images)")
    if "agree1" in extra:
        out.append(f"same top-1 class as the plain model: {extra['agree1']:.1f}% of images; plain top-1 within the "
                   f"model's top-5: {extra['plain_top1_in_top5']:.1f}%")
    return "\n".join(out)


# ---------------------------------------------------------------------- how much the pools mix the phases
def gate_report(model) -> list[dict]:
    """How far the phase-mixing gates of a HierarchicalViT's pools have moved from zero (issue 27): one row per
    pooling layer, ``stage`` (the 0-based stage it feeds, stride ``reduction``), ``kind`` (``subavg``,
    ``subgconv``, ...) and, for gated pools, ``mean_abs`` / ``max_abs`` of the per-channel gate ``g`` (None
    for pools without a gate, and after ``reparameterize()``, which folds the gate into the conv). ``subavg``
    with ``g = 0`` is the subsample, ``g = 1`` the paper's 3x3 average; 0 after training: the model did not use
    the mixing."""
    rows = []
    for s in range(1, model.layout.num_stages):
        pool = model.stage_pool(s)
        g = None if pool is None or getattr(pool, "gate", None) is None else pool.gate.detach().abs().float()
        rows.append(dict(stage=s, reduction=model.strides[s], kind=None if pool is None else pool.kind,
                         mean_abs=None if g is None else g.mean().item(), max_abs=None if g is None else g.max().item()))
    return rows
