"""hpvit: turn pre-trained plain Vision Transformers into hierarchical backbones.

Public API::

    plain = hpvit.load_plain(src)                 # path | "timm:<model name>" | state_dict
    model = hpvit.from_plain(src_or_plain, config="paper-cls", num_classes=1000)
    logits = model(images)
    maps = model.forward_pyramid(images)          # 4 NCHW maps at strides 4, 8, 16, 32
    model.reparameterize()
    report = model.reuse_report()
    hpvit.save(model, "m.safetensors"); model = hpvit.load("m.safetensors")
    records = hpvit.predict(model, ["photo.jpg"])  # any loaded model or run folder: image files / PIL / arrays
"""

import os as _os
import sys as _sys

from .lazy import lazy_getattr as _lazy_getattr

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "load_plain": ".checkpoints", "PlainSpec": ".checkpoints", "PlainViT": ".checkpoints",
    "load": ".export", "save": ".export",
    "PRESETS": ".config", "HPViTConfig": ".config", "get_config": ".config", "list_presets": ".config",
    "CheckpointError": ".errors", "ConfigError": ".errors", "HPViTError": ".errors", "InputError": ".errors",
    "OfflineError": ".errors",
    "HierarchicalViT": ".models", "ReuseReport": ".models", "from_plain": ".models.build",
    "predict": ".tasks.predict",  # loaded on first use everywhere (it imports the task models and evaluators)
}

__all__ = [
    "load_plain", "from_plain", "save", "load", "predict", "HierarchicalViT", "HPViTConfig", "PlainSpec", "PlainViT",
    "ReuseReport", "PRESETS", "get_config", "list_presets", "HPViTError", "CheckpointError", "ConfigError",
    "InputError", "OfflineError", "__version__",
]


def _started_as_cli() -> bool:
    """True when this process is the ``hpvit`` command (console script or ``python -m hpvit``): the command line
    imports torch only after parsing, so ``--help`` answers at once; the API below then loads on first use."""
    argv0 = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
    orig = list(getattr(_sys, "orig_argv", []))
    by_module = any(a == "-m" and b in ("hpvit", "hpvit.cli", "hpvit.cli.main") for a, b in zip(orig, orig[1:]))
    return argv0 in ("hpvit", "hpvit.exe") or by_module


# Load a public name on first use (the command-line process, see :func:`_started_as_cli`; and ``predict``)
__getattr__ = _lazy_getattr(__name__, _API, globals())


if not _started_as_cli():
    from .checkpoints import PlainSpec, PlainViT, load_plain
    from .export import load, save
    from .config import PRESETS, HPViTConfig, get_config, list_presets
    from .errors import CheckpointError, ConfigError, HPViTError, InputError, OfflineError
    from .models import HierarchicalViT, ReuseReport
    from .models.build import from_plain

    from .models import registry as _timm_registry  # noqa: F401  (registers hpvit_* models with timm)
