"""``hpvit predict --model M IMAGE|FOLDER|GLOB... --out DIR``: predictions on new images (see docs/predict.md).

Argument parsing only; the work is :func:`hpvit.tasks.predict_io.predict_to_folder` with the predictor of
:mod:`hpvit.tasks.predict` (PyTorch) or :mod:`hpvit.tasks.predict_onnx` (an ``.onnx`` file: ONNX Runtime,
torch is not imported)."""

from __future__ import annotations

import argparse

from .common import add_device_args, add_model_arg, add_overwrite_arg

HELP = "predict on new images with a trained model (classifier, detector, segmenter) or an exported ONNX file"


def add_predict_args(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, "a run folder or model file hpvit wrote (train cls|det|seg, convert, adapt), or an .onnx file "
                     "`hpvit export` wrote (run on onnxruntime, without torch)")
    p.add_argument("images", nargs="+", metavar="IMAGE|FOLDER|GLOB",
                   help="image files, folders (searched recursively) or quoted patterns such as 'photos/*.jpg'")
    p.add_argument("-o", "--out", required=True, help="output folder: predictions.json, overlays/, labels/ (docs/predict.md)")
    add_overwrite_arg(p, "--out")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--top-k", type=int, default=5, help="classes listed per image by a classifier (default 5)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="detections scoring below it are left out (default 0.3; 0 keeps every detection the model "
                        "returns); for a classifier, classes below it (default 0)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be decoded (listed in OUT/skipped.json) instead of stopping")
    add_device_args(p)
    p.set_defaults(func="hpvit.cli.predict:run_predict", torch_free=True)


def run_predict(args) -> int:
    from ..data.preprocess import expand_inputs
    from ..errors import ConfigError
    from ..tasks.predict_io import OutputFolder, predict_to_folder

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    inputs = expand_inputs(args.images)
    OutputFolder.check(args.out, args.overwrite, keep=inputs + [args.model])  # before the model is read
    if str(args.model).lower().endswith(".onnx"):
        from ..tasks.predict_onnx import OnnxPredictor

        predictor = OnnxPredictor(args.model, top_k=args.top_k, score_threshold=args.score_threshold,
                                  device=args.device, threads=args.threads)
    else:
        import torch

        from ..tasks.predict import make_predictor

        if args.threads:
            torch.set_num_threads(args.threads)
        predictor = make_predictor(args.model, top_k=args.top_k, score_threshold=args.score_threshold,
                                   device=args.device)
    print(predict_to_folder(predictor, inputs, args.out, batch_size=args.batch_size, overwrite=args.overwrite,
                            skip_bad=args.skip_bad_images, model=args.model))
    return 0
