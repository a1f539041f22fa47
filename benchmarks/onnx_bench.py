"""ONNX Runtime next to PyTorch eager and torch.compile, in ONE process, round-robin (issue 22 item 2).

For each model (hpvit presets on a random timm ViT, and timm's ViT itself): export once to ONNX
(hpvit models through ``hpvit.export.export_onnx``, the file ``hpvit export`` writes; timm's ViT through
``torch.onnx.export(dynamo=True)``), one file per batch size (static shapes), open it in an ONNX Runtime
CPU session with as many intra-op threads as torch uses, check its outputs against eager PyTorch, then
time eager / compiled / ORT for every batch size in the same rounds (medians).

    PYTHONPATH=src python benchmarks/onnx_bench.py --threads 2 --batch 1,8 \
        --models hpvit-B/paper-cls,hpvit-B/lite-cls,hpvit-B/grid-lite-cls,vit_base_patch16_224 \
        --json benchmarks/results/onnx_bench.json

``ort / eager`` < 1 means ONNX Runtime is faster (wall-clock medians; ``CPU time``: ratio of the per-call
process CPU-time minima, steadier on a loaded machine, meaningful with ``--threads 1``). ``max_abs_diff``:
ORT against eager on the timed batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from hpvit.bench import build_model
from hpvit.export import export_onnx
from hpvit.models.hierarchical import HierarchicalViT
from hpvit.utils import write_text_atomic


def export(model: torch.nn.Module, path: str, batch: int, img: int) -> None:
    if isinstance(model, HierarchicalViT):
        # a static-shape file per batch: hpvit's export takes the batch from the example only when dynamic,
        # so export at batch 1 with a dynamic batch dim for batch > 1 (the graph is the same; shapes fixed by ORT)
        export_onnx(model, path, img_size=img, dynamic_batch=batch > 1, force=True)
        return
    x = torch.randn(batch, 3, img, img)
    with torch.no_grad():
        prog = torch.onnx.export(model, (x,), input_names=["images"], output_names=["logits"], opset_version=18,
                                 dynamo=True, external_data=False, verbose=False)
    prog.save(path)


def session(path: str, threads: int, level: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # no spin-waiting after a run: ORT's idle threads would otherwise burn the cores PyTorch runs on next
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="hpvit-B/paper-cls,hpvit-B/lite-cls,hpvit-B/grid-lite-cls,vit_base_patch16_224")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--ort-opt", default="all", choices=["all", "extended", "basic", "none"],
                    help="ONNX Runtime graph optimisation level")
    ap.add_argument("--workdir", default=None, help="where the .onnx files go (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    workdir = args.workdir or tmp.name
    os.makedirs(workdir, exist_ok=True)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    models, prep, rows = {}, {}, []
    for name in names:
        torch.manual_seed(0)
        m = build_model(name).eval().requires_grad_(False)
        models[name] = m
        compiled = None if args.no_compile else torch.compile(m)
        for b in batches:
            x = torch.randn(b, 3, args.img_size, args.img_size)
            path = os.path.join(workdir, f"{name.replace('/', '_')}_b{b}.onnx")
            t0 = time.perf_counter()
            export(m, path, b, args.img_size)
            t_export = time.perf_counter() - t0
            sess = session(path, args.threads, args.ort_opt)
            xn = x.numpy()
            with torch.no_grad():
                want = m(x)
                got = torch.from_numpy(sess.run(None, {"images": xn})[0])
                diff = float((got - want).abs().max())
                cdiff = None
                if compiled is not None:
                    t0 = time.perf_counter()
                    cdiff = float((compiled(x) - want).abs().max())
                    t_compile = time.perf_counter() - t0
            print(f"{name} batch {b}: exported in {t_export:.0f} s ({os.path.getsize(path) / 2**20:.0f} MB), "
                  f"ORT vs eager max |diff| {diff:.2e}, max |logit| {float(want.abs().max()):.2f}"
                  + ("" if cdiff is None else f"; compiled in {t_compile:.0f} s, vs eager {cdiff:.2e}"), flush=True)
            prep[(name, b)] = dict(x=x, xn=xn, sess=sess, compiled=compiled, diff=diff, cdiff=cdiff)
    times: dict[tuple[str, int, str], list[float]] = {}
    cpu: dict[tuple[str, int, str], list[float]] = {}  # process CPU time: steadier than wall time on a loaded machine
    for b in batches:
        work = {}
        for name in names:
            p = prep[(name, b)]
            work[(name, b, "eager")] = (lambda m=models[name], x=p["x"]: m(x))
            if p["compiled"] is not None:
                work[(name, b, "compiled")] = (lambda c=p["compiled"], x=p["x"]: c(x))
            work[(name, b, "ort")] = (lambda s=p["sess"], xn=p["xn"]: s.run(None, {"images": xn}))
        for k in work:
            times[k] = []
            cpu[k] = []
        with torch.no_grad():
            for r in range(args.warmup + args.rounds):
                line = []
                for k, fn in work.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    t, c = time.perf_counter() - t0, time.process_time() - c0
                    if r >= args.warmup:
                        times[k].append(t)
                        cpu[k].append(c)
                    line.append(f"{k[0]}/{k[2]}={t * 1e3:.0f}ms")
                print(f"batch {b} {'warm-up' if r < args.warmup else 'round'} {r + 1}: " + ", ".join(line), flush=True)
    print(f"\n| model | batch | eager (ms) | compiled (ms) | ORT (ms) | ORT / eager | compiled / eager | ORT / eager, CPU time | ORT max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for b in batches:
            e = statistics.median(times[(name, b, "eager")])
            o = statistics.median(times[(name, b, "ort")])
            c = statistics.median(times[(name, b, "compiled")]) if (name, b, "compiled") in times else None
            p = prep[(name, b)]
            ce, co = min(cpu[(name, b, "eager")]), min(cpu[(name, b, "ort")])
            rows.append(dict(eager_cpu_ms_min=ce * 1e3, ort_cpu_ms_min=co * 1e3, ort_over_eager_cpu=co / ce,name=name, batch=b, eager_ms=e * 1e3, compiled_ms=None if c is None else c * 1e3,
                             ort_ms=o * 1e3, ort_over_eager=o / e, compiled_over_eager=None if c is None else c / e,
                             ort_max_abs_diff=p["diff"], compiled_max_abs_diff=p["cdiff"],
                             eager_ms_all=[t * 1e3 for t in times[(name, b, "eager")]],
                             ort_ms_all=[t * 1e3 for t in times[(name, b, "ort")]]))
            cs = "-" if c is None else f"{c * 1e3:.0f}"
            cr = "-" if c is None else f"{c / e:.2f}"
            print(f"| {name} | {b} | {e * 1e3:.0f} | {cs} | {o * 1e3:.0f} | {o / e:.2f} | {cr} | {co / ce:.2f} | {p['diff']:.1e} |")
    if args.json:
        import onnxruntime as ort

        write_text_atomic(args.json, json.dumps(dict(
            img_size=args.img_size, threads=args.threads, warmup=args.warmup, rounds=args.rounds, ort_opt=args.ort_opt,
            torch=torch.__version__, onnxruntime=ort.__version__, numpy=np.__version__, rows=rows), indent=1))
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
