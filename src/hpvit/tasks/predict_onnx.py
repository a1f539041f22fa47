"""``hpvit predict`` on an ONNX file that ``hpvit export`` wrote, on ONNX Runtime with numpy and PIL: no torch.

The graph tells what it is: output ``logits`` (a classifier: top-k) or ``p1..pN`` (a backbone's pyramid:
the maps). Its input size is the graph's; the rest of the preprocessing (crop, interpolation, mean, std)
and the class names come from the ``hpvit_preprocess`` metadata ``hpvit export`` stores from the run's
``model.json``, else the recipe defaults (ImageNet mean / std; crop 0.875 for a classifier, 1.0 for a
backbone) and ``class i``. A detector's or segmenter's task head is not in the file (only its backbone):
for boxes, masks and label maps predict with the run folder, in PyTorch.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from ..data.preprocess import Preprocess
from ..errors import CheckpointError, ConfigError, InputError
from .predict_io import softmax, topk

META_KEY = "hpvit_preprocess"  # the ONNX metadata entry hpvit.export.export_onnx writes


class OnnxPredictor:
    """A classifier (``task='cls'``) or backbone (``task='features'``) exported by ``hpvit export``."""

    def __init__(self, path: "str | os.PathLike", *, top_k: int = 5, score_threshold: "float | None" = None,
                 device: "str | None" = None, threads: "int | None" = None):
        try:
            import onnxruntime as ort  # optional peer (hpvit[export])
        except ImportError:
            raise ConfigError("running an ONNX file needs onnxruntime: pip install onnxruntime") from None
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such ONNX file; give the file `hpvit export` wrote")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device and device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError(f"--device {device}: this onnxruntime has no CUDA provider (pip install "
                                  "onnxruntime-gpu), or use --device cpu")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.sess = ort.InferenceSession(path, opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable graphs
            raise CheckpointError(f"{path}: not a readable ONNX file ({type(e).__name__}: {str(e)[:200]}); export it "
                                  "again with `hpvit export`") from e
        inputs, outs = self.sess.get_inputs(), [o.name for o in self.sess.get_outputs()]
        shape = inputs[0].shape if len(inputs) == 1 else []
        if (len(inputs) != 1 or inputs[0].name != "images" or len(shape) != 4 or not all(isinstance(s, int) for s in shape[1:])
                or not (outs == ["logits"] or all(re.fullmatch(r"p\d+", o) for o in outs))):
            raise ConfigError(f"{path} was not written by `hpvit export` (it needs one input 'images' (B, C, H, W) and "
                              f"the output 'logits' or p1..pN; it has {[i.name for i in inputs]} -> {outs})")
        self.task = "cls" if outs == ["logits"] else "features"
        self.batch = shape[0] if isinstance(shape[0], int) else None  # a fixed batch size (hpvit export: 1)
        try:
            record = json.loads(self.sess.get_modelmeta().custom_metadata_map.get(META_KEY) or "{}")
        except ValueError:
            record = {}
        self.pre = Preprocess.from_record(record, crop_pct=0.875 if self.task == "cls" else 1.0)
        self.pre.img_size = int(shape[2])  # the graph's size wins over the run's
        self.classes = record.get("classes")
        self.k, self.threshold = top_k, score_threshold or 0.0

    def prepare(self, pil) -> np.ndarray:
        return self.pre(pil)

    def _forward(self, x: np.ndarray) -> list[np.ndarray]:
        if self.batch is None:
            return self.sess.run(None, {"images": x})
        parts = [self.sess.run(None, {"images": x[i:i + self.batch]}) for i in range(0, len(x), self.batch)]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]

    def run(self, batch: list) -> list[dict]:
        outs = self._forward(np.stack([b[2] for b in batch]).astype(np.float32))
        heads = [{"image": name, "width": pil.size[0], "height": pil.size[1]} for name, pil, _ in batch]
        if self.task == "features":
            return [{**h, "features": [o[i] for o in outs]} for i, h in enumerate(heads)]
        probs = softmax(outs[0])
        names = self.classes or [f"class {i}" for i in range(probs.shape[-1])]
        return [{**h, "topk": topk(p, names, self.k, self.threshold)} for h, p in zip(heads, probs)]
