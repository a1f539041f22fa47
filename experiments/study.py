"""The controlled study of issue 10: plain vs transformed DeiT-Tiny at equal steps, several seeds.

    python experiments/study.py cls  [--seeds 0 1 2] [--parallel 2] [--rows plain paper-cls ...]
    python experiments/study.py seg  [...]
    python experiments/study.py summary

Every row of a task gets the same recipe, image size, data and number of optimizer steps; only the
model changes. Runs go to ``runs/study/<task>/<row>/seed<k>`` (one process and one CPU thread each,
``--parallel`` at a time); ``summary`` writes ``experiments/results/study_<task>.json`` and prints the
markdown tables that README.md and docs/ show (mean and std over seeds, wall time per run).
The ``adapted`` rows start from ``runs/study/adapt/model.safetensors``, written by ``python
experiments/study.py adapt`` (the ``hpvit adapt`` command below, with its default recipe).
Real data is read from ``../shared/data`` (or ``$HPVIT_SHARED_DATA``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HPVIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
DEIT = DATA / "deit_tiny" / "deit_tiny_patch16_224.pth"
CFG = ROOT / "experiments" / "configs"
RUNS = ROOT / "runs" / "study"
ADAPTED = RUNS / "adapt" / "model.safetensors"
OLD_LR = ["--set", "new_param_lr_scale=null"]  # hpvit 0.1: new parameters at their block's decayed lr

ADAPT_CMD = ["adapt", "--init", str(DEIT), "--config", str(CFG / "paper-cls-fixes.json"),
             "--images", str(DATA / "camvid" / "train"), "--images", str(DATA / "camvid" / "val"),
             "--images", str(DATA / "coco" / "coco128-seg"), "--holdout", str(DATA / "imagenet_sample" / "images"),
             "--threads", "2", "--out", str(RUNS / "adapt")]

CLS_COMMON = ["train", "cls", "--data", str(DATA / "cifar10" / "cifar10.zip"), "--recipe", "cifar-mini",
              "--img-size", "112", "--epochs", "3", "--train-images", "1000", "--eval-images", "1000",
              "--set", "eval_every_epochs=3", "--threads", "1"]
CLS_ROWS: dict[str, list[str]] = {
    "plain": ["--init", str(DEIT), "--config", "identity"],
    "plain-nocls": ["--init", str(DEIT), "--config", str(CFG / "plain-nocls.json")],
    "paper-cls": ["--init", str(DEIT), "--config", "paper-cls", *OLD_LR],
    "paper-cls-fixes": ["--init", str(DEIT), "--config", str(CFG / "paper-cls-fixes.json")],
    "adapted": ["--init", str(ADAPTED)],
    "fast-cls-fixes": ["--init", str(DEIT), "--config", str(CFG / "fast-cls-fixes.json")],
    # issue 19: the grid-* presets (phase attention, subsample + conv pools, class token from block 1)
    "grid-cls": ["--init", str(DEIT), "--config", "grid-cls"],
    "grid-fast-cls": ["--init", str(DEIT), "--config", "grid-fast-cls"],
    "grid-lite-cls": ["--init", str(DEIT), "--config", "grid-lite-cls"],
    # diagnostics: the pools with their zero-initialised conv (subconv, as grid-det/grid-seg), the class-token
    # copies averaged, no blocks at 1/32, the 6-px phase (sub_phase=0, with the conv)
    "grid-cls-conv": ["--init", str(DEIT), "--config", str(CFG / "grid-cls-conv.json")],
    "grid-fast-cls-conv": ["--init", str(DEIT), "--config", str(CFG / "grid-fast-cls-conv.json")],
    "grid-lite-cls-conv": ["--init", str(DEIT), "--config", str(CFG / "grid-lite-cls-conv.json")],
    "grid-cls-mean": ["--init", str(DEIT), "--config", str(CFG / "grid-cls-mean.json")],
    "grid-0-0-12-0": ["--init", str(DEIT), "--config", str(CFG / "grid-0-0-12-0.json")],
    "grid-lite-cls-p0": ["--init", str(DEIT), "--config", str(CFG / "grid-lite-cls-p0.json")],
}

SEG_COMMON = ["train", "seg", "--data", str(DATA / "camvid"), "--layout", "camvid", "--base-size", "240",
              "--img-size", "128", "--batch-size", "4", "--epochs", "2", "--lr", "3e-4", "--warmup-epochs", "0.1",
              "--workers", "1", "--threads", "1"]
SEG_ROWS: dict[str, list[str]] = {
    "plain-seg": ["--init", str(DEIT), "--config", "plain-seg"],
    "paper-seg": ["--init", str(DEIT), "--config", "paper-seg", *OLD_LR],
    "paper-seg-fixes": ["--init", str(DEIT), "--config", str(CFG / "paper-seg-fixes.json")],
    "adapted": ["--init", str(ADAPTED)],
    "grid-seg": ["--init", str(DEIT), "--config", "grid-seg"],
    "grid-seg-conv": ["--init", str(DEIT), "--config", str(CFG / "grid-seg-conv.json")],  # pools with the zero conv
}

# coco128: train on images 1-100, evaluate on 101-128 (box and mask AP); sized so that plain-det reaches
# clearly non-zero box AP on the 2-core CPU (see docs/dense.md)
COCO = DATA / "coco" / "coco128-seg"
DET_COMMON = ["train", "det", "--ann", str(COCO / "instances_coco128seg_train2017.json"), "--images", str(COCO / "images" / "train2017"),
              "--train-images", "0:100", "--eval-images", "100:128", "--img-size", "320", "--epochs", "12",
              "--batch-size", "2", "--lr", "2e-4", "--warmup-epochs", "1", "--workers", "1", "--threads", "1"]
DET_ROWS: dict[str, list[str]] = {
    "plain-det": ["--init", str(DEIT), "--config", "plain-det"],
    "paper-det": ["--init", str(DEIT), "--config", "paper-det"],
    "grid-det": ["--init", str(DEIT), "--config", "grid-det"],
}
TASKS = {"cls": (CLS_COMMON, CLS_ROWS, "top1"), "seg": (SEG_COMMON, SEG_ROWS, "mIoU"),
         "det": (DET_COMMON, DET_ROWS, "bbox_AP")}


def hpvit_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "hpvit", *args]


def run_one(task: str, row: str, seed: int) -> dict:
    common, rows, _ = TASKS[task]
    out = RUNS / task / row / f"seed{seed}"
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = hpvit_cmd([*common, *rows[row], "--seed", str(seed), "--out", str(out), "--overwrite"])
    env = dict(os.environ, OMP_NUM_THREADS="1", HPVIT_PLAIN_LOG="1")
    t = time.time()
    with open(out.parent / f"seed{seed}.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    print(f"{task}/{row}/seed{seed}: rc {rc} in {time.time() - t:.0f}s", flush=True)
    return json.loads((out / "results.json").read_text()) if rc == 0 else {}


def summarise(task: str) -> dict:
    _, rows, metric = TASKS[task]
    table = {}
    for row in rows:
        res = []
        for p in sorted((RUNS / task / row).glob("seed*/results.json")):
            r = json.loads(p.read_text())
            res.append({"seed": int(p.parent.name[4:]), metric: r.get(metric), "wall_time_s": r.get("wall_time_s"),
                        "steps": r.get("steps"), "gflops_per_image": r.get("gflops_per_image")})
        vals = [r[metric] for r in res if r[metric] is not None]
        if vals:
            table[row] = {"runs": res, "mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                          "n": len(vals), "wall_s_mean": statistics.mean(r["wall_time_s"] for r in res),
                          "command": " ".join(["hpvit", *TASKS[task][0], *rows[row], "--seed", "K"]).replace(str(DATA), "$DATA").replace(str(ROOT) + "/", "")}
    out = ROOT / "experiments" / "results" / f"study_{task}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file():  # rows not re-run here keep their earlier results (and say so)
        for row, old in json.loads(out.read_text()).items():
            if row not in table:
                table[row] = dict(old, reused="earlier study run (not re-run this time)") if "reused" not in old else old
    out.write_text(json.dumps(table, indent=2))
    print(f"\n{task}: {metric} (mean +- std over seeds)\n| row | {metric} | seeds | per-seed | steps | wall s/run |\n|---|---|---|---|---|---|")
    for row, t in table.items():
        per = ", ".join(f"{r[metric]:.2f}" for r in t["runs"])
        print(f"| {row} | {t['mean']:.2f} +- {t['std']:.2f} | {t['n']} | {per} | {t['runs'][0]['steps']} | {t['wall_s_mean']:.0f} |")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("cls", "seg", "adapt", "summary"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--rows", nargs="+", default=None)
    args = ap.parse_args()
    if args.what == "summary":
        for task in TASKS:
            summarise(task)
        return
    if args.what == "adapt":
        if not ADAPTED.is_file():
            subprocess.check_call(hpvit_cmd(ADAPT_CMD), cwd=str(ROOT), env=dict(os.environ, HPVIT_PLAIN_LOG="1"))
        return
    rows = args.rows or list(TASKS[args.what][1])
    jobs = [(args.what, r, s) for s in args.seeds for r in rows]
    with ThreadPoolExecutor(args.parallel) as ex:
        list(ex.map(lambda j: run_one(*j), jobs))
    summarise(args.what)


if __name__ == "__main__":
    main()
