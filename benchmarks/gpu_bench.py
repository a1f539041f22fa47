"""The GPU record of issue 30 (item 6), in one run: ``hpvit bench --device cuda --dtype bf16 --batch 64`` for
ViT-B, Hiera-B, Swin-B and the hpvit presets at ViT-B size, then a detection-backbone latency row at 1024 px
(batch 1: paper-det, grid-det, plain-det). Random weights, no downloads (it runs on a machine without internet).

    OUT=/some/dir python benchmarks/gpu_bench.py        # on the GPU machine (torch >= 2.1, timm, this checkout)
    python benchmarks/gpu_bench.py --quick --out DIR    # CPU smoke run: tiny models, batch 1-2, no memory

Writes ``cls_bf16_b64.json`` and ``det_1024_b1.json`` (``hpvit bench --json``, the card named in ``device``)
and ``gpu_bench.json`` (both, with the card, torch version and the commands) under ``--out`` (default: $OUT,
else benchmarks/results/gpu), and prints both tables. Peak memory: inference and one training step per
classifier (``--memory-modes infer,train``), inference for the detection backbones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLS_MODELS = "base,hpvit-B/grid-fast-cls"  # timm ViT-B, Hiera-B, Swin-B + every hpvit-B preset of the base group
DET_MODELS = "hpvit-B/paper-det,hpvit-B/grid-det,hpvit-B/plain-det"


def commands(out: Path, quick: bool) -> dict[str, list[str]]:
    """The two ``hpvit bench`` command lines (without the leading ``hpvit``)."""
    if quick:
        common = ["--device", "cpu", "--dtype", "fp32", "--quick", "--no-memory", "--threads", "1"]
        return {"cls": ["bench", "--models", "hpvit-T/paper-cls,hpvit-T/grid-cls,vit_tiny_patch16_224", "--batch", "2",
                        "--img-size", "224", *common, "--json", str(out / "cls_bf16_b64.json")],
                "det": ["bench", "--models", "hpvit-T/paper-det", "--batch", "1", "--img-size", "64", *common,
                        "--json", str(out / "det_1024_b1.json")]}
    common = ["--device", "cuda", "--dtype", "bf16", "--warmup", "3", "--iters", "10"]
    return {"cls": ["bench", "--models", CLS_MODELS, "--batch", "64", "--img-size", "224", *common,
                    "--memory-modes", "infer,train", "--json", str(out / "cls_bf16_b64.json")],
            "det": ["bench", "--models", DET_MODELS, "--batch", "1", "--img-size", "1024", *common,
                    "--memory-modes", "infer", "--json", str(out / "det_1024_b1.json")]}


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu"),
                   help="folder for the JSON files (default: $OUT, else benchmarks/results/gpu)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run of the same script (tiny models, batch 1-2, no memory)")
    args = p.parse_args(argv)
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)  # this checkout's hpvit, also for bench's memory subprocesses (python -m hpvit.bench)
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (src, os.environ.get("PYTHONPATH", "")) if x)
    import torch

    from hpvit.cli.main import main as hpvit_main

    if not args.quick and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; run it on the GPU machine, or --quick for the CPU smoke run",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs = commands(out, args.quick)
    for name, cmd in runs.items():
        print(f"\n$ hpvit {' '.join(cmd)}", flush=True)
        rc = hpvit_main(cmd)
        if rc:
            return rc
    record = {name: json.loads(Path(cmd[cmd.index("--json") + 1]).read_text()) for name, cmd in runs.items()}
    record.update(card=torch.cuda.get_device_name() if torch.cuda.is_available() and not args.quick else "cpu",
                  torch=torch.__version__, seconds=round(time.time() - t0, 1),
                  commands={k: "hpvit " + " ".join(v) for k, v in runs.items()})
    (out / "gpu_bench.json").write_text(json.dumps(record, indent=1))
    print(f"\ngpu_bench: {record['card']}, torch {record['torch']}, {record['seconds']}s; wrote {out / 'gpu_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
