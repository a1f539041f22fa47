"""``hpvit bench``: speed and memory of hpvit presets against timm's ViT, Hiera and Swin, in one run.

What is measured (per model and batch size):

* ``params_m``: parameters (millions). ``gflops``: forward GFLOPs per image, counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add; attention matmuls included).
* ``latency_ms`` / ``img_per_s``: median wall time of one forward of a batch. All models are timed in
  ONE process, round-robin (every round runs each model once, in order), so that load from other
  processes hits every model alike; ``--warmup`` rounds are discarded. CPU: ``time.perf_counter``;
  CUDA: CUDA events, bf16 autocast with ``--dtype bf16``.
* ``achieved_gflops_per_s`` = ``gflops * img_per_s``; ``matmul_gflops_per_s`` (top level) is the
  median GFLOP/s of a large square GEMM timed in the same rounds: the machine's practical ceiling.
* ``peak_mem_infer_mb`` / ``peak_mem_train_mb`` (/ ``peak_mem_train_ckpt_mb`` with gradient
  checkpointing): peak memory of one inference forward / one training step (forward, cross-entropy,
  backward, SGD step), each in a fresh process. CUDA: ``max_memory_allocated`` above the memory
  held before the step. CPU: the peak resident set size during the step (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before it) minus the resident size before it -- i.e. activations,
  gradients and temporaries, not the weights, the input or the Python/torch runtime.
* with ``--compile``: ``latency_ms_compiled`` / ``img_per_s_compiled`` of ``torch.compile(model)``.

Model names: timm's (``vit_base_patch16_224``, ``hiera_base_224``, ``swin_base_patch4_window7_224``
and the tiny/small counterparts) and ``hpvit-{T,S,B}/<variant>`` for the transformed timm ViT of that
size; variants: ``paper-cls`` (avg+conv pools merged by ``reparameterize()``, the deployed form),
``paper-cls-avg`` (parameter-free average pools only), ``paper-cls-naive`` (the straightforward
implementation this library started from: window partition per block, no chunking, out-of-place
activations), ``fast-cls`` and ``lite-cls`` (efficiency presets, merged), ``grid-cls``, ``grid-fast-cls``,
``grid-lite-cls`` (phase attention, subsample + conv pools, merged), and the dense backbones
``paper-det``, ``grid-det``, ``plain-det`` (forward -> the 4 maps; inference memory only). ``--models`` also takes the
groups ``base`` (default), ``small``, ``tiny`` and ``all``. See docs/performance.md.
"""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import matplotlib
import timm
import torch
import torch.nn.functional as F
from torch import nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import get_config  # noqa: E402
from .models.build import from_plain  # noqa: E402
from .models.dense import build_dense_backbone  # noqa: E402
from .utils import atomic_write, count_flops  # noqa: E402

SIZES = {"T": "tiny", "S": "small", "B": "base"}
TIMM_FAMILY = {
    "vit": "vit_{size}_patch16_224",
    "hiera": "hiera_{size}_224",
    "swin": "swin_{size}_patch4_window7_224",
}
HPVIT_VARIANTS = ("paper-cls", "paper-cls-avg", "paper-cls-naive", "fast-cls", "lite-cls",
                  "grid-cls", "grid-fast-cls", "grid-lite-cls")
# dense backbones (forward -> the 4 maps at strides 4..32, as Mask R-CNN / UperNet get them), for the
# image-size sweep (benchmarks/deployment.py); timed and counted like the classifiers, inference memory only
DENSE_VARIANTS = ("paper-det", "grid-det", "plain-det")
MEMORY_MODES = ("infer", "train", "train_ckpt")
GROUP_VARIANTS = ("paper-cls", "paper-cls-avg", "paper-cls-naive", "fast-cls", "lite-cls", "grid-cls", "grid-lite-cls")
JSON_KEYS = ("name", "params_m", "gflops", "batch", "img_per_s", "latency_ms", "achieved_gflops_per_s",
             "peak_mem_infer_mb", "peak_mem_train_mb")


# ---------------------------------------------------------------------------------------------- models
def group_models(group: str) -> list[str]:
    """Model names of a size group (``tiny``, ``small``, ``base``) or ``all``."""
    if group == "all":
        return [n for g in ("tiny", "small", "base") for n in group_models(g)]
    letter = {v: k for k, v in SIZES.items()}[group]
    names = [TIMM_FAMILY[f].format(size=group) for f in ("vit", "hiera", "swin")]
    return names + [f"hpvit-{letter}/{v}" for v in GROUP_VARIANTS]


def resolve_models(spec: str) -> list[str]:
    out: list[str] = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        names = group_models(item) if item in ("all", "tiny", "small", "base") else [item]
        for n in names:
            if n not in out:
                out.append(n)
    return out


class NaiveHPViT(nn.Module):
    """The straightforward forward of a transformed model, kept as the benchmark's "before": each
    block partitions and un-partitions its own windows (``Block.forward`` on maps), no chunking, and
    grad mode stays on so that activations are computed out of place (parameters must not require
    grad when timing)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        with torch.enable_grad():
            y, pre = m.embed(x), None
            for s in range(m.layout.num_stages):
                if m.layout.depths[s] == 0 and s > 0:
                    y = m.empty_stages[str(s)](y)
                start = sum(m.layout.depths[:s])
                for i in range(start, start + m.layout.depths[s]):
                    blk = m.blocks[i]
                    if pre is None and m.join and i == m.join_block:
                        pre = m.prefix_tokens(y.shape[0])  # the class token joins (class_token='join')
                    if pre is not None:
                        y, pre = self._with_prefix(blk, y, pre)
                    elif m.grad_checkpointing and self.training:
                        y = torch.utils.checkpoint.checkpoint(blk, y, use_reentrant=False)
                    else:
                        y = blk(y)
            return m.forward_head(m._final(y, pre))

    @staticmethod
    def _with_prefix(blk: nn.Module, y: torch.Tensor, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A global block on the map ``(B, H, W, D)`` (after its pool) with prefix tokens ``(B, P, D)``."""
        if blk.downsample is not None:
            y = blk.downsample(y)
        b, h, w, d = y.shape
        t = blk.forward_map(torch.cat([pre, y.reshape(b, h * w, d)], dim=1))
        return t[:, pre.shape[1]:].reshape(b, h, w, d), t[:, : pre.shape[1]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def build_model(name: str) -> nn.Module:
    """A randomly initialised model by benchmark name (no downloads)."""
    if name.startswith("hpvit-"):
        size, _, variant = name[len("hpvit-"):].partition("/")
        if size not in SIZES or variant not in HPVIT_VARIANTS + DENSE_VARIANTS:
            raise ValueError(f"unknown hpvit model {name!r}: use hpvit-{{T,S,B}}/"
                             f"{{{','.join(HPVIT_VARIANTS + DENSE_VARIANTS)}}}")
        sd = timm.create_model(TIMM_FAMILY["vit"].format(size=SIZES[size])).state_dict()
        if variant in DENSE_VARIANTS:
            cfg = get_config(variant)
            if cfg.num_stages == 1:  # the plain baseline with its simple feature pyramid
                return build_dense_backbone(sd, cfg)
            return build_dense_backbone(from_plain(sd, cfg).reparameterize())
        if variant == "paper-cls-avg":
            model = from_plain(sd, "paper-cls", pools=("avg", "avg", "avg"))
        elif variant == "paper-cls-naive":
            return NaiveHPViT(from_plain(sd, "paper-cls"))
        else:
            model = from_plain(sd, variant)
        return model.reparameterize()
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as e:  # unknown model
        raise ValueError(f"unknown model {name!r}: {e}") from None


def count_gflops(model: nn.Module, img: int, device: str) -> float:
    """Forward GFLOPs per image (batch 1, no grad)."""
    return count_flops(model, torch.randn(1, 3, img, img, device=device)) / 1e9


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Seconds taken by ``fn()``."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def autocast_ctx(device: str, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def matmul_workload(device: str, dtype: str) -> tuple[Callable[[], Any], float]:
    """A large square GEMM and its GFLOPs: the practical ceiling of the machine."""
    n = 8192 if device.startswith("cuda") else 2048
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    return (lambda: torch.mm(a, b)), 2 * n**3 / 1e9


def time_round_robin(
    workloads: dict[str, Callable[[], Any]], device: str, warmup: int, iters: int, log: Callable[[str], None]
) -> dict[str, list[float]]:
    """Run every workload once per round, ``warmup + iters`` rounds; returns the measured seconds."""
    timer = Timer(device)
    times: dict[str, list[float]] = {k: [] for k in workloads}
    for r in range(warmup + iters):
        last = {}
        for name, fn in workloads.items():
            last[name] = t = timer(fn)
            if r >= warmup:
                times[name].append(t)
        tag = f"warm-up {r + 1}" if r < warmup else f"round {r + 1 - warmup}"
        log(f"  {tag}: " + ", ".join(f"{k}={t * 1e3:.0f}ms" for k, t in last.items()))
    return times


# ---------------------------------------------------------------------------------------------- memory
def rss_kb(field: str, pid: str = "self") -> int:
    """``field`` (``VmRSS``, ``VmHWM``...) of ``/proc/PID/status``, in kB (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def reset_peak_rss() -> bool:
    """Reset this process's peak resident size (``VmHWM``); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(name: str, mode: str, batch: int, img: int, device: str, dtype: str) -> float:
    """Peak memory (MB) of one ``mode`` step (``infer``, ``train``, ``train_ckpt``) in THIS process;
    meant to run in a fresh process (see :func:`memory_in_subprocess`)."""
    torch.manual_seed(0)
    model = build_model(name).to(device)
    x = torch.randn(batch, 3, img, img, device=device)
    cuda = device.startswith("cuda")
    if mode == "infer":
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        opt = None
    else:
        model.train()
        if mode == "train_ckpt":
            model.set_grad_checkpointing(True)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        target = torch.randint(0, 1000, (batch,), device=device)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_kb("VmRSS") * 1024
        if not reset_peak_rss():
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # best effort
    with autocast_ctx(device, dtype):
        if opt is None:
            with torch.no_grad():
                model(x)
        else:
            out = model(x)
            loss = F.cross_entropy(out.float(), target)
            loss.backward()
            opt.step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss_kb("VmHWM") * 1024
    return max(peak - base, 0) / 2**20


def memory_in_subprocess(name: str, mode: str, batch: int, img: int, device: str, dtype: str, threads: int) -> float | None:
    cmd = [sys.executable, "-m", "hpvit.bench", "--memory-worker", name, mode, str(batch), str(img), device, dtype, str(threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return None
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["peak_mb"]
    sys.stderr.write(f"memory worker for {name} ({mode}) failed:\n{out.stderr[-2000:]}\n")
    return None


# ---------------------------------------------------------------------------------------------- report
def format_table(result: dict[str, Any]) -> str:
    """Markdown table of a benchmark result (the dict written by ``--json``)."""
    compiled = any(m.get("img_per_s_compiled") for m in result["models"])
    head = ["model", "batch", "params (M)", "GFLOPs", "latency (ms)", "img/s", "GFLOP/s", "% of GEMM",
            "infer mem (MB)", "train mem (MB)", "train mem, ckpt (MB)"]
    if compiled:
        head += ["compiled img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ceil = result["matmul_gflops_per_s"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for m in result["models"]:
        row = [m["name"], str(m["batch"]), f(m["params_m"], ".1f"), f(m["gflops"], ".1f"), f(m["latency_ms"], ".0f"),
               f(m["img_per_s"], ".2f"), f(m["achieved_gflops_per_s"], ".0f"),
               f(100 * m["achieved_gflops_per_s"] / ceil if ceil else None, ".0f"),
               f(m.get("peak_mem_infer_mb"), ".0f"), f(m.get("peak_mem_train_mb"), ".0f"),
               f(m.get("peak_mem_train_ckpt_mb"), ".0f")]
        if compiled:
            row.append(f(m.get("img_per_s_compiled"), ".2f"))
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"\nlarge-GEMM ceiling: {ceil:.0f} GFLOP/s ({result['device']}, {result['dtype']}, {result['threads']} threads)")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Cost (GFLOPs per image, and training memory) against throughput, one point per model."""
    batch = max(m["batch"] for m in result["models"])
    ms = [m for m in result["models"] if m["batch"] == batch]
    panels = [("gflops", "GFLOPs / image", "cost vs throughput (red: hpvit, blue: timm)")]
    if any(m.get("peak_mem_train_mb") is not None for m in ms):  # not with --no-memory: no empty panel
        panels.append(("peak_mem_train_mb", "peak memory, training step (MB)", "training memory vs throughput"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    for ax, (key, label, title) in zip(axes[0], panels):
        pts = sorted((m for m in ms if m.get(key) is not None), key=lambda m: (m[key], m["img_per_s"]))
        last_y = None
        for m in pts:
            ours = m["name"].startswith("hpvit")
            ax.scatter(m["img_per_s"], m[key], c="tab:red" if ours else "tab:blue", marker="o" if ours else "s", s=40)
            # labels of points at almost the same height are stacked instead of printed over each other
            span = max(p[key] for p in pts) - min(p[key] for p in pts) or 1.0
            dy = 3 if last_y is None or (m[key] - last_y[0]) > 0.04 * span else last_y[1] + 9
            last_y = (m[key], dy)
            ax.annotate(m["name"].replace("hpvit-", ""), (m["img_per_s"], m[key]), fontsize=7,
                        xytext=(4, dy), textcoords="offset points")
        ax.set_xlabel(f"images / s (batch {batch}, {result['device']}, {result['dtype']})")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"), force=True)
    plt.close(fig)


def benchmark(
    models: list[str], device: str = "cpu", dtype: str = "fp32", batches: list[int] = (8,), img: int = 224,
    warmup: int = 2, iters: int = 7, threads: int = 0, memory: bool = True, compile: bool = False,
    log: Callable[[str], None] = lambda s: None, memory_modes: tuple[str, ...] = MEMORY_MODES,
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result (see the module docstring for the keys).
    ``memory_modes``: which peak memories to measure (``infer``, ``train``, ``train_ckpt``; dense backbones:
    ``infer`` only)."""
    bad = [m for m in memory_modes if m not in MEMORY_MODES]
    if bad:
        raise ValueError(f"unknown memory mode(s) {bad}: choose from {MEMORY_MODES}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    built: dict[str, nn.Module] = {}
    info: dict[str, dict[str, float]] = {}
    for name in models:
        log(f"building {name}")
        m = build_model(name).to(device).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        built[name] = m
        info[name] = dict(params_m=sum(p.numel() for p in m.parameters()) / 1e6, gflops=count_gflops(m, img, device))
    compiled: dict[str, Callable] = {}
    if compile:
        for name, m in built.items():
            compiled[name] = torch.compile(m)
    mm, mm_gflops = matmul_workload(device, dtype)
    rows = []
    mm_rates = []
    for batch in batches:
        x = torch.randn(batch, 3, img, img, device=device)

        def run(mod):
            def fn():
                with torch.no_grad(), autocast_ctx(device, dtype):
                    return mod(x)
            return fn

        work = {"matmul": mm} | {n: run(m) for n, m in built.items()}
        if compile:
            for n, c in compiled.items():
                log(f"compiling {n} (batch {batch})")
                run(c)()
            work |= {f"{n} [compiled]": run(c) for n, c in compiled.items()}
        log(f"timing batch {batch}: {warmup} warm-up + {iters} measured rounds over {len(work)} workloads")
        times = time_round_robin(work, device, warmup, iters, log)
        mm_rates.append(mm_gflops / statistics.median(times["matmul"]))
        for name in models:
            lat = statistics.median(times[name])
            row = dict(name=name, params_m=info[name]["params_m"], gflops=info[name]["gflops"], batch=batch,
                       img_per_s=batch / lat, latency_ms=lat * 1e3,
                       achieved_gflops_per_s=info[name]["gflops"] * batch / lat,
                       latency_ms_all=[t * 1e3 for t in times[name]],
                       peak_mem_infer_mb=None, peak_mem_train_mb=None, peak_mem_train_ckpt_mb=None)
            if compile:
                clat = statistics.median(times[f"{name} [compiled]"])
                row.update(latency_ms_compiled=clat * 1e3, img_per_s_compiled=batch / clat)
            rows.append(row)
    built.clear()
    compiled.clear()
    if memory:
        for row in rows:
            dense = row["name"].startswith("hpvit-") and row["name"].partition("/")[2] in DENSE_VARIANTS
            for mode in memory_modes:
                if dense and mode != "infer":
                    continue
                log(f"memory: {row['name']} batch {row['batch']} {mode} (fresh process)")
                row[f"peak_mem_{mode}_mb"] = memory_in_subprocess(row["name"], mode, row["batch"], img, device, dtype, threads)
    return dict(
        device=device if device == "cpu" else torch.cuda.get_device_name(),
        dtype=dtype, img_size=img, threads=threads, warmup=warmup, iters=iters,
        torch=torch.__version__, matmul_gflops_per_s=statistics.median(mm_rates), models=rows,
    )


def _memory_worker(argv: list[str]) -> None:
    name, mode, batch, img, device, dtype, threads = argv
    if int(threads):
        torch.set_num_threads(int(threads))
    peak = measure_memory(name, mode, int(batch), int(img), device, dtype)
    print(json.dumps(dict(name=name, mode=mode, peak_mb=peak)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":  # the fresh process measure_memory runs in
        _memory_worker(sys.argv[2:])
    else:
        sys.exit("run the benchmark with `hpvit bench` (python -m hpvit.bench only serves its memory workers)")
