"""Mapping a canonical plain-ViT state dict onto a model, with a full account of every tensor."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checkpoints import PlainViT
from ..errors import CheckpointError
from ..layers import resample_abs_pos_embed

# source tensors that are legitimately not part of the transformed encoder
NON_ENCODER_PREFIXES = ("head.", "cls_token", "reg_token")


@dataclass
class ReuseReport:
    """Account of a conversion. ``reused``: (model key, source key, note); ``new``: model keys that were
    initialised fresh; ``dropped``: source key -> why it is not used."""

    reused: list[tuple[str, str, str]]
    new: list[str]
    dropped: dict[str, str]
    source: str = "<state_dict>"
    numel: dict[str, int] = field(default_factory=dict)

    @property
    def reused_keys(self) -> list[str]:
        return [r[1] for r in self.reused]

    def encoder_fully_reused(self, plain: PlainViT) -> bool:
        """True when every source encoder tensor (all but head, class and register tokens) was reused."""
        used = set(self.reused_keys)
        return all(k in used for k in plain.state_dict if not k.startswith(NON_ENCODER_PREFIXES))

    def summary(self) -> str:
        n = self.numel
        lines = [
            f"reuse report for {self.source}",
            f"  reused : {len(self.reused):4d} tensors, {n.get('reused', 0) / 1e6:8.3f}M params",
            f"  new    : {len(self.new):4d} tensors, {n.get('new', 0) / 1e6:8.3f}M params",
            f"  dropped: {len(self.dropped):4d} source tensors, {n.get('dropped', 0) / 1e6:8.3f}M params",
        ]
        notes = [(d, s, note) for d, s, note in self.reused if note]
        for d, s, note in notes:
            lines.append(f"    transformed {s} -> {d}: {note}")
        groups: dict[str, int] = {}
        for k in self.new:
            g = "relative position tables" if k.endswith("rel_pos_table") else (
                "pooling convs" if ".downsample." in k else ("head" if k.startswith("head") else k))
            groups[g] = groups.get(g, 0) + 1
        for g, c in groups.items():
            lines.append(f"    new {g}: {c} tensor(s)")
        by_reason: dict[str, list[str]] = {}
        for k, why in self.dropped.items():
            by_reason.setdefault(why, []).append(k)
        for why, keys in by_reason.items():
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            lines.append(f"    dropped {shown}: {why}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        return dict(
            source=self.source,
            reused=[dict(model=d, source=s, note=note) for d, s, note in self.reused],
            new=list(self.new),
            dropped=dict(self.dropped),
            numel=dict(self.numel),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def convert_state_dict(plain: PlainViT, model: nn.Module) -> tuple[dict[str, torch.Tensor], ReuseReport]:
    """Map ``plain`` onto ``model``'s state-dict names. Returns (full state dict for the model, report);
    tensors the plain ViT does not provide keep the model's current (fresh) values."""
    msd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    reused: list[tuple[str, str, str]] = []
    dropped = dict(plain.dropped)
    spec = plain.spec
    dropped_numel = 0
    for k, v in plain.state_dict.items():
        if k == "pos_embed":
            if getattr(model, "pos_embed", None) is None:
                dropped[k] = "the model has no absolute position embedding"
                continue
            n_pre = spec.num_prefix_tokens if not spec.no_embed_class else 0
            gh, gw = spec.pos_grid
            grid = v[:, n_pre:].reshape(1, gh, gw, -1)
            new_grid = resample_abs_pos_embed(grid, tuple(model.pos_grid))
            parts = []
            note = []
            if model.pos_embed_prefix:
                parts.append(v[:, :n_pre])
            elif n_pre:
                note.append(f"{n_pre} prefix-token position(s) dropped")
            parts.append(new_grid.reshape(1, -1, v.shape[-1]))
            if tuple(model.pos_grid) != (gh, gw):
                note.insert(0, f"grid resampled {gh}x{gw} -> {model.pos_grid[0]}x{model.pos_grid[1]} (bicubic)")
            out[k] = torch.cat(parts, dim=1)
            reused.append((k, k, "; ".join(note)))
            continue
        if k not in msd:
            if k in ("cls_token", "reg_token"):
                dropped[k] = "prefix token unused: hierarchical stages carry no token sequence (class_token='join' keeps it)"
            elif k.startswith("head."):
                dropped[k] = "the model has no classifier (num_classes=0 or a backbone config)"
            else:
                dropped[k] = "no counterpart in this model"
            dropped_numel += v.numel()
            continue
        if tuple(msd[k].shape) != tuple(v.shape):
            if k.startswith("head."):
                dropped[k] = f"classifier shape {tuple(v.shape)} does not fit the model's {tuple(msd[k].shape)} (new head)"
                dropped_numel += v.numel()
                continue
            raise CheckpointError(
                f"{plain.source}: tensor {k!r} has shape {tuple(v.shape)} but the model expects {tuple(msd[k].shape)}"
            )
        out[k] = v
        reused.append((k, k, ""))
    new = [k for k in msd if k not in out]
    full = dict(msd)
    full.update({k: v.to(msd[k].dtype) for k, v in out.items()})
    numel = dict(
        reused=sum(out[d].numel() for d, _, _ in reused),
        new=sum(msd[k].numel() for k in new),
        dropped=dropped_numel + plain.dropped_numel,
    )
    report = ReuseReport(reused=reused, new=new, dropped=dropped, source=plain.source, numel=numel)
    return full, report


def restore_reuse_report(model, stored: "str | dict | None", path: "str | os.PathLike") -> None:
    """Give ``model`` back the reuse report ``stored`` in ``path``'s metadata (JSON text or dict).

    Files written before full reports were kept hold only counts (``reuse_summary``): the report then lists
    no tensors and its source says so."""
    if stored is None:
        return
    d = json.loads(stored) if isinstance(stored, str) else dict(stored)
    src = f"{d.get('source', '<unknown>')} (recorded in {os.fspath(path)} at conversion)"
    if isinstance(d.get("reused"), int):  # old count-only summary
        model._reuse_report = ReuseReport(reused=[], new=[], dropped={}, source=(
            f"{src}: only counts were kept: {d['reused']} reused, {d.get('new', 0)} new, {d.get('dropped', 0)} dropped"))
        return
    model._reuse_report = ReuseReport(
        reused=[(r["model"], r["source"], r.get("note", "")) for r in d.get("reused", [])], new=list(d.get("new", [])),
        dropped=dict(d.get("dropped", {})), source=src, numel=dict(d.get("numel", {})))
