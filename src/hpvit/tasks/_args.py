"""TEMPORARY: arguments moved to :mod:`hpvit.cli` (removed in this re-layering)."""

from ..cli.det import add_det_eval_args, add_det_train_args  # noqa: F401
from ..cli.seg import add_seg_eval_args, add_seg_train_args  # noqa: F401
from ..data.subset import subset_count, subset_indices  # noqa: F401
