"""TEMPORARY: moved to :mod:`hpvit.cli.common` (removed in this re-layering)."""

from ..cli.common import eval_out_dir, recipe_from_flags, run_training  # noqa: F401
