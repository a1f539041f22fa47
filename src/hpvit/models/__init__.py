"""Models: the hierarchical ViT (and, in plain.py, the plain baseline with simple pyramids)."""

from .hierarchical import HierarchicalViT
from .reuse import ReuseReport, convert_state_dict

__all__ = ["HierarchicalViT", "ReuseReport", "convert_state_dict"]
