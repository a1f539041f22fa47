"""hpvit: turn pre-trained plain Vision Transformers into hierarchical backbones.

Public API::

    plain = hpvit.load_plain(src)                 # path | "timm:<model name>" | state_dict
    model = hpvit.from_plain(src_or_plain, config="paper-cls", num_classes=1000)
    logits = model(images)
    maps = model.forward_pyramid(images)          # 4 NCHW maps at strides 4, 8, 16, 32
    model.reparameterize()
    report = model.reuse_report()
    hpvit.save(model, "m.safetensors"); model = hpvit.load("m.safetensors")
"""

from .checkpoints import PlainSpec, PlainViT, load_plain
from .checkpoints.native import load, save
from .config import PRESETS, HPViTConfig, get_config, list_presets
from .errors import CheckpointError, ConfigError, HPViTError, InputError, OfflineError
from .models import HierarchicalViT, ReuseReport
from .models.build import from_plain

__version__ = "0.1.0"

__all__ = [
    "load_plain", "from_plain", "save", "load", "HierarchicalViT", "HPViTConfig", "PlainSpec", "PlainViT",
    "ReuseReport", "PRESETS", "get_config", "list_presets", "HPViTError", "CheckpointError", "ConfigError",
    "InputError", "OfflineError", "__version__",
]

from .models import registry as _timm_registry  # noqa: E402,F401  (registers hpvit_* models with timm)
