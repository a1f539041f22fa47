"""Small helpers shared by the format modules (key renaming, q/k/v merging)."""

from __future__ import annotations

import torch


def merge_qkv(
    parts: dict[int, dict[str, dict[str, torch.Tensor]]],
    out: dict[str, torch.Tensor],
    leftovers: dict[str, torch.Tensor],
    names: dict[tuple[int, str, str], str],
) -> None:
    """Concatenate separate q/k/v projections into timm's fused ``blocks.{i}.attn.qkv``.

    ``parts[i][leaf][which]`` holds block ``i``'s ``which`` in {q, k, v} for ``leaf`` in {weight, bias};
    ``names`` maps ``(i, which, leaf)`` back to the source key. Incomplete triples (a q without its k...)
    are not merged: their source keys go to ``leftovers`` so the caller reports them as unplaced.
    The fused weight is ``cat([Wq, Wk, Wv], 0)``: shape ``(3D, D)``, the order timm's Attention splits.
    """
    for i, leaves in parts.items():
        for leaf, qkv in leaves.items():
            if set(qkv) == {"q", "k", "v"}:
                out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
            else:
                for which, t in qkv.items():
                    leftovers[names[(i, which, leaf)]] = t


def group_dropped(keys: list[str], reason: str) -> dict[str, str]:
    return {k: reason for k in keys}
