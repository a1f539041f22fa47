"""TEMPORARY: the dense backbones moved to :mod:`hpvit.models.dense` (removed in this re-layering)."""

from .dense import *  # noqa: F401,F403
from .dense import PlainPyramidBackbone, PyramidBackbone, backbone_from_config, build_dense_backbone, plain_out_indices  # noqa: F401
