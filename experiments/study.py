"""The decisive study (issue 26): plain vs transformed DeiT-Tiny at equal optimizer steps, paired seeds.

    python experiments/study.py cls  [--seeds 0 1 2] [--parallel 2] [--rows plain grid-lite-cls ...]
    python experiments/study.py seg  [...]
    python experiments/study.py det  [...]
    python experiments/study.py summary                    # experiments/results/study_{cls,seg,det}.json
    python experiments/study.py cls --device cuda          # the same rows on a GPU machine

Every row of a task gets the same recipe, image size, data, data order and number of optimizer steps; only
the model changes. Seeds are *paired*: seed K gives every row of a task the same data order, the same
augmentation draws and the same head initialisation (``--seed K`` seeds one generator for all of them), so
the difference ``row - baseline`` of seed K is one paired sample. The summary reports, per row, the mean and
std over seeds and, against the task's baseline, the mean paired difference with its 95% interval
(Student's t, ``n - 1`` degrees of freedom). A run that fails is kept in the file as failed, with its log,
and its row's statistics say so; it is never dropped from a mean silently.

Budgets (5x issue 19's optimizer steps): CIFAR-10 468 steps (5,000 training images, 3 epochs, batch 32,
112 px), scored on all 10,000 test images; CamVid 910 steps (10 epochs of 367 images, batch 4, 128-px crops),
scored on the 101 val images; Penn-Fudan 306 steps (6 epochs of 102 images, batch 2, 320-px longer side,
the ``det-small`` recipe and its RCNN settings), scored on the 34 val images after 3 and 6 epochs.
The equal-compute rows run the plain baseline at the input size whose backbone FLOPs come closest to the
recommended preset's (see ``docs/study.md``).

Runs go to ``$HPVIT_STUDY_RUNS/<task>/<row>/seed<k>`` (default ``runs/study``), one process and one CPU
thread each, ``--parallel`` at a time, with the code of the checkout this file is in (``PYTHONPATH``).
Real data is read from ``../shared/data`` (or ``$HPVIT_SHARED_DATA``).
"""

from __future__ import annotations

import argparse
import json
import math
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
RUNS = Path(os.environ.get("HPVIT_STUDY_RUNS", ROOT / "runs" / "study"))
RESULTS = ROOT / "experiments" / "results"

CLS_COMMON = ["train", "cls", "--data", str(DATA / "cifar10" / "cifar10.zip"), "--recipe", "cifar-mini",
              "--img-size", "112", "--epochs", "3", "--train-images", "5000",
              "--set", "eval_every_epochs=3", "--threads", "1"]
SEG_COMMON = ["train", "seg", "--data", str(DATA / "camvid"), "--layout", "camvid", "--base-size", "240",
              "--img-size", "128", "--batch-size", "4", "--epochs", "10", "--lr", "3e-4", "--warmup-epochs", "0.5",
              "--workers", "1", "--threads", "1"]
PF = DATA / "pennfudan"
DET_COMMON = ["train", "det", "--ann", str(PF / "instances_train.json"), "--data", str(PF / "images"),
              "--eval-ann", str(PF / "instances_val.json"), "--recipe", "det-small", "--img-size", "320",
              "--epochs", "6", "--set", "eval_every_epochs=3", "--workers", "1", "--threads", "1"]


def model(config: str, *extra: str) -> list[str]:
    return ["--model", str(DEIT), "--config", config, *extra]


TASKS: dict[str, dict] = {
    "cls": dict(common=CLS_COMMON, metric="top1", baseline="plain", rows={
        "plain": model("identity"),
        "grid-lite-cls": model("grid-lite-cls"),
        "grid-cls": model("grid-cls"),
        "paper-cls": model("paper-cls"),
    }),
    "seg": dict(common=SEG_COMMON, metric="mIoU", baseline="plain-seg", rows={
        "plain-seg": model("plain-seg"),
        "grid-seg": model("grid-seg"),
        "paper-seg": model("paper-seg"),
        # equal compute: the plain baseline on 2x larger crops (and images), about grid-seg's backbone FLOPs
        "plain-seg-256": model("plain-seg", "--img-size", "256", "--base-size", "480"),
    }),
    "det": dict(common=DET_COMMON, metric="bbox_AP", baseline="plain-det", rows={
        "plain-det": model("plain-det"),
        "grid-det": model("grid-det"),
        "paper-det": model("paper-det"),
        # equal compute: the plain baseline at a 2x longer side, about grid-det's backbone FLOPs
        "plain-det-640": model("plain-det", "--img-size", "640"),
    }),
}
EQUAL_COMPUTE = {"plain-seg-256", "plain-det-640"}

# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def hpvit_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "hpvit", *args]


def row_command(task: str, row: str) -> str:
    t = TASKS[task]
    return (" ".join(["hpvit", *t["common"], *t["rows"][row], "--seed", "K"])
            .replace(str(DATA), "$DATA").replace(str(ROOT) + "/", ""))


def run_one(task: str, row: str, seed: int, device: str = "cpu") -> None:
    t = TASKS[task]
    out = RUNS / task / row / f"seed{seed}"
    if (out / "results.json").is_file():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = ["--device", device] if device != "cpu" else []
    cmd = hpvit_cmd([*t["common"], *t["rows"][row], *extra, "--seed", str(seed), "--out", str(out), "--overwrite"])
    env = dict(os.environ, OMP_NUM_THREADS="1", HPVIT_PLAIN_LOG="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.time()
    log_path = out.parent / f"seed{seed}.log"
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    if rc != 0:
        (out.parent / f"seed{seed}.failed").write_text(json.dumps({"rc": rc, "log": str(log_path)}))
    print(f"{task}/{row}/seed{seed}: rc {rc} in {time.time() - start:.0f}s", flush=True)


def interval(diffs: list[float]) -> dict:
    """Mean of paired differences and its two-sided 95% Student-t interval."""
    n = len(diffs)
    m = statistics.mean(diffs)
    if n < 2:
        return {"n": n, "mean": m, "ci95": None}
    half = T975[min(n - 1, len(T975)) - 1] * statistics.stdev(diffs) / math.sqrt(n)
    return {"n": n, "mean": m, "ci95": [m - half, m + half], "above_zero": m - half > 0, "below_zero": m + half < 0}


def eval_curves(row_dir: Path, metric: str) -> dict[int, dict[int, float]]:
    """``{seed: {step: metric}}`` from every ``seed*/metrics.jsonl`` eval record under ``row_dir``."""
    out: dict[int, dict[int, float]] = {}
    for m in sorted(row_dir.glob("seed*/metrics.jsonl")) if row_dir.is_dir() else []:
        seed = int(m.parent.name[4:])
        for line in m.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("kind") == "eval" and r.get(metric) is not None:
                out.setdefault(seed, {})[int(r["step"])] = float(r[metric])
    return out


def summarise(task: str) -> dict:
    t = TASKS[task]
    metric, base = t["metric"], t["baseline"]
    table: dict = {}
    per_seed: dict[str, dict[int, float]] = {}
    for row in t["rows"]:
        d = RUNS / task / row
        runs, vals = [], {}
        for seed_dir in sorted(d.glob("seed*")) if d.is_dir() else []:
            if not seed_dir.is_dir():
                continue
            seed = int(seed_dir.name[4:])
            res_p, fail_p = seed_dir / "results.json", d / f"seed{seed}.failed"
            if res_p.is_file():
                r = json.loads(res_p.read_text())
                runs.append({"seed": seed, metric: r.get(metric), "wall_time_s": r.get("wall_time_s"),
                             "steps": r.get("steps"), "gflops_per_image": r.get("gflops_per_image")})
                if r.get(metric) is not None:
                    vals[seed] = float(r[metric])
            elif fail_p.is_file():
                f = json.loads(fail_p.read_text())
                runs.append({"seed": seed, "status": "failed", "rc": f["rc"],
                             "log": os.path.relpath(f["log"], ROOT)})
        if not runs:
            continue
        v = list(vals.values())
        failed = sum(1 for r in runs if r.get("status") == "failed")
        table[row] = {"command": row_command(task, row), "runs": runs, "n": len(v), "failed": failed,
                      "mean": statistics.mean(v) if v else None,
                      "std": statistics.stdev(v) if len(v) > 1 else None,
                      "equal_compute": row in EQUAL_COMPUTE,
                      "wall_s_mean": statistics.mean(r["wall_time_s"] for r in runs if r.get("wall_time_s")) if v else None}
        per_seed[row] = vals
    for row, vals in per_seed.items():
        if row == base or base not in per_seed:
            continue
        seeds = sorted(set(vals) & set(per_seed[base]))
        if seeds:
            table[row]["vs_baseline"] = dict(interval([vals[s] - per_seed[base][s] for s in seeds]), seeds=seeds)
    # every evaluation a run logged (finished or not), by optimizer step: the learning curves, and the paired
    # difference at each step where the baseline and the row were both scored (an equal-step comparison at an
    # intermediate point of the same schedule, for runs the session could not finish)
    curves = {row: eval_curves(RUNS / task / row, metric) for row in t["rows"]}
    for row, c in curves.items():
        if row in table and c:
            table[row]["curve"] = {str(k): v for k, v in c.items()}
        if row == base or row not in table or not c or not curves.get(base):
            continue
        at = {}
        for step in sorted({st for per in c.values() for st in per}):
            seeds = [k for k in c if step in c[k] and step in curves[base].get(k, {})]
            if seeds:
                at[str(step)] = dict(interval([c[k][step] - curves[base][k][step] for k in seeds]), seeds=seeds)
        table[row]["vs_baseline_by_step"] = at
    out = {"baseline": base, "metric": metric, **table}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"study_{task}.json"
    if path.is_file():  # keep what was decided by hand (recommended, notes) across re-summaries
        old = json.loads(path.read_text())
        for k in ("recommended", "notes", "budget", "device"):
            if k in old:
                out[k] = old[k]
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{task}: {metric}, mean +- std over seeds; paired difference to {base} with its 95% interval")
    print("| row | mean +- std | seeds | per seed | diff to baseline [95% CI] | steps | wall s/run |\n|---|---|---|---|---|---|---|")
    for row, r in table.items():
        per = ", ".join(f"{x[metric]:.2f}" if x.get(metric) is not None else "failed" for x in r["runs"])
        vb = r.get("vs_baseline")
        ci = ("" if not vb else f"{vb['mean']:+.2f}" + (f" [{vb['ci95'][0]:+.2f}, {vb['ci95'][1]:+.2f}]" if vb["ci95"] else ""))
        ms = "-" if r["mean"] is None else f"{r['mean']:.2f}" + (f" +- {r['std']:.2f}" if r["std"] is not None else "")
        steps = next((x["steps"] for x in r["runs"] if x.get("steps")), "-")
        wall = "-" if r["wall_s_mean"] is None else f"{r['wall_s_mean']:.0f}"
        print(f"| {row} | {ms} | {r['n']}{' (+' + str(r['failed']) + ' failed)' if r['failed'] else ''} | {per} | {ci} | {steps} | {wall} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("cls", "seg", "det", "summary"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--rows", nargs="+", default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: the same commands with --device cuda")
    args = ap.parse_args()
    if args.what == "summary":
        for task in TASKS:
            summarise(task)
        return
    rows = args.rows or list(TASKS[args.what]["rows"])
    unknown = [r for r in rows if r not in TASKS[args.what]["rows"]]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; {args.what} has {list(TASKS[args.what]['rows'])}")
    jobs = [(args.what, r, s, args.device) for s in args.seeds for r in rows]
    with ThreadPoolExecutor(args.parallel) as ex:
        list(ex.map(lambda j: run_one(*j), jobs))
    summarise(args.what)


if __name__ == "__main__":
    main()
