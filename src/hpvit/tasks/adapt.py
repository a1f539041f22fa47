"""``hpvit adapt``: label-free alignment of a transformed model to its own plain source (distillation).

A freshly transformed model starts far from the function its plain checkpoint computes (stride-4
tokens, window attention and pooling change every block's input). Before fine-tuning, ``adapt`` trains
the transformed model (the *student*) to reproduce the plain model (the *teacher*, the same checkpoint
under the ``identity`` config, frozen) on the user's unlabeled images:

* **features**: at the end of every student stage, the cosine distance between the student's map and
  the teacher's tokens after the same block, both average-pooled to the coarser of the two grids
  (stage ends 2/4/10/12 of a 2-2-6-2 split are compared with plain blocks 2/4/10/12);
* **logits** (when the source has a classifier): KL divergence between the teacher's and the student's
  class distributions at temperature ``T`` (times ``T**2``);
* **class token** (``class_token='join'``): the cosine distance between the student's and the
  teacher's final class tokens.

The result is a normal hpvit file (``OUT/model.safetensors``) that keeps the source's classifier in
the source's class order; ``hpvit train cls --model OUT/model.safetensors`` fine-tunes it. Runs on the
shared engine (progress, exact resume, AMP, DDP). See docs/classification.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..analysis import map_cosine, plain_block_outputs, stage_reference_blocks, tokens_to_map
from ..checkpoints import load_plain
from ..config import get_config
from ..data import build_transform
from ..data.unlabeled import UnlabeledImages
from ..engine.logging import log
from ..engine.recipe import Recipe
from ..engine.task import Task
from ..errors import ConfigError
from ..evaluation import SumEvaluator
from ..export import PREPROC_FILE, save
from ..models.build import from_plain
from ..models.contract import Wraps
from ..models.hierarchical import HierarchicalViT
from ..utils import write_text_atomic

TARGETS = ("features", "logits")  # also in tasks/_args.py (the --targets help)
MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
# What adapt measures on the held-out images (--eval-data), in words and units: results.json's metric_units,
# the epoch log line and curves.png use these.
METRIC_UNITS = {
    "agree1": "% of held-out images whose top-1 class is the plain model's top-1 class (100 = same predictions)",
    "kl": "KL divergence of the model's class distribution from the plain model's, nats per image (0 = identical)",
    "feat_dist": "cosine distance of the last stage's map to the plain model's tokens after the same block, mean over "
                 "images (0 = same direction, 1 = unrelated, 2 = opposite)",
    "eval_count": "held-out images measured",
}


def map_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between two ``(B, D, H, W)`` maps, each average-pooled to the coarser grid."""
    return (1.0 - map_cosine(student, teacher)).mean()


class AdaptModel(Wraps, nn.Module):
    """The trained module: the student only (the frozen teacher lives in the task, outside the optimizer
    and the checkpoints); the student's contract (layer ids, weight decay) answers for it. ``forward(x)`` -> ``(final, maps, logits)``: the normalised final output
    (``(B, H, W, D)`` map, or ``(B, P + H * W, D)`` with a joined class token), one ``(B, D, H_s, W_s)``
    map per stage, and the logits (None without a classifier)."""

    wrapped = "student"

    def __init__(self, student: HierarchicalViT):
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor):
        final, maps = self.student.forward_intermediates(x)
        logits = self.student.forward_head(final) if self.student.num_classes > 0 else None
        return final, maps, logits


class AdaptTask(Task):
    """Distil a transformed model toward its plain source on unlabeled images (see the module docstring)."""

    name = "adapt"
    metric_units = METRIC_UNITS
    summary_metrics = ("agree1", "kl", "feat_dist")

    def __init__(self, init: str, images: list[str], recipe: Recipe, *, config: Any = "paper-cls", fmt: str | None = None,
                 eval_images: list[str] | None = None, targets: tuple[str, ...] = TARGETS, temperature: float = 1.0,
                 feature_weight: float = 1.0, logit_weight: float = 1.0, max_eval_samples: int | None = None,
                 spec_overrides: dict[str, Any] | None = None):
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets:
            raise ConfigError(f"--targets {','.join(targets)}: choose one or more of {TARGETS}")
        if temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {temperature}")
        self.init, self.images, self.recipe, self.config, self.fmt = init, list(images), recipe, config, fmt
        self.eval_images = list(eval_images or [])
        self.targets, self.T = tuple(targets), float(temperature)
        self.feature_weight, self.logit_weight = float(feature_weight), float(logit_weight)
        self.max_eval_samples = max_eval_samples
        self.spec_overrides = spec_overrides or {}
        self.teacher: HierarchicalViT | None = None
        self.model_config: dict[str, Any] = {}
        self.primary_metric = "agree1" if "logits" in self.targets else "feat_dist"

    # ---------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        plain = load_plain(self.init, format=self.fmt, **self.spec_overrides)
        if "logits" in self.targets and plain.spec.num_classes <= 0:
            raise ConfigError(
                f"{self.init}: this checkpoint has no classifier head, so there are no logits to distil; "
                "use --targets features"
            )
        cfg = get_config(self.config, drop_path_rate=self.recipe.drop_path, img_size=self.recipe.img_size)
        if cfg.head == "none" and "logits" in self.targets:
            raise ConfigError(f"config {cfg.name!r} has no classifier head; use --targets features with it")
        student = from_plain(plain, cfg)
        if student.keep_prefix:
            raise ConfigError("the 'identity' config is the plain model itself: adapt a hierarchical config (paper-cls...)")
        teacher = from_plain(plain, "identity")
        teacher.eval().requires_grad_(False)
        self.teacher = teacher
        self.model_config = student.config.to_dict()
        self.stage_blocks = stage_reference_blocks(student)
        if "logits" not in self.targets:  # parameters the objective never reaches stay fixed (and DDP-safe)
            for m in (student.head, student.fc_norm, student.head_proj) + (() if student.cls_token is not None else (student.norm,)):
                if m is not None:
                    m.requires_grad_(False)
        if self.recipe.img_size < student.min_input_size:
            raise ConfigError(f"img_size {self.recipe.img_size} is below the minimum {student.min_input_size} of this config")
        return AdaptModel(student)

    # ---------------------------------------------------------------- data
    def datasets(self):
        r = self.recipe
        train = UnlabeledImages(self.images, build_transform(r, True), r.max_train_samples, r.seed)
        ev = None
        if self.eval_images:
            ev = UnlabeledImages(self.eval_images, build_transform(r, False), self.max_eval_samples, r.seed)
            log("adapt measures, on the held-out images, how close the model is to its plain source: "
                + "; ".join(f"{k} = {METRIC_UNITS[k]}" for k in self.summary_metrics)
                + " (agree1 and kl only when the source has a classifier)")
        return train, ev

    def prepare_batch(self, batch, device, train):
        return batch[0].to(device, non_blocking=True)

    def batch_size_of(self, batch) -> int:
        return len(batch)

    # ---------------------------------------------------------------- objective
    def _teacher_targets(self, x: torch.Tensor):
        t = self.teacher
        if next(t.parameters()).device != x.device:
            t.to(x.device)
        with torch.no_grad():
            outs, final = plain_block_outputs(t, x, [b for b in self.stage_blocks if b >= 0])
            logits = t.forward_head(final) if t.num_classes > 0 else None
        gh, gw = t.patch_embed.grid(x.shape[-2], x.shape[-1])
        maps = [tokens_to_map(o, t.num_prefix_tokens, (gh, gw)) for o in outs]
        cls = final[:, 0] if t.cls_token is not None else None
        return maps, logits, cls

    def distill_losses(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term of the objective (unweighted) for images ``x``."""
        final, maps, logits = model(x)
        t_maps, t_logits, t_cls = self._teacher_targets(x)
        out: dict[str, torch.Tensor] = {}
        if "features" in self.targets:
            student_maps = [m for m, b in zip(maps, self.stage_blocks) if b >= 0]
            out["features"] = torch.stack([map_distance(s, t) for s, t in zip(student_maps, t_maps)]).mean()
            student = model.module.student if hasattr(model, "module") else model.student
            if student.cls_token is not None and final.ndim == 3 and t_cls is not None:
                out["class_token"] = (1.0 - F.cosine_similarity(final[:, 0].float(), t_cls.float(), dim=-1)).mean()
        if "logits" in self.targets and logits is not None:
            T = self.T
            out["logits"] = F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(t_logits.float() / T, -1),
                                     reduction="batchmean", log_target=True) * T * T
        return out

    def loss(self, model, batch):
        terms = self.distill_losses(model, batch)
        total = terms.get("logits", 0.0) * self.logit_weight
        total = total + self.feature_weight * (terms.get("features", 0.0) + terms.get("class_token", 0.0))
        return total

    # ---------------------------------------------------------------- evaluation (label-free)
    def evaluator(self) -> SumEvaluator:
        return SumEvaluator(self.eval_sums, self.eval_metrics)

    def eval_sums(self, model, x):
        final, maps, logits = model(x)
        t_maps, t_logits, _ = self._teacher_targets(x)
        s_maps = [m for m, b in zip(maps, self.stage_blocks) if b >= 0]
        out = {"count": len(x), "feat_dist_sum": float(map_distance(s_maps[-1], t_maps[-1])) * len(x)}
        if logits is not None and t_logits is not None:
            out["agree1_sum"] = (logits.argmax(-1) == t_logits.argmax(-1)).sum().item()
            out["kl_sum"] = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(t_logits.float(), -1),
                                     reduction="sum", log_target=True).item()
        return out

    def eval_metrics(self, s):
        n = max(s.get("count", 0.0), 1.0)
        m = {"feat_dist": s.get("feat_dist_sum", 0.0) / n, "eval_count": int(s.get("count", 0))}
        if "agree1_sum" in s:
            m["agree1"] = 100.0 * s["agree1_sum"] / n
            m["kl"] = s["kl_sum"] / n
        return m

    # ---------------------------------------------------------------- outputs
    def describe(self):
        return {"init": str(self.init), "images": self.images, "eval_images": self.eval_images,
                "config": self.model_config, "targets": list(self.targets), "temperature": self.T,
                "feature_weight": self.feature_weight, "logit_weight": self.logit_weight}

    def results(self, model):
        return {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}

    def save_model(self, model, out_dir, ema=None):
        paths = [Path(save(model.student, out_dir / MODEL_FILE))]
        if ema is not None:
            paths.append(Path(save(ema.student, out_dir / EMA_FILE)))
        r = self.recipe
        pre = {"img_size": r.img_size, "interpolation": r.interpolation, "crop_pct": r.crop_pct,
               "mean": list(r.mean), "std": list(r.std), "adapted_from": str(self.init)}
        write_text_atomic(out_dir / PREPROC_FILE, json.dumps(pre, indent=2))
        return paths
