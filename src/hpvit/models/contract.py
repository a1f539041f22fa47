"""The one contract every dense backbone and task model offers (timm's names), for models that wrap another.

* ``feature_info``: one dict per pyramid level (``num_chs``, ``reduction``, ``module``);
* ``forward_intermediates(x)``: the pyramid, four NCHW maps at the ``feature_info`` strides;
* ``group_matcher()``: regexes over the model's own parameter names: ``stem`` (layer 0) and ``blocks``
  (block ``i`` -> layer ``i + 1``); anything unmatched is the last layer (necks, heads);
* ``no_weight_decay()``: full names of parameters without weight decay (position embeddings, tokens,
  relative-position tables);
* ``new_parameter_names()``: full names of the parameters the transform added (pooling convs, tables);
* ``set_grad_checkpointing(enable)``.

:class:`Wraps` derives the last four from the wrapped module's answers by prefixing its names with the
path to it, so the engine needs no knowledge of where a backbone sits inside a task model.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn


def prefix_pattern(pattern: str, prefix: str) -> str:
    """Anchor every ``^`` alternative of ``pattern`` at ``prefix`` (escaped): ``'^a|^b'`` -> ``'^p\\.a|^p\\.b'``."""
    return re.sub(r"\^", lambda _: "^" + re.escape(prefix), pattern) if prefix else pattern


def prefix_matcher(gm: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A ``group_matcher`` dict whose patterns match the same parameters under ``prefix``."""
    out: dict[str, Any] = {}
    if gm.get("stem"):
        out["stem"] = prefix_pattern(gm["stem"], prefix)
    blocks = gm.get("blocks", [])
    if isinstance(blocks, str):
        blocks = [(blocks, None)]
    out["blocks"] = [(prefix_pattern(p, prefix), fixed) for p, fixed in blocks]
    return out


class Wraps:
    """Mixin for an ``nn.Module`` that wraps the module named by ``wrapped`` (an attribute path such as
    ``"vit"`` or ``"body"``): the contract's parameter questions are answered by that module, with names
    prefixed by its path inside this one."""

    wrapped: str = "vit"

    def _wrapped(self) -> tuple[nn.Module, str]:
        """The wrapped module and the prefix of its parameter names here (its attribute path, a submodule
        path, is also its name in ``named_parameters``)."""
        inner = self
        for part in self.wrapped.split("."):
            inner = getattr(inner, part)
        return inner, self.wrapped + "."

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        inner, pre = self._wrapped()
        return prefix_matcher(inner.group_matcher(coarse), pre)

    def no_weight_decay(self) -> set[str]:
        inner, pre = self._wrapped()
        own = {n for n, _ in inner.named_parameters()}
        return {pre + n for n in inner.no_weight_decay() if n in own}

    def new_parameter_names(self) -> list[str]:
        inner, pre = self._wrapped()
        return [pre + n for n in inner.new_parameter_names()] if hasattr(inner, "new_parameter_names") else []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self._wrapped()[0].set_grad_checkpointing(enable)

    def forward_intermediates(self, x):
        """The wrapped module's pyramid for images ``x`` (task models that normalise or pad their input
        first override this)."""
        inner = self._wrapped()[0]
        if hasattr(inner, "forward_pyramid"):  # a HierarchicalViT: timm's signature
            return inner.forward_intermediates(x, intermediates_only=True)
        return inner.forward_intermediates(x)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        inner, pre = self._wrapped()
        return [dict(f, module=pre + f["module"]) for f in inner.feature_info]
