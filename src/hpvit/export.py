"""Everything hpvit writes and reads back as a model: ``save`` / ``load`` (safetensors + JSON metadata; see
:mod:`hpvit.checkpoints.native` for reading the metadata) and graph export: ONNX (``torch.onnx.export``,
dynamo exporter) and ``torch.export``.

:func:`load` reads every model file hpvit writes: classifiers and backbones (``hpvit.save``, ``hpvit
convert``, ``hpvit train cls``, ``hpvit adapt``) and the detectors and segmenters of ``hpvit train det`` /
``hpvit train seg``. The conversion's reuse report (which source tensors were reused, which are new, which
were dropped) travels in the metadata, so ``reuse_report()`` on a loaded model describes that file's
conversion.

Graph export:

The exported graph is the model's plain-call path (every block called as a module on ``(B, H, W, D)``
maps; see ``HierarchicalViT._plain_calls``), re-parameterised first (average pool + conv merged into one
conv), in eval mode, on a copy: the caller's model is not changed. Two outputs:

* classifier: input ``images`` ``(B, C, H, W)`` float32 -> ``logits`` ``(B, num_classes)`` (or pooled
  features ``(B, head_hidden_size)`` when ``num_classes == 0``);
* pyramid (``pyramid=True``): -> ``p1 .. pN``, one ``(B, D, H_s, W_s)`` map per stage (strides 4, 8, 16,
  32 for the paper presets).

A graph is exported for one input size: window attention pads each map to a multiple of the window, and
how much depends on H and W. The batch dimension may be dynamic (``dynamic_batch=True``); for another
image size, export another file.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from safetensors.torch import load_file, save_file, save_model

from .checkpoints.native import FORMAT_VERSION, model_file, read_metadata
from .checkpoints.spec import PlainSpec
from .config import HPViTConfig
from .errors import CheckpointError, ConfigError, InputError, OutputError
from .models.dense import mark_dropped_in_report, unused_dense_keys
from .models.detector import detector_from_meta
from .models.build import check_num_classes
from .models.hierarchical import HierarchicalViT
from .models.reuse import restore_reuse_report
from .models.segmenter import segmenter_from_meta
from .utils import atomic_write, write_text_atomic

# what a dense file's "task" names -> the function that builds that (untrained) model from the description
DENSE_FROM_META = {"det": detector_from_meta, "seg": segmenter_from_meta}
HEAD_TYPES = ("avg", "token", "", "none")  # the classifier heads a saved file may name (see HierarchicalViT)
PREPROC_FILE = "model.json"  # a classifier run's preprocessing and class names, beside its model file
ONNX_PREPROCESS_KEY = "hpvit_preprocess"  # ONNX metadata: that record, for hpvit predict on ONNX Runtime


# ---------------------------------------------------------------------------------------------- files
def save(model, path: "str | os.PathLike", force: bool = True) -> str:
    """Write ``model`` (a HierarchicalViT) to ``path`` as safetensors, atomically.

    The metadata holds ``hpvit_config`` and ``hpvit_spec`` (JSON) and ``num_classes`` so
    :func:`load` rebuilds the same model. ``force=False`` refuses to replace an existing file.
    """
    meta = {
        "hpvit_format": FORMAT_VERSION,
        "hpvit_config": model.config.to_json(),
        "hpvit_spec": model.spec.to_json(),
        "num_classes": str(model.num_classes),
        "head_type": model.head_type,
    }
    _refuse_own_source(model, path)
    report = reuse_report_meta(model)
    if report is not None:
        meta["reuse_report"] = report
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta), force=force)
    return os.fspath(path)


def _refuse_own_source(model, path: "str | os.PathLike") -> None:
    """Writing a converted model onto the checkpoint it was converted from would destroy the only copy."""
    report = getattr(model, "_reuse_report", None)
    src = getattr(report, "source", None)
    try:
        same = src is not None and os.path.exists(path) and os.path.samefile(src, path)
    except OSError:
        same = False
    if same:
        raise OutputError(f"{path} is the checkpoint this model was converted from ({src}); writing the converted "
                          "model there would destroy the source. Choose another output path (-o)")


def reuse_report_meta(model) -> "str | None":
    """The model's conversion reuse report as JSON for a file's metadata (None for a model not converted)."""
    report = getattr(model, "_reuse_report", None)
    return None if report is None else report.to_json()


def load(path: "str | os.PathLike", map_location: str = "cpu"):
    """Rebuild any model hpvit wrote (bit-identical outputs): a classifier/backbone saved by :func:`save`
    (a :class:`~hpvit.models.HierarchicalViT`), or a detector / segmenter written by ``hpvit train det|seg``
    (``MaskRCNNModel`` / ``UperNetSegmenter``, with the file's description in ``model.hpvit_meta``).
    ``path`` may also be a training output folder (its ``model.safetensors`` is loaded)."""
    path = model_file(path)
    try:
        meta = read_metadata(path)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}; hpvit.load reads the .safetensors files hpvit writes. For a plain ViT checkpoint (.pth, .bin, "
            "timm/HF .safetensors) use hpvit.load_plain(path) or hpvit.from_plain(path, config=...) (or `hpvit convert`)"
        ) from e
    if "hpvit_dense" in meta:
        return load_dense(path)
    if "hpvit_config" not in meta:
        raise CheckpointError(
            f"{path}: no hpvit metadata; this is not a file written by hpvit. For a plain ViT checkpoint use "
            "hpvit.from_plain(path, config=...) (or `hpvit convert`)"
        )
    version = meta.get("hpvit_format", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written in hpvit file format {version!r}, but this hpvit reads format {FORMAT_VERSION!r}; the "
            "file comes from another hpvit version (upgrade hpvit) or its metadata was edited (re-create it with "
            "`hpvit convert` or hpvit.save)")
    try:
        cfg = HPViTConfig.from_dict(json.loads(meta["hpvit_config"]))
        spec = PlainSpec.from_dict(json.loads(meta["hpvit_spec"]))
        num_classes = int(meta.get("num_classes", ""))
        check_num_classes(num_classes, "its num_classes")
        if meta.get("head_type", "avg") not in HEAD_TYPES:
            raise ConfigError(f"head_type {meta['head_type']!r} is none of {HEAD_TYPES}")
        model = HierarchicalViT(spec, cfg, num_classes=num_classes)
    except Exception as e:  # bad JSON, unknown/invalid fields, impossible sizes: the metadata was altered
        raise CheckpointError(
            f"{path}: the hpvit metadata (config / spec / num_classes) is damaged and cannot rebuild the model "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); the file was edited or corrupted. "
            "Re-create it from the original checkpoint with `hpvit convert` (or save the model again with hpvit.save)"
        ) from e
    if meta.get("head_type") and meta["head_type"] != model.head_type:
        model.head_type = meta["head_type"]
    sd = load_file(os.fspath(path), device=map_location)
    _check_values(model, sd, path)
    missing, unexpected = model.load_state_dict(sd, strict=False) if _shapes_fit(model, sd, path) else ([], [])
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the stored config (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}); the file was edited or corrupted. Re-create it with `hpvit convert`")
    restore_reuse_report(model, meta.get("reuse_report") or meta.get("reuse_summary"), path)
    record = read_preprocess_record(path)
    if record is not None:
        model.hpvit_preprocess = record
    return model


def read_preprocess_record(path: "str | os.PathLike") -> "dict | None":
    """The training run's preprocessing and class names (``model.json`` beside the model file, written by
    ``hpvit train cls`` / ``hpvit adapt``), or None when there is none. An unreadable record is said, not fatal."""
    f = Path(path).parent / PREPROC_FILE
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record
    except (OSError, ValueError) as e:
        warnings.warn(f"{f}: the run's preprocessing record cannot be read ({e}); the defaults are used in its place "
                      "(img_size 224, ImageNet mean/std). Train again to write it anew", stacklevel=3)
        return None


def _check_values(model, sd: dict, path) -> None:
    """Integer tensors where the model holds floats are refused (loading would cast them into garbage weights);
    NaN / inf weights load, with a warning naming them (the model will output NaN)."""
    own = model.state_dict()
    wrong = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in sd.items()
             if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if wrong:
        raise CheckpointError(f"{path}: {len(wrong)} tensor(s) are not floating point, e.g. {wrong[:3]}, where the model "
                              "holds float weights; the file was edited or corrupted. Re-create it from the original "
                              "checkpoint with `hpvit convert`")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        warnings.warn(f"{path}: {len(bad)} tensor(s) hold NaN or inf values, e.g. {bad[:3]}; the model will output NaN "
                      "(the run that wrote it diverged, or the file was damaged)", stacklevel=3)


def _shapes_fit(model, sd: dict, path) -> bool:
    """Raise CheckpointError naming the tensors whose shapes differ from what the stored config builds."""
    own = model.state_dict()
    flexible = set(getattr(model, "flexible_shape_keys", ()))  # e.g. a position embedding stored at any grid
    wrong = [f"{k} {tuple(v.shape)} (config needs {tuple(own[k].shape)})" for k, v in sd.items()
             if k in own and k not in flexible and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(
            f"{path}: {len(wrong)} tensor(s) have shapes the stored config does not build, e.g. {wrong[:3]}; the "
            "metadata or the tensors were edited. Re-create the file from the original checkpoint with `hpvit convert`"
        )
    return True


# ---------------------------------------------------------------------------------------------- dense models
def dense_backbone_meta(body: nn.Module) -> dict[str, Any]:
    """The backbone's part of a detector / segmenter file's description: kind (``hierarchical`` / ``plain``),
    HPViTConfig, plain spec, pyramid blocks (plain baseline) and the conversion's reuse report."""
    meta = {"backbone": body.kind, "config": body.vit.config.to_dict(), "spec": body.vit.spec.to_dict(),
            "out_indices": list(getattr(body, "out_indices", []) or [])}
    report = getattr(body.vit, "_reuse_report", None)
    if report is not None:
        meta["reuse"] = report.to_dict()
    return meta


def save_dense(model: nn.Module, path: "str | os.PathLike", meta: dict[str, Any]) -> Path:
    """Write a detector / segmenter's weights to ``path`` (.safetensors, the description ``meta`` in its metadata)
    and ``meta`` next to it (``path`` with .json), both atomically."""
    p = Path(path)
    atomic_write(p, lambda tmp: save_model(model, tmp, metadata={"hpvit_dense": json.dumps(meta)}), force=True)
    write_text_atomic(p.with_suffix(".json"), json.dumps(meta, indent=2))
    return p


def read_dense(path: "str | os.PathLike", expect_task: "str | None",
               tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of a file written by :func:`save_dense`; ``path`` may be a training directory.
    ``expect_task`` None accepts any task; ``tensors=False`` reads only the metadata (empty state dict)."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise CheckpointError(f"{p}: no such model file; pass a `hpvit train {expect_task or 'det|seg'}` output "
                              "directory or its model.safetensors")
    md = read_metadata(p)
    try:
        sd = load_file(str(p)) if tensors else {}
    except Exception as e:
        raise CheckpointError(f"{p}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if "hpvit_dense" not in md:
        hint = " (it is an hpvit classifier/backbone file: load it with hpvit.load)" if "hpvit_config" in md else ""
        raise CheckpointError(f"{p}: not an hpvit dense-prediction model (no 'hpvit_dense' metadata){hint}; give the "
                              f"output of `hpvit train {expect_task or 'det|seg'}`")
    meta = json.loads(md["hpvit_dense"])
    if expect_task is not None and meta.get("task") != expect_task:
        raise CheckpointError(f"{p}: holds a {meta.get('task')!r} model, not a {expect_task!r} one; use "
                              f"`hpvit eval {meta.get('task')}`")
    return sd, meta


def load_dense(path: "str | os.PathLike", expect_task: "str | None" = None) -> nn.Module:
    """The detector or segmenter in ``path`` (whichever its metadata names, or ``expect_task``), with its
    description in ``model.hpvit_meta`` and its conversion's reuse report restored."""
    sd, meta = read_dense(path, expect_task)
    task = meta.get("task")
    if task not in DENSE_FROM_META:
        raise CheckpointError(f"{path}: holds a {task!r} model, which this version of hpvit cannot load; upgrade hpvit")
    try:
        model = DENSE_FROM_META[task](meta)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: its 'hpvit_dense' description is incomplete or edited ({type(e).__name__}: {e}), so the "
            f"{task} model cannot be rebuilt; use the file `hpvit train {task}` wrote, or train again"
        ) from e
    vit = model.body.vit
    prefix = f"{model.wrapped}.vit."  # the task model wraps its dense backbone, which holds the ViT as .vit
    old = unused_dense_keys(sd, prefix)  # files saved while dense models still held the ViT's final norm / head
    model.load_state_dict({k: v for k, v in sd.items() if k not in old}, strict=True)
    restore_reuse_report(vit, meta.get("reuse"), path)
    mark_dropped_in_report(vit, {k[len(prefix):]: sd[k].numel() for k in old})
    model.hpvit_meta = meta
    return model


# ---------------------------------------------------------------------------------------------- graphs


class _Logits(nn.Module):
    """``(B, C, H, W)`` -> ``(B, K)``: the model's classifier output."""

    def __init__(self, model: HierarchicalViT):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images))


class _Pyramid(nn.Module):
    """``(B, C, H, W)`` -> a tuple of ``(B, D, H_s, W_s)`` maps, one per stage."""

    def __init__(self, model: HierarchicalViT):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.forward_intermediates(images, intermediates_only=True))


def _hw(img_size: "int | tuple[int, int]") -> tuple[int, int]:
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


def prepare(model: nn.Module, pyramid: bool = False) -> nn.Module:
    """A re-parameterised eval-mode copy of ``model`` wrapped for export (see the module docstring).

    Raises ConfigError for what cannot be exported: a model that is not an hpvit ``HierarchicalViT``, a
    pyramid from the single-stage ``identity`` config, or logits from a backbone-only config (``head='none'``).
    """
    if not isinstance(model, HierarchicalViT):
        raise ConfigError(
            f"export takes an hpvit HierarchicalViT (from hpvit.from_plain, hpvit.load or timm.create_model('hpvit_...')), "
            f"got {type(model).__name__}; detection / segmentation models: export their backbone (model.backbone)"
        )
    if pyramid and model.keep_prefix:
        raise ConfigError("the 'identity' config has a single stride-16 stage and no pyramid; export it without "
                          "--pyramid, or convert with a hierarchical config (paper-det, paper-seg, paper-cls)")
    if not pyramid and model.head_type == "none":
        raise ConfigError(f"config {model.config.name!r} is a backbone (head='none'): it has no classifier output; "
                          "export the pyramid (--pyramid / pyramid=True)")
    m = copy.deepcopy(model).eval().float()
    m.reparameterize()
    m.force_plain_calls = True
    for blk in m.blocks:  # padded windows attend as (B, nW, heads, N, d): ONNX's attention needs 4-D, matmuls do not
        blk.attn.fused = False
    return (_Pyramid if pyramid else _Logits)(m).eval()


def output_names(model: HierarchicalViT, pyramid: bool) -> list[str]:
    return [f"p{s + 1}" for s in range(model.layout.num_stages)] if pyramid else ["logits"]


def _tiles_phases(model: HierarchicalViT, side: int) -> bool:
    """Whether an image side gives every phase stage (``dilations[s] = r > 1``) a map side that is a multiple of
    ``r``: the exported graph (plain calls, no padded phases) needs it. Map sides: ``patch_embed.grid``, then
    ``ceil(n / 2)`` per pool."""
    n = model.patch_embed.grid(side, side)[0]
    for s, r in enumerate(model.dilations):
        if s:
            n = -(-n // 2)
        if r > 1 and model.layout.depths[s] and n % r:
            return False
    return True


def _example(model: HierarchicalViT, img_size: "int | tuple[int, int]", batch_size: int) -> torch.Tensor:
    h, w = _hw(img_size)
    m = model.min_input_size
    if h < m or w < m:
        raise InputError(f"img_size {h}x{w} is below this config's minimum {m}x{m}; export at a larger size")
    bad = [v for v in dict.fromkeys((h, w)) if not _tiles_phases(model, v)]
    if bad:
        v, ps = bad[0], model.spec.patch_size
        below = next((c for c in range(v - v % ps, m - 1, -ps) if _tiles_phases(model, c)), None)
        above = next(c for c in range(v - v % ps + ps, 4 * v + 4 * ps, ps) if _tiles_phases(model, c))
        near = " or ".join(str(c) for c in (below, above) if c is not None)
        raise InputError(
            f"cannot export {model.config.name!r} at {h}x{w} px: its phase attention needs image sides whose maps "
            f"tile into whole phases (multiples of the {model.spec.patch_size}-px patch), and {v} does not; "
            f"export at {near} px (--img-size), or resize the images to such a size"
        )
    return torch.randn(batch_size, model.spec.in_chans, h, w)


def export_program(model: HierarchicalViT, img_size: "int | tuple[int, int]" = 224, pyramid: bool = True,
                   dynamic_batch: bool = False, batch_size: int = 2) -> "torch.export.ExportedProgram":
    """``torch.export`` of the (re-parameterised) classifier or pyramid at one image size.

    ``dynamic_batch`` makes dim 0 of the input symbolic (``batch_size`` >= 2 for the example, so the
    batch is not specialised to 1).
    """
    wrapped = prepare(model, pyramid)
    x = _example(model, img_size, batch_size)
    dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with torch.no_grad():
        return torch.export.export(wrapped, (x,), dynamic_shapes=dyn)


def export_onnx(model: HierarchicalViT, path: "str | os.PathLike", img_size: "int | tuple[int, int]" = 224,
                pyramid: bool = False, dynamic_batch: bool = False, opset: int = 18, force: bool = False) -> str:
    """Write ``model`` as ONNX to ``path``: input ``images`` ``(B, C, H, W)`` at ``img_size``, outputs
    ``logits`` or ``p1..pN`` (see the module docstring). Needs the ``onnx`` and ``onnxscript`` packages
    (``pip install "hpvit[export]"``). ``force=False`` refuses to replace an existing file."""
    path = os.fspath(path)
    if os.path.exists(path) and not force:
        raise OutputError(f"{path} exists; pass force=True (--overwrite) to replace it, or choose another path")
    _require("onnx", "onnxscript")
    wrapped = prepare(model, pyramid)
    x = _example(model, img_size, 2 if dynamic_batch else 1)
    outs = output_names(model, pyramid)
    dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    folder = Path(path).resolve().parent
    while not folder.exists():  # checked before the (slow) export; atomic_write creates missing folders
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {path}: {folder} is not writable; choose another output path")
    with torch.no_grad():
        prog = torch.onnx.export(wrapped, (x,), input_names=["images"], output_names=outs, dynamic_shapes=dyn,
                                 opset_version=opset, dynamo=True, external_data=False, verbose=False)
    record = getattr(model, "hpvit_preprocess", None)
    if record is not None:  # the run's preprocessing and class names travel with the graph (hpvit predict reads them)
        prog.model.metadata_props[ONNX_PREPROCESS_KEY] = json.dumps(record)
    atomic_write(path, prog.save, force=True)  # a temp file renamed onto path: never a half-written .onnx
    return path


def _require(*names: str) -> None:
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(missing)}: pip install \"hpvit[export]\" "
                          "(onnx, onnxscript; onnxruntime to run and check the file)")


def run_onnx(path: "str | os.PathLike", images: torch.Tensor) -> list[torch.Tensor]:
    """Run an exported file with ONNX Runtime (CPU): ``images`` ``(B, C, H, W)`` -> its outputs."""
    _require("onnxruntime")
    import onnxruntime as ort

    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {"images": images.float().numpy()})]


def compare_onnx(model: HierarchicalViT, path: "str | os.PathLike", images: torch.Tensor,
                 pyramid: bool = False) -> float:
    """Max abs difference between ONNX Runtime on ``path`` and ``model`` itself (PyTorch, eval mode, as given:
    not re-parameterised, its own fast inference path) on ``images``."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        want = model.forward_pyramid(images) if pyramid else [model(images)]
    model.train(was_training)
    got = run_onnx(path, images)
    if len(got) != len(want):
        raise OutputError(f"{path}: {len(got)} outputs, PyTorch gives {len(want)}; export again")
    return max(float((g - w).abs().max()) for g, w in zip(got, want))


def time_call(fn: Callable[[], Any], warmup: int = 2, rounds: int = 5) -> float:
    """Median seconds of ``fn()`` over ``rounds`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
