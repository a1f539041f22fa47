"""Peak memory and step time of ONE dense training step at the paper's sizes (issue 14, item 4).

One training step = forward + loss + backward + AdamW step, exactly as ``hpvit train det|seg`` runs it:
the model is built by the same function (``build_detector`` / ``build_segmenter``) from a plain
checkpoint file, the loss is the task's own ``loss()``, the optimizer is ``build_optimizer`` with the
task's default recipe (layer-wise lr decay, weight decay, drop path 0.1) and the task's parameter groups,
and gradient checkpointing is switched on the way the training loop does (``model.set_grad_checkpointing``).

Configs (batch 1):

* det: Mask R-CNN (torchvision, FPN 256, default RCNN settings, 80 classes) on ``paper-det`` vs the plain
  ViTDet-style baseline ``plain-det``, 1024x1024 input, 8 random ground-truth objects with masks.
* seg: UperNet (``--seg-head-channels``, default 512 = mmseg's ViT-B UperNet; ``hpvit train seg`` defaults
  to 128) on ``paper-seg`` vs ``plain-seg``, 640x640 crops (150 classes, ADE20K) and 769x769 crops
  (19 classes, Cityscapes; padded to 800 inside the model).
* each without and with gradient checkpointing.

The plain source is timm's ``vit_base_patch16_224`` with RANDOM weights (never downloaded), written to a
temporary safetensors file that every config is built from.

Measurement: every config runs in a fresh process (peak memory is per process): ``--warmup`` steps
(default 1) then ``--iters`` timed steps (default 3); the median step time is reported.

* CPU: ``time.perf_counter`` around the step; peak memory = the peak resident set size during the step
  (``VmHWM``, reset through ``/proc/self/clear_refs`` right before it) minus the resident size before it
  (the ``hpvit bench --memory-worker`` method): activations, gradients, the AdamW state it allocates, not
  the weights or the runtime. The table shows the fresh process's FIRST step (as ``hpvit bench``) and the
  whole process's peak RSS over all steps (``process_peak_mb``: what the machine must have). Later steps'
  increments are smaller and their pre-step RSS larger, because the C allocator keeps freed memory; every
  step's values are in the JSON (``warmup_peak_mb``, ``peak_mb_all``, ``rss_before_mb``). A guard in the
  parent polls the worker's RSS and kills it above ``--max-rss-gb`` (the row then says ``skipped: would
  need > N GB`` and keeps the steps it completed under ``partial_steps``).
* CUDA (``--device cuda [--dtype bf16]``): bf16 autocast around forward + loss, CUDA events for the step
  time, ``torch.cuda.max_memory_allocated()`` (peak stats reset before the step) minus
  ``torch.cuda.memory_allocated()`` before the step.

Also reported per config: parameter count (whole model and backbone), the number of elements of the
backbone's position-embedding parameter, and per stage the feature-map size at the input, the window
sizes of its blocks and whether a window is larger than the map (and how much padding windows add).

    source /root/.cache/hpvit-ci/venv-x/bin/activate
    python benchmarks/dense_step.py --json benchmarks/results/dense_step_cpu.json \\
        --log benchmarks/results/dense_step_cpu.log                       # the table in docs/performance.md
    python benchmarks/dense_step.py --quick                               # smoke run: ViT-T, small inputs, seconds
    python benchmarks/dense_step.py --device cuda --dtype bf16            # GPU
    python benchmarks/dense_step.py --only det --no-ckpt-off              # a subset
    python benchmarks/dense_step.py --only paper-det --no-ckpt-off --drop-path 0 --merge --json FILE  # add a row
    python benchmarks/dense_step.py --from-json benchmarks/results/dense_step_cpu.json   # print its tables
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import torch

# hpvit imports (one block: module paths may move in a re-layering)
from hpvit.bench import reset_peak_rss, rss_kb
from hpvit.data.segmentation import IGNORE
from hpvit.engine.optim import build_optimizer
from hpvit.engine.recipe import load_recipe
from hpvit.models.detector import build_detector
from hpvit.models.segmenter import build_segmenter
from hpvit.tasks.detection import DetectionTask
from hpvit.tasks.segmentation import SegmentationTask

HIER = {"det": "paper-det", "seg": "paper-seg"}
QUICK_RCNN = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, box_batch_size_per_image=64)
PLAIN = {"det": "plain-det", "seg": "plain-seg"}


# ---------------------------------------------------------------------------------------------- configs
SEG_CLASSES = {640: 150, 769: 19}  # ADE20K crops, Cityscapes crops; other sizes: 150


def config_list(det_sizes: list[int], seg_sizes: list[int], only: list[str], ckpt_modes: list[bool],
                drop_path: float | None = None) -> list[dict[str, Any]]:
    """The measured configs, grouped so that each hierarchical config is next to its plain baseline."""
    seg_sizes = [(s, SEG_CLASSES.get(s, 150)) for s in seg_sizes]
    out = []
    for size in det_sizes:
        for ckpt in ckpt_modes:
            for backbone in (HIER["det"], PLAIN["det"]):
                out.append(dict(task="det", backbone=backbone, img=size, classes=80, ckpt=ckpt))
    for size, classes in seg_sizes:
        for ckpt in ckpt_modes:
            for backbone in (HIER["seg"], PLAIN["seg"]):
                out.append(dict(task="seg", backbone=backbone, img=size, classes=classes, ckpt=ckpt))
    for c in out:
        c["name"] = f"{c['backbone']} {c['img']}px ckpt={'on' if c['ckpt'] else 'off'}"
        if drop_path is not None:
            c["drop_path"] = drop_path
            c["name"] += f" drop_path={drop_path:g}"
    if only:
        out = [c for c in out if any(o in (c["task"], c["backbone"], str(c["img"]), c["name"]) for o in only)]
    return out


# ---------------------------------------------------------------------------------------------- worker
def build(cfg: dict[str, Any], init: str, seg_head_channels: int):
    """(model, task object, recipe) built the way ``hpvit train det|seg`` builds them."""
    if cfg["task"] == "det":
        recipe = load_recipe("det-default").replace(img_size=cfg["img"])
        if cfg.get("drop_path") is not None:
            recipe = recipe.replace(drop_path=cfg["drop_path"])
        model = build_detector(init, cfg["backbone"], cfg["classes"], recipe.img_size, recipe.drop_path,
                               rcnn=cfg.get("rcnn"))
        task = DetectionTask.__new__(DetectionTask)  # only loss() and param_group_kwargs() are used
    else:
        recipe = load_recipe("seg-default").replace(img_size=cfg["img"])
        if cfg.get("drop_path") is not None:
            recipe = recipe.replace(drop_path=cfg["drop_path"])
        model = build_segmenter(init, cfg["backbone"], cfg["classes"], recipe.img_size, recipe.drop_path,
                                channels=seg_head_channels)
        task = SegmentationTask.__new__(SegmentationTask)
    task.recipe = recipe
    cfg["drop_path"] = recipe.drop_path
    return model, task, recipe


def make_batch(cfg: dict[str, Any], device: str, objects: int = 8):
    """A fixed random batch of 1: det (images, targets) with ``objects`` boxes + masks; seg (x, labels)."""
    g = torch.Generator().manual_seed(0)
    s = cfg["img"]
    if cfg["task"] == "det":
        img = torch.rand(3, s, s, generator=g)
        wh = torch.randint(max(8, s // 32), max(16, s // 3), (objects, 2), generator=g)
        xy = (torch.rand(objects, 2, generator=g) * (s - wh)).floor()
        boxes = torch.cat([xy, xy + wh], 1).float()
        masks = torch.zeros(objects, s, s, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        labels = torch.randint(1, cfg["classes"] + 1, (objects,), generator=g)
        t = {"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)}
        return [img.to(device)], [t]
    x = torch.rand(1, 3, s, s, generator=g)
    y = torch.randint(0, cfg["classes"], (1, s, s), generator=g)
    y[:, : s // 16] = IGNORE  # a band of unlabelled pixels, as real crops have
    return x.to(device), y.to(device)


def window_report(body, out_shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Per stage of the backbone's ViT: the map its blocks run on, their window sizes, whether a window is
    larger than the map, and the share of padded tokens a window partition adds."""
    vit = body.vit
    lay = vit.layout
    rows = []
    for s in range(lay.num_stages):
        if lay.depths[s] == 0:
            continue
        # the transformed model's stage s output is pyramid level s; the plain baseline runs at 1/16 (level 2)
        h, w = out_shapes[s] if lay.num_stages == 4 else out_shapes[2]
        idx = [i for i in range(len(lay.windows)) if lay.stage_of[i] == s]
        wins = [lay.windows[i] for i in idx]
        r = dict(stage=s, stride=vit.strides[s], map=[h, w], blocks=idx, windows=wins)
        sized = sorted({ws for ws in wins if ws is not None})
        r["window_larger_than_map"] = any(ws > h or ws > w for ws in sized)
        r["padded_token_share"] = {
            str(ws): round(((h + (-h) % ws) * (w + (-w) % ws)) / (h * w) - 1, 4) for ws in sized
        }
        rows.append(r)
    return rows


def worker(cfg: dict[str, Any], init: str, device: str, dtype: str, threads: int, warmup: int, iters: int,
           seg_head_channels: int) -> dict[str, Any]:
    import gc

    torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, task, recipe = build(cfg, init, seg_head_channels)
    model.train()
    if cfg["ckpt"]:
        model.set_grad_checkpointing(True)  # as the training loop does for grad_checkpointing: true
    model.to(device)
    optimizer = build_optimizer(model, recipe, recipe.absolute_lr(1))
    batch = make_batch(cfg, device)
    body = model.body
    vit = body.vit
    shapes: list[tuple[int, int]] = []

    def record_shapes(module, inputs, outputs) -> None:  # the pyramid maps of the first forward
        if not shapes:
            shapes.extend(tuple(f.shape[-2:]) for f in outputs)

    hook = body.register_forward_hook(record_shapes)
    build_s = time.perf_counter() - t0

    def step() -> float:
        if dtype == "bf16":  # as the training loop's --amp bf16: autocast around forward + loss only
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                loss = task.loss(model, batch)
        else:
            loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    times, peaks, peaks_abs, losses, rss_before = [], [], [], [], []
    for k in range(warmup + iters):
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step())
            end.record()
            torch.cuda.synchronize()
            dt = start.elapsed_time(end) / 1e3
            peak = torch.cuda.max_memory_allocated()
        else:
            base = rss_kb("VmRSS") * 1024
            if not reset_peak_rss():
                raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs not writable)")
            t = time.perf_counter()
            losses.append(step())
            dt = time.perf_counter() - t
            peak = rss_kb("VmHWM") * 1024
        times.append(dt)
        peaks.append(max(peak - base, 0) / 2**20)
        peaks_abs.append(peak / 2**20)
        rss_before.append(base / 2**20)
        print(f"  step {k + 1}/{warmup + iters} ({'warm-up' if k < warmup else 'timed'}): {dt:.2f} s, "
              f"peak {peaks[-1]:.0f} MB above {base / 2**20:.0f} MB, loss {losses[-1]:.3f}", file=sys.stderr, flush=True)
    hook.remove()
    timed, timed_peaks = times[warmup:], peaks[warmup:]
    pe = getattr(vit, "pos_embed", None)
    res = dict(
        cfg,
        status="ok",
        params=sum(p.numel() for p in model.parameters()),
        params_backbone=sum(p.numel() for p in body.parameters()),
        pos_embed_numel=int(pe.numel()) if pe is not None else 0,
        pos_embed_shape=list(pe.shape) if pe is not None else None,
        pos_grid=list(getattr(vit, "pos_grid", None) or []),
        depths=list(vit.layout.depths),
        pyramid_shapes=[list(s) for s in shapes],
        windows=window_report(body, shapes),
        build_s=round(build_s, 2),
        warmup_s=[round(t, 3) for t in times[:warmup]],
        step_s_all=[round(t, 3) for t in timed],
        step_s_median=round(statistics.median(timed), 3) if timed else None,
        peak_mb=round(max(timed_peaks), 1) if timed_peaks else None,
        peak_mb_all=[round(p, 1) for p in timed_peaks],
        warmup_peak_mb=[round(p, 1) for p in peaks[:warmup]],
        rss_before_mb=[round(r, 1) for r in rss_before],
        losses=[round(v, 4) for v in losses],
        threads=torch.get_num_threads(),
    )
    # the whole process's peak during the steps (CPU: RSS incl. weights, AdamW state and runtime; CUDA: allocated)
    res["process_peak_mb"] = round(max(peaks_abs), 1)
    return res


# ---------------------------------------------------------------------------------------------- parent
def _loadavg() -> list[float]:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def _mem_available_gb() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def run_config(cfg: dict[str, Any], args, init: str, log) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg), "--init", init,
           "--device", args.device, "--dtype", args.dtype, "--threads", str(threads_for(cfg, args)),
           "--warmup", str(args.warmup), "--iters", str(args.iters), "--seg-head-channels", str(args.seg_head_channels)]
    limit_kb = int(args.max_rss_gb * 2**20)
    avail = _mem_available_gb()
    if args.device == "cpu" and avail is not None and avail < args.max_rss_gb + 1:
        log(f"  MemAvailable {avail:.1f} GB < guard {args.max_rss_gb} GB + 1 GB: not started")
        return dict(cfg, status=f"skipped: only {avail:.1f} GB available, the guard is {args.max_rss_gb} GB")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    max_rss_kb, killed = 0, None
    err_lines: list[str] = []

    def pump():
        for line in proc.stderr:
            err_lines.append(line)
            if line.startswith("  step"):
                log(line.rstrip())

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    while proc.poll() is None:
        try:
            rss = rss_kb("VmRSS", str(proc.pid))
        except (OSError, RuntimeError):
            rss = 0
        max_rss_kb = max(max_rss_kb, rss)
        if args.device == "cpu" and rss > limit_kb:
            killed = f"skipped: would need > {args.max_rss_gb:g} GB (RSS guard killed the worker at {rss / 2**20:.1f} GB)"
            proc.send_signal(signal.SIGKILL)
            break
        if time.time() - t0 > args.timeout:
            killed = f"failed: over the {args.timeout} s time limit"
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    out = proc.stdout.read()
    proc.wait()
    th.join(timeout=5)
    wall = time.time() - t0
    partial = _parse_steps(err_lines)
    if killed:
        log(f"  {killed}")
        return dict(cfg, status=killed, max_rss_seen_mb=round(max_rss_kb / 1024, 1), wall_s=round(wall, 1),
                    threads=threads_for(cfg, args), partial_steps=partial)
    for line in out.splitlines()[::-1]:
        if line.startswith("{"):
            res = json.loads(line)
            res["max_rss_seen_mb"] = round(max_rss_kb / 1024, 1)
            res["wall_s"] = round(wall, 1)
            return res
    tail = "".join(err_lines)[-1500:]
    log(f"  worker failed (rc {proc.returncode}):\n{tail}")
    return dict(cfg, status=f"failed: rc {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}",
                wall_s=round(wall, 1), threads=threads_for(cfg, args), partial_steps=partial)


STEP_LINE = re.compile(r"step (\d+)/\d+ \((warm-up|timed)\): ([\d.]+) s, peak ([\d.]+) MB above ([\d.]+) MB")


def _parse_steps(lines: list[str]) -> list[dict[str, Any]]:
    """The steps a worker completed before it was stopped, from its progress lines."""
    out = []
    for line in lines:
        m = STEP_LINE.search(line)
        if m:
            out.append(dict(step=int(m[1]), kind=m[2], s=float(m[3]), peak_mb=float(m[4]), rss_before_mb=float(m[5])))
    return out


def threads_for(cfg: dict[str, Any], args) -> int:
    slow = [s.strip() for s in (args.two_thread or "").split(",") if s.strip()]
    return max(args.threads, 2) if any(s == cfg["name"] or s == cfg["backbone"] for s in slow) else args.threads


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """hierarchical / plain ratios of step time, first-step memory and process peak, pairing rows of the same
    task, input and ckpt setting (measured in the same run)."""
    by_key = {(r["task"], r["img"], r["ckpt"], r["backbone"], r["name"].partition(" drop_path=")[2]): r for r in rows}
    for r in rows:
        if r.get("status") == "ok":
            r["first_step_mb"] = (r["warmup_peak_mb"] + r["peak_mb_all"])[0]
        if r["backbone"] != HIER[r["task"]]:
            continue
        p = by_key.get((r["task"], r["img"], r["ckpt"], PLAIN[r["task"]], r["name"].partition(" drop_path=")[2]))
        if p is None or r.get("status") != "ok" or p.get("status") != "ok":
            continue
        p["first_step_mb"] = (p["warmup_peak_mb"] + p["peak_mb_all"])[0]
        r["time_ratio_vs_plain"] = round(r["step_s_median"] / p["step_s_median"], 2)
        r["first_step_mem_ratio_vs_plain"] = round(r["first_step_mb"] / p["first_step_mb"], 2)
        r["process_peak_ratio_vs_plain"] = round(r["process_peak_mb"] / p["process_peak_mb"], 2)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "input", "ckpt", "threads", "params (M)", "pos-embed elements", "first step (MB)",
            "process peak (MB)", "median step (s)", "hier/plain: time", "first-step mem", "process peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        model = ("Mask R-CNN + " if r["task"] == "det" else "UperNet + ") + r["backbone"]
        if " drop_path=" in r["name"]:
            model += f" (drop path {r['name'].partition(' drop_path=')[2]})"
        base = [model, f"{r['img']}x{r['img']}", "on" if r["ckpt"] else "off", str(r.get("threads", "-"))]
        if r.get("status") != "ok":
            note = r.get("status", "?")
            part = r.get("partial_steps") or []
            if part:
                f = part[0]
                note += (f"; its first step completed: {f['s']:.0f} s, {f['peak_mb']:.0f} MB above "
                         f"{f['rss_before_mb']:.0f} MB")
            lines.append("| " + " | ".join(base + [note] + [""] * (len(head) - 5)) + " |")
            continue
        lines.append("| " + " | ".join(base + [
            f"{r['params'] / 1e6:.1f}", f"{r['pos_embed_numel']:,}", f"{r['first_step_mb']:.0f}",
            f"{r['process_peak_mb']:.0f}", f"{r['step_s_median']:.{2 if r['step_s_median'] < 10 else 1}f}", str(r.get("time_ratio_vs_plain", "")),
            str(r.get("first_step_mem_ratio_vs_plain", "")), str(r.get("process_peak_ratio_vs_plain", "")),
        ]) + " |")
    return "\n".join(lines)


def format_windows(rows: list[dict[str, Any]]) -> str:
    lines, seen = [], set()
    for r in rows:
        if r.get("status") != "ok" or (r["backbone"], r["img"]) in seen:
            continue
        seen.add((r["backbone"], r["img"]))
        parts = []
        for w in r["windows"]:
            wins = ",".join("g" if x is None else str(x) for x in w["windows"])
            flag = " WINDOW > MAP" if w["window_larger_than_map"] else ""
            pad = ", ".join(f"w{k}: +{100 * v:.0f}% padded tokens" for k, v in w["padded_token_share"].items())
            parts.append(f"1/{w['stride']} {w['map'][0]}x{w['map'][1]} [{wins}]{flag}{' (' + pad + ')' if pad else ''}")
        lines.append(f"{r['backbone']} {r['img']}px: " + "; ".join(parts))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    ap.add_argument("--two-thread", default="", help="comma-separated config names or backbones run with 2 threads")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--model", default=None, help="timm ViT to take the (random) plain weights from "
                    "(default vit_base_patch16_224; --quick: vit_tiny_patch16_224)")
    ap.add_argument("--seg-head-channels", type=int, default=None, help="UperNet width (default 512; --quick: 64)")
    ap.add_argument("--drop-path", type=float, default=None,
                    help="stochastic depth rate (default: the task's default, 0.1); named in the config names")
    ap.add_argument("--only", default="", help="comma-separated filters: det, seg, a backbone, an input size or a name")
    ap.add_argument("--no-ckpt-off", action="store_true", help="only the runs with gradient checkpointing")
    ap.add_argument("--no-ckpt-on", action="store_true", help="only the runs without gradient checkpointing")
    ap.add_argument("--max-rss-gb", type=float, default=13.0, help="CPU: kill a worker whose RSS exceeds this")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per config")
    ap.add_argument("--det-sizes", default=None, help="comma-separated det input sizes (default 1024; --quick: 128)")
    ap.add_argument("--seg-sizes", default=None, help="comma-separated seg crop sizes (default 640,769; --quick: 97)")
    ap.add_argument("--rcnn", default=None, help="torchvision MaskRCNN arguments as JSON (default: torchvision's; "
                    "--quick: fewer proposals and sampled boxes)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: ViT-T, 128 px det, 97 px seg (padded to 128), 1 warm-up + 1 timed step")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--log", default=None, help="write the progress log here")
    ap.add_argument("--merge", action="store_true", help="with --json: replace/add this run's rows in the existing "
                    "file (re-run single configs); the log is appended to")
    ap.add_argument("--from-json", default=None, help="only print the tables of an existing results file "
                    "(recomputing the ratios; with --json, write it back)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--init", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.seg_head_channels is None:
        args.seg_head_channels = 64 if args.quick else 512

    if args.worker:
        res = worker(json.loads(args.worker), args.init, args.device, args.dtype, args.threads, args.warmup,
                     args.iters, args.seg_head_channels)
        print(json.dumps(res))
        return 0

    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        add_ratios(result["rows"])
        print(format_table(result["rows"]))
        print("\nwindows per stage (g = global attention):\n" + format_windows(result["rows"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
            print(f"wrote {args.json}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    if args.quick:
        args.warmup, args.iters = min(args.warmup, 1), 1
    model_name = args.model or ("vit_tiny_patch16_224" if args.quick else "vit_base_patch16_224")
    logf = open(args.log, "a" if args.merge else "w") if args.log else None

    def log(s: str) -> None:
        print(s, flush=True)
        if logf:
            logf.write(s + "\n")
            logf.flush()

    ckpt_modes = [m for m in (False, True) if not ((m and args.no_ckpt_on) or (not m and args.no_ckpt_off))]
    sizes = lambda v, d: [int(x) for x in (v or d).split(",") if x.strip()]  # noqa: E731
    det_sizes = sizes(args.det_sizes, "128" if args.quick else "1024")
    seg_sizes = sizes(args.seg_sizes, "97" if args.quick else "640,769")
    if args.rcnn is None and args.quick:
        args.rcnn = json.dumps(QUICK_RCNN)
    cfgs = config_list(det_sizes, seg_sizes, [s.strip() for s in args.only.split(",") if s.strip()], ckpt_modes,
                       args.drop_path)
    if args.rcnn:
        for c in cfgs:
            if c["task"] == "det":
                c["rcnn"] = json.loads(args.rcnn)
    t_start = time.time()
    load_before = _loadavg()
    log(f"dense_step: {len(cfgs)} configs, {model_name} (random weights), device {args.device}, {args.dtype}, "
        f"{args.threads} thread(s), {args.warmup} warm-up + {args.iters} timed steps, load average {load_before}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dense_step_") as tmp:
        import timm
        from safetensors.torch import save_file

        torch.manual_seed(0)
        src = timm.create_model(model_name, pretrained=False)
        init = os.path.join(tmp, f"{model_name}_random.safetensors")
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, init)
        del src
        for i, cfg in enumerate(cfgs):
            log(f"[{i + 1}/{len(cfgs)}] {cfg['name']} ({cfg['task']}, {cfg['classes']} classes), "
                f"load {_loadavg()}, MemAvailable {_mem_available_gb():.1f} GB")
            res = run_config(cfg, args, init, log)
            if res.get("status") == "ok":
                log(f"  -> median {res['step_s_median']:.2f} s, peak {res['peak_mb']:.0f} MB, "
                    f"params {res['params'] / 1e6:.1f} M, pos-embed {res['pos_embed_numel']:,} "
                    f"{tuple(res['pos_embed_shape'] or ())}, wall {res['wall_s']:.0f} s")
            rows.append(res)
    old = None
    if args.merge and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)
        new_by_name = {r["name"]: r for r in rows}
        merged = [new_by_name.pop(r["name"], r) for r in old["rows"]]
        rows = merged + list(new_by_name.values())
    add_ratios(rows)
    load_after = _loadavg()
    table = format_table(rows)
    log("")
    log(table)
    log("")
    log("windows per stage (g = global attention):")
    log(format_windows(rows))
    total = time.time() - t_start
    log(f"\ntotal wall time {total:.0f} s, load average before {load_before}, after {load_after}")
    run = dict(
        what="one training step (forward + loss + backward + AdamW step), batch 1, fresh process per config",
        machine=dict(platform=platform.platform(), processor=_cpu_name(), cpus=os.cpu_count(),
                     mem_total_gb=_mem_total_gb(), python=platform.python_version()),
        torch=torch.__version__, device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        dtype=args.dtype, threads=args.threads, two_thread=args.two_thread or None, warmup=args.warmup,
        iters=args.iters, plain_source=f"{model_name} (timm, random weights)",
        seg_head_channels=args.seg_head_channels, rcnn=json.loads(args.rcnn) if args.rcnn else "torchvision defaults",
        max_rss_gb=args.max_rss_gb, quick=args.quick,
        load_average_before=load_before, load_average_after=load_after, total_wall_s=round(total, 1),
        command=" ".join(["python", "benchmarks/dense_step.py"] + sys.argv[1:]),
        configs_run=[c["name"] for c in cfgs],
    )
    if old is not None:  # --merge: the file's first run stays on top, this one is listed under merged_runs
        result = {k: v for k, v in old.items() if k != "rows"}
        result["merged_runs"] = old.get("merged_runs", []) + [run]
        result["rows"] = rows
    else:
        result = dict(run, rows=rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        log(f"wrote {args.json}")
    if logf:
        logf.close()
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mem_total_gb() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
