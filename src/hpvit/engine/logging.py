"""What the user sees: a progress bar on a terminal (rate, ETA, loss), plain log lines otherwise;
metrics appended to ``metrics.jsonl``; loss/accuracy curves in ``curves.png``."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from ..checkpoints.io import atomic_write, write_error, write_text_atomic


def log(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(f"[hpvit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """One epoch's progress: a tqdm bar when stderr is a terminal, else a log line every ``every`` steps."""

    def __init__(self, total: int, desc: str, enabled: bool = True, every: int = 20, initial: int = 0,
                 unit_scale: int = 1, force_plain: bool | None = None):
        self.total, self.desc, self.enabled, self.every = total, desc, enabled, max(every, 1)
        self.n, self.unit_scale = initial, unit_scale
        self.t0, self.n0 = time.time(), initial
        plain = force_plain if force_plain is not None else not sys.stderr.isatty()
        if os.environ.get("HPVIT_PLAIN_LOG"):
            plain = True
        self.bar = None
        if enabled and not plain:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=True)
            except ImportError:
                self.bar = None

    def update(self, **metrics: float) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            dt = time.time() - self.t0
            post = {k: f"{v:.4g}" for k, v in metrics.items()}
            if dt > 0 and self.unit_scale > 1:
                post["img/s"] = f"{(self.n - self.n0) * self.unit_scale / dt:.1f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
            return
        if self.n % self.every == 0 or self.n == self.total:
            dt = time.time() - self.t0
            rate = (self.n - self.n0) / dt if dt > 0 else float("nan")
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            ms = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            log(f"{self.desc} {self.n}/{self.total} | {ms} | {rate * self.unit_scale:.1f} img/s | ETA {_fmt_time(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsFile:
    """Append-only ``metrics.jsonl``; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.read() if ln.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise write_error(self.path, e) from e

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def plot_curves(records: Iterable[dict[str, Any]], path: Path, metric: str = "top1") -> None:
    """Training loss per logged step and evaluation ``metric`` per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = list(records)
    tr = [r for r in recs if r.get("kind") == "train"]
    ev = [r for r in recs if r.get("kind") == "eval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    if tr:
        a.plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=1)
    a.set_xlabel("optimizer step")
    a.set_ylabel("training loss")
    a.set_title("loss")
    a.grid(alpha=0.3)
    if ev:
        xs = [r["epoch"] for r in ev]
        b.plot(xs, [r[metric] for r in ev], "o-", label=metric)
        if "ema_" + metric in ev[-1]:
            b.plot(xs, [r.get("ema_" + metric, float("nan")) for r in ev], "s--", label="EMA " + metric)
        b.legend()
    b.set_xlabel("epoch")
    b.set_ylabel(f"{metric} (%)")
    b.set_title("evaluation")
    b.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), force=True)
    finally:
        plt.close(fig)
