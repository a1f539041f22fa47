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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ..errors import RunDirError
from ..utils import atomic_write, write_error, write_text_atomic


def log(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(f"[hpvit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """One epoch's progress: a tqdm bar when stderr is a terminal, else a log line at the first step, every
    ``every`` steps, at the last step, and whenever ``quiet_s`` seconds passed without one (a slow detection or
    segmentation step still shows progress from the start)."""

    quiet_s = 30.0

    def __init__(self, total: int, desc: str, enabled: bool = True, every: int = 20, initial: int = 0,
                 unit_scale: int = 1, force_plain: bool | None = None, unit: str = "step"):
        self.total, self.desc, self.enabled, self.every = total, desc, enabled, max(every, 1)
        self.n, self.unit_scale = initial, unit_scale
        self.t0, self.n0 = time.time(), initial
        self.t_line = self.t0
        plain = force_plain if force_plain is not None else not sys.stderr.isatty()
        if os.environ.get("HPVIT_PLAIN_LOG"):
            plain = True
        self.bar = None
        if enabled and not plain:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=True)

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
        now = time.time()
        if (self.n % self.every == 0 or self.n == self.total or self.n == self.n0 + 1
                or now - self.t_line >= self.quiet_s):
            self.t_line = now
            dt = now - self.t0
            rate = (self.n - self.n0) / dt if dt > 0 else float("nan")
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            parts = [f"{self.desc} {self.n}/{self.total}"]
            if metrics:
                parts.append(" ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            parts += [f"{rate * self.unit_scale:.1f} img/s", f"ETA {_fmt_time(eta)}"]
            log(" | ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# the recipe keys a user most needs to see at the start of a run, in this order
RECIPE_HEADLINE = ("epochs", "batch_size", "accum_steps", "blr", "lr", "warmup_epochs", "img_size", "layer_decay",
                   "drop_path", "mixup", "cutmix", "amp", "num_workers", "max_train_samples", "max_eval_samples")
# recipe keys shown under the command-line flag that sets them (--train-images N, --eval-images N)
HEADLINE_NAMES = {"max_train_samples": "train_images", "max_eval_samples": "eval_images"}


def _fmt_value(v: Any) -> str:
    """Numbers for people: integers with thousands separators (never ``1e+04``), others to 4 significant digits."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def recipe_summary(recipe: Any, batch_mixing: bool = True) -> str:
    """One line naming the recipe and its headline settings: ``None`` entries left out, ``blr`` left out when
    ``lr`` is set (``lr`` wins), mixup / cutmix left out when the task mixes no batches (``batch_mixing``)."""
    d = recipe.to_dict()
    unused = ({"blr"} if d.get("lr") is not None else set()) | (set() if batch_mixing else {"mixup", "cutmix"})
    keys = [k for k in RECIPE_HEADLINE if d.get(k) is not None and k not in unused]
    return f"recipe {d.get('name', 'custom')}: " + ", ".join(f"{HEADLINE_NAMES.get(k, k)} {_fmt_value(d[k])}" for k in keys)


def format_summary(epoch: int, epochs: int, rec: dict[str, Any], keys: "tuple[str, ...]", units: dict[str, str],
                   train_s: float, eval_s: float, metrics_path: "Path | str") -> str:
    """The one line logged per epoch: the headline metrics (with their units) and where the rest is."""
    shown = []
    for k in keys:
        if k in rec:
            unit = units.get(k, "")
            shown.append(f"{k} {_fmt_value(rec[k])}{'%' if unit.startswith('%') else ''}")
            if "ema_" + k in rec:
                shown.append(f"EMA {k} {_fmt_value(rec['ema_' + k])}{'%' if unit.startswith('%') else ''}")
    where = f"{rec.get('split', 'eval')}, {_fmt_value(rec['images'])} images" if "images" in rec else rec.get("split", "")
    return (f"epoch {epoch}/{epochs}: " + ", ".join(shown) + f" ({where}; {train_s:.0f}s train, {eval_s:.0f}s eval; "
            f"all metrics in {metrics_path})")


def finite_json(x: Any) -> Any:
    """``x`` with every NaN / inf float replaced by None: JSON has no NaN (``json.dumps`` would write an invalid
    ``NaN`` token that strict readers refuse)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


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
        if self.enabled and (self.path.exists() or self.path.is_symlink()):
            try:
                self.path.unlink()
            except OSError as e:  # e.g. a folder of that name
                raise write_error(self.path, e) from e

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(finite_json(record), allow_nan=False) + "\n")
        except OSError as e:
            raise write_error(self.path, e) from e

    def read(self) -> list[dict[str, Any]]:
        """The records; a last line cut short (the process was killed while appending it) is dropped, any other
        line that is not a JSON object is an error naming it."""
        if not self.path.exists():
            return []
        lines = [(i, ln) for i, ln in enumerate(self.path.read_text().splitlines(), 1) if ln.strip()]
        out = []
        for k, (i, ln) in enumerate(lines):
            try:
                rec = json.loads(ln)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                out.append(rec)
            elif k < len(lines) - 1 or not ln.lstrip().startswith("{") or ln.rstrip().endswith("}"):
                raise RunDirError(f"{self.path}: line {i} is not a metrics record ({ln[:60]!r}); the file was edited. "
                                  "Fix or delete that line, or start the run over with --overwrite")
        return out


def plot_curves(records: Iterable[dict[str, Any]], path: Path, metric: str = "top1",
                empty_note: str = "no evaluation yet", units: "dict[str, str] | None" = None) -> None:
    """Training loss per logged step and evaluation ``metric`` per epoch, side by side; every logged point
    is drawn with a marker, so a run with a single record still shows it. ``empty_note`` fills the evaluation
    panel when there is no evaluation record; ``units`` (the task's metric_units) names the metric's unit."""
    recs = list(records)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    _loss_panel(a, [r for r in recs if r.get("kind") == "train"])
    _eval_panel(b, [r for r in recs if r.get("kind") == "eval"], metric, empty_note,
                (units or {}).get(metric, "%" if metric in PERCENT_METRICS else ""))
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), force=True)
    finally:
        plt.close(fig)


def _loss_panel(a, tr: list[dict[str, Any]]) -> None:
    """The training loss of every logged step; with few points, one tick per step (and each value written)."""
    if tr:
        a.plot([r["step"] for r in tr], [r["loss"] for r in tr], "o-", lw=1, ms=4, label="training loss")
        a.legend()
    else:
        a.text(0.5, 0.5, "no training loss logged yet", ha="center", va="center", transform=a.transAxes)
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    steps = sorted({r["step"] for r in tr})
    if 0 < len(steps) <= 12:  # few points: one tick per logged step (no fractional steps), each value written
        a.set_xticks(steps)
        a.margins(x=0.15, y=0.2)
        if len(steps) <= 3:
            for r in tr:
                a.annotate(f"{r['loss']:.3g}", (r["step"], r["loss"]), textcoords="offset points", xytext=(0, 6),
                           ha="center", fontsize=8)
    a.set_xlabel("optimizer step")
    a.set_ylabel("training loss")
    a.set_title(f"training loss ({len(tr)} logged point{'s' if len(tr) != 1 else ''})")
    a.grid(alpha=0.3)


def _eval_panel(b, ev: list[dict[str, Any]], metric: str, empty_note: str, unit: str) -> None:
    """``metric`` (and its EMA) per evaluated epoch, each value written; ``empty_note`` when nothing was evaluated."""
    pct = unit.startswith("%")
    if ev:
        xs = [r["epoch"] for r in ev]
        b.plot(xs, [r.get(metric, float("nan")) for r in ev], "o-", ms=6, label=metric)
        if "ema_" + metric in ev[-1]:
            b.plot(xs, [r.get("ema_" + metric, float("nan")) for r in ev], "s--", ms=6, label="EMA " + metric)
        for x, r in zip(xs, ev):
            if isinstance(r.get(metric), (int, float)):
                b.annotate(f"{r[metric]:.3g}{'%' if pct else ''}", (x, r[metric]), textcoords="offset points",
                           xytext=(0, 6), ha="center", fontsize=8)
        b.set_xticks(sorted(set(xs)))
        b.margins(x=0.1, y=0.15)
        _readable_span(b, [r[metric] for r in ev if isinstance(r.get(metric), (int, float))], pct)
        b.legend()
    else:
        b.text(0.5, 0.5, empty_note, ha="center", va="center", transform=b.transAxes)
    split = ev[-1].get("split") if ev else None
    b.set_xlabel("epoch")
    b.set_ylabel(metric + (f" ({_short_unit(unit)})" if unit else ""), fontsize=9)
    if unit and len(unit) > 20:  # the unit in words under the panel
        b.text(0.5, -0.2, f"{metric}: {unit}", transform=b.transAxes, ha="center", va="top", fontsize=8, wrap=True)
    b.set_title(f"evaluation{' on ' + str(split) if split and split != 'eval' else ''}")
    b.grid(alpha=0.3)


def _readable_span(b, vals: list[float], pct: bool) -> None:
    """A flat curve (or a single point) gets a y span wide enough to read, instead of matplotlib's tiny one."""
    if vals and max(vals) - min(vals) < (5.0 if pct else 0.02):
        mid, half = (max(vals) + min(vals)) / 2, (5.0 if pct else max(0.02, 0.2 * abs(max(vals))))
        lo, hi = mid - half, mid + half
        if pct:
            lo, hi = max(lo, -1.0), min(hi, 101.0)
        b.set_ylim(lo, hi)


def _short_unit(unit: str) -> str:
    """The axis label's part of a unit in words: "%" for a percentage, else the words before the first comma."""
    return "%" if unit.startswith("%") else unit.split(",")[0].split(" (")[0][:40]


PERCENT_METRICS = {"top1", "top5", "mIoU", "mAcc", "aAcc", "bbox_AP", "segm_AP", "bbox_AP50", "agreement_top1"}
