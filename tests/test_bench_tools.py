"""benchmarks/deployment.py and the dense rows of hpvit.bench (issue 22 item 3): cheap ViT-T runs.

Speed is never asserted; what is checked: the dense rows are the backbones Mask R-CNN / UperNet get
(4 maps at strides 4..32), their FLOPs follow the token counts, the tables and the plot are written.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hpvit.bench import benchmark, build_model

ROOT = Path(__file__).resolve().parents[1]


def _deployment():
    spec = importlib.util.spec_from_file_location("deployment", ROOT / "benchmarks" / "deployment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dense_rows_are_pyramid_backbones():
    torch.manual_seed(0)
    m = build_model("hpvit-T/paper-det").eval()
    with torch.no_grad():
        feats = m(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(64 // s, 96 // s) for s in (4, 8, 16, 32)]


def test_size_sweep_and_tables(tmp_path):
    dep = _deployment()
    sweep = [benchmark(models=["hpvit-T/paper-det", "hpvit-T/plain-det"], batches=[1], img=s, warmup=0, iters=1,
                       threads=1, memory=False) for s in (64, 128)]
    g = {(res["img_size"], r["name"]): r["gflops"] for res in sweep for r in res["models"]}
    # 4x the pixels: the linear layers (most of the FLOPs) cost 4x, global attention a little more; windowed
    # attention pads small maps up to whole 7x7 windows (16x16 -> 21x21 at 64 px, 32x32 -> 35x35 at 128 px),
    # so the transformed backbone grows by less
    assert 3.9 < g[(128, "hpvit-T/plain-det")] / g[(64, "hpvit-T/plain-det")] < 4.6
    assert 3.0 < g[(128, "hpvit-T/paper-det")] / g[(64, "hpvit-T/paper-det")] < 4.0
    # the stride-4 stages make the transformed backbone several times the plain one's FLOPs
    assert g[(128, "hpvit-T/paper-det")] > 2 * g[(128, "hpvit-T/plain-det")]
    md = dep.format_sizes(sweep, "cmd")
    assert md.count("| hpvit-T/") == 4 and "`cmd`" in md
    png = tmp_path / "sizes.png"
    dep.plot_sizes(sweep, str(png), "test")
    assert png.stat().st_size > 5000
    res = benchmark(models=["vit_tiny_patch16_224", "hpvit-T/lite-cls"], batches=[1, 2], img=224, warmup=0, iters=1,
                    threads=1, memory=False)
    md = dep.format_deployment(res, "cmd")
    lines = [ln for ln in md.splitlines() if ln.startswith("| vit_tiny") or ln.startswith("| hpvit-T")]
    assert len(lines) == 2 and all(ln.count("|") == 8 for ln in lines)


def test_unknown_memory_mode_raises():
    with pytest.raises(ValueError, match="memory mode"):
        benchmark(models=["hpvit-T/lite-cls"], memory_modes=("nope",))


def test_gpu_bench_runs_hpvit_bench_with_the_issue_30_settings(tmp_path, capsys):
    """benchmarks/gpu_bench.py (issue 30 item 6; run on a GPU machine): its two `hpvit bench` command lines parse,
    ask for bf16, batch 64 and ViT-B / Hiera-B / Swin-B with every hpvit-B preset, and the 1024 px detection row;
    a wrong --memory-modes is one clear error line. (The script's --quick CPU run takes ~10 s: not in the suite.)"""
    from hpvit.bench import resolve_models
    from hpvit.cli import main
    from hpvit.cli.main import build_parser

    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = mod.commands(tmp_path, quick=False)
    cls, det = (build_parser().parse_args(runs[k]) for k in ("cls", "det"))
    assert (cls.device, cls.dtype, cls.batch, cls.img_size, cls.memory_modes) == ("cuda", "bf16", "64", 224, "infer,train")
    names = resolve_models(cls.models)
    assert {"vit_base_patch16_224", "hiera_base_224", "swin_base_patch4_window7_224"} <= set(names)
    assert {"hpvit-B/paper-cls", "hpvit-B/grid-cls", "hpvit-B/grid-lite-cls", "hpvit-B/grid-fast-cls"} <= set(names)
    assert (det.img_size, det.batch, det.dtype) == (1024, "1", "bf16") and "hpvit-B/grid-det" in det.models
    assert all(build_parser().parse_args(c).json.startswith(str(tmp_path)) for c in mod.commands(tmp_path, True).values())
    assert main(["bench", "--memory-modes", "infer,bogus", "--quick"]) == 2
    assert "hpvit: error: --memory-modes 'infer,bogus': choose from infer, train, train_ckpt" in capsys.readouterr().err
