"""Exponential moving average of a model's weights (buffers are copied)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """``ema = decay * ema + (1 - decay) * model`` after every optimizer update; ``module`` is the averaged model."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = model.state_dict()
        for k, v in self.module.state_dict().items():
            s = src[k].detach()
            if v.dtype.is_floating_point:
                v.mul_(self.decay).add_(s.to(v.dtype), alpha=1.0 - self.decay)
            else:
                v.copy_(s)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd)
