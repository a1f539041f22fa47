"""``hpvit export``: an ONNX file of a model hpvit wrote (or of a plain checkpoint converted on the way): the
classifier's logits or the backbone's 4-level pyramid. The arguments are built without importing torch."""

from __future__ import annotations

from pathlib import Path

from ..config import RECOMMENDED
from ..errors import ConfigError
from .common import add_model_positional, add_overwrite_arg, check_output, class_count, config_help


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write an ONNX file of a model: classifier logits or the 4-level pyramid")
    add_model_positional(p, "a file or run folder hpvit wrote (classifier, detector, segmenter, adapt) or a plain ViT "
                            "checkpoint (converted with --config)")
    p.add_argument("-o", "--out", required=True, help="output .onnx path")
    p.add_argument("--config", default=RECOMMENDED["cls"], help=config_help("cls", RECOMMENDED["cls"], "for a plain checkpoint"))
    p.add_argument("--num-classes", type=class_count, default=None, help="classifier size for a plain checkpoint")
    p.add_argument("--pyramid", action="store_true",
                   help="export the backbone's pyramid (p1..p4, NCHW) instead of logits (always, for a detector or "
                        "segmenter: its backbone is what is exported)")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic (default: fixed at 1)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input side the graph is exported for (default: the training size recorded in the file or run, "
                        "else 224)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    add_overwrite_arg(p)
    p.add_argument("--check", action="store_true", help="run the file with onnxruntime and print the max abs diff to PyTorch")
    p.set_defaults(func="hpvit.cli.export:cmd_export")


def _export_source(args):
    """``(HierarchicalViT, pyramid, img_size, why)`` for ``hpvit export``: from any file or run folder hpvit wrote
    (a detector or segmenter gives its backbone's pyramid) or a plain checkpoint, at the size the model was
    trained at unless ``--img-size`` says otherwise."""
    import json

    from ..checkpoints.native import is_hpvit_model_file, model_file
    from ..export import load
    from ..models.build import from_plain

    saved = is_hpvit_model_file(args.model)
    f = Path(model_file(args.model)) if saved else Path(args.model)
    check_output(args.out, overwrite=args.overwrite, suffix=".onnx", why="the file is an ONNX graph",
                 sources=[(f, "the model being exported")])
    pyramid, size, why = args.pyramid, None, "no training size recorded"
    if saved:
        model = load(f)
        meta = getattr(model, "hpvit_meta", None)
        if meta is not None:  # a detector / segmenter: its heads (torchvision's Mask R-CNN, UperNet) stay in PyTorch
            vit = model.body.vit
            what = {"det": "Mask R-CNN detector", "seg": "UperNet segmenter"}.get(meta.get("task"), meta.get("task"))
            if vit.keep_prefix or len(vit.feature_info) < 2:
                raise ConfigError(f"{args.model} is a {what} on the plain {meta.get('config_name')} backbone, whose "
                                  "single-scale ViT has no hierarchical pyramid to export (its simple feature pyramid "
                                  "lives in the detection/segmentation wrapper, which is not exported); export works "
                                  "for transformed backbones (paper-det, paper-seg)")
            if not pyramid:
                print(f"note: {args.model} is a {what}: exporting its backbone's {len(vit.feature_info)}-level pyramid "
                      "(the task head is not exported; run it in PyTorch with hpvit.load)")
            model, pyramid = vit, True
            size, why = meta.get("img_size") or meta.get("crop"), "its training size"
        pre = f.parent / "model.json"  # classifier / adapt runs: the preprocessing record next to the model
        if size is None and pre.is_file():
            try:
                size, why = json.loads(pre.read_text()).get("img_size"), f"its training size ({pre.name})"
            except (OSError, json.JSONDecodeError):
                size = None
    else:
        model = from_plain(args.model, config=args.config, num_classes=args.num_classes)
    if args.img_size:
        size, why = args.img_size, "--img-size"
    elif not size:
        size = 224
    return model, pyramid, int(size), why


def cmd_export(args) -> int:
    """``hpvit export MODEL -o OUT.onnx [--pyramid] [--dynamic-batch] [--img-size N] [--check]``."""
    import torch

    from ..export import compare_onnx, export_onnx, output_names

    model, pyramid, size, why = _export_source(args)
    path = export_onnx(model, args.out, img_size=size, pyramid=pyramid, dynamic_batch=args.dynamic_batch,
                       opset=args.opset, force=args.overwrite)
    outs = output_names(model, pyramid)
    batch = "B" if args.dynamic_batch else "1"
    print(f"wrote {path}: input images ({batch}, {model.spec.in_chans}, {size}, {size}) float32 at {size} px ({why}) -> "
          f"{', '.join(outs)}; " + ("batch dimension dynamic" if args.dynamic_batch else
                                     "batch fixed at 1 (add --dynamic-batch for any batch)")
          + "; height and width are fixed")
    if args.check:
        x = torch.randn(2 if args.dynamic_batch else 1, model.spec.in_chans, size, size)
        diff = compare_onnx(model, path, x, pyramid)
        print(f"onnxruntime vs PyTorch: max abs diff {diff:.2e}")
    return 0
