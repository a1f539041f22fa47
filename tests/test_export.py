"""ONNX and torch.export of hierarchical models, checked against PyTorch (onnxruntime runs the files).

Small random models (4 blocks, width 64) keep each export to a few seconds; the real DeiT-Tiny at 224 on
real ImageNet images runs when ../shared/data is present.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import shared_path
from helpers import randomize_new_params

import hpvit
from hpvit import ConfigError, PlainSpec
from hpvit.errors import OutputError

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(n) is None for n in ("onnx", "onnxscript", "onnxruntime")),
    reason="ONNX export checks need onnx, onnxscript and onnxruntime: pip install -e \".[export]\"",
)

TOL = 1e-4


def _small(config: str = "paper-cls", num_classes: int = 5) -> hpvit.HierarchicalViT:
    torch.manual_seed(0)
    spec = PlainSpec(embed_dim=64, depth=4, num_heads=2, patch_size=16, mlp_hidden=128, pos_grid=(14, 14))
    m = hpvit.HierarchicalViT(spec, config, num_classes=num_classes)
    randomize_new_params(m)
    return m.eval()


def _images(b: int, side: int) -> torch.Tensor:
    return torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(1))


def test_onnx_classifier_matches_pytorch_and_leaves_the_model_unchanged(tmp_path):
    from hpvit.export import compare_onnx, export_onnx, run_onnx

    m = _small()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    path = export_onnx(m, tmp_path / "cls.onnx", img_size=224)
    assert not m.config.reparameterized and not m.force_plain_calls
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert compare_onnx(m, path, _images(1, 224)) <= TOL
    assert run_onnx(path, _images(1, 224))[0].shape == (1, 5)


def test_cli_export_pyramid_dynamic_batch_at_an_odd_size(tmp_path, capsys):
    """`hpvit export FILE --pyramid --dynamic-batch` at 97 px; onnxruntime vs PyTorch at batch 1 and 3."""
    from hpvit.cli import main
    from hpvit.export import compare_onnx, run_onnx

    m = _small("paper-det", num_classes=0)
    src = tmp_path / "m.safetensors"
    hpvit.save(m, src)
    out = tmp_path / "m.onnx"
    args = ["export", str(src), "-o", str(out), "--pyramid", "--dynamic-batch", "--img-size", "97", "--check"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "p1, p2, p3, p4" in text and "max abs diff" in text
    for b in (1, 3):
        assert compare_onnx(m, out, _images(b, 97), pyramid=True) <= TOL
    outs = run_onnx(out, _images(3, 97))
    assert [tuple(o.shape) for o in outs] == [(3, 64, 24, 24), (3, 64, 12, 12), (3, 64, 6, 6), (3, 64, 3, 3)]
    assert main(args) == 2  # exists: refused without --force


def test_torch_export_backbone_dynamic_batch():
    from hpvit.export import export_program

    m = _small("paper-seg")
    prog = export_program(m, img_size=75, pyramid=True, dynamic_batch=True)
    for b in (1, 4):
        x = _images(b, 75)
        with torch.no_grad():
            got, want = prog.module()(x), m.forward_pyramid(x)
        assert max(float((g - w).abs().max()) for g, w in zip(got, want)) <= TOL


def test_what_cannot_be_exported_is_a_clear_error(tmp_path):
    from hpvit.export import export_onnx

    with pytest.raises(ConfigError, match="no pyramid"):
        export_onnx(_small("identity"), tmp_path / "i.onnx", pyramid=True)
    with pytest.raises(ConfigError, match="--pyramid"):
        export_onnx(_small("paper-det").as_backbone(), tmp_path / "d.onnx")
    with pytest.raises(ConfigError, match="HierarchicalViT"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "l.onnx")
    (tmp_path / "exists.onnx").write_bytes(b"x")
    with pytest.raises(OutputError, match="force"):
        export_onnx(_small(), tmp_path / "exists.onnx")


def test_real_deit_tiny_on_real_images_224(tmp_path, deit_tiny_path):
    """The converted DeiT-Tiny (paper-cls, 1000 classes) as ONNX vs PyTorch on real ImageNet images."""
    from PIL import Image

    from hpvit.export import compare_onnx, export_onnx

    folder = shared_path("imagenet_sample", "images")
    files = sorted(folder.iterdir())[:4]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def load(f):
        im = Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC)
        return (torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(224, 224, 3).permute(2, 0, 1) / 255 - mean) / std

    x = torch.stack([load(f) for f in files])
    m = hpvit.from_plain(str(deit_tiny_path), config="paper-cls", num_classes=1000).eval()
    path = export_onnx(m, tmp_path / "deit.onnx", img_size=224, dynamic_batch=True)  # 4 images at once
    assert compare_onnx(m, path, x) <= TOL


def _clear_layer_caches() -> None:
    """Empty the layers' memoised tensors, so that the next model run at a size is the first in the process."""
    from hpvit.layers import attention

    for f in vars(attention).values():
        if hasattr(f, "cache_clear"):
            f.cache_clear()


def test_export_leaves_grid_models_in_the_process_usable(tmp_path):
    """Issue 29 defect 1: exporting a grid model first at a size cached a FakeTensor relative-position index, and
    every later eager run at that size returned a FakeTensor. After the export the model, and a fresh model with
    the same weights, run eagerly with real tensors, equal to onnxruntime on the file, and still train."""
    from hpvit.export import compare_onnx, export_onnx

    _clear_layer_caches()
    m = _small("grid-cls")
    path = export_onnx(m, tmp_path / "g.onnx", img_size=80)
    x = _images(2, 80)
    with torch.no_grad():
        got = m(x)
        fresh = _small("grid-cls")(x)
    assert type(got) is torch.Tensor and type(fresh) is torch.Tensor
    torch.testing.assert_close(got, fresh, rtol=0, atol=0)
    assert compare_onnx(m, path, x[:1]) <= TOL
    m.train()(x).sum().backward()  # the training path reads the cached index too
    assert m.blocks[0].attn.rel_pos_table.grad.abs().sum() > 0


def test_cli_export_check_of_a_grid_model_succeeds_and_odd_sides_get_one_line(tmp_path, capsys):
    """`hpvit export GRID.safetensors -o f.onnx --check` exits 0 (it exited 1 with GuardOnDataDependentSymNode after
    writing the file); at a side that is not a multiple of 16 px: one `hpvit: error:` line naming sizes that
    work, exit 2, and no file left behind (it was a 190-line TorchExportError)."""
    from hpvit.cli import main

    _clear_layer_caches()
    src = tmp_path / "grid.safetensors"
    hpvit.save(_small("grid-det", num_classes=0), src)
    out = tmp_path / "g.onnx"
    assert main(["export", str(src), "-o", str(out), "--pyramid", "--img-size", "64", "--check"]) == 0
    assert "max abs diff" in capsys.readouterr().out
    odd = tmp_path / "odd.onnx"
    assert main(["export", str(src), "-o", str(odd), "--pyramid", "--img-size", "72"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hpvit: error:") and "64 or 80 px" in err[0], err
    assert not odd.exists() and not list(tmp_path.glob("*.tmp*"))
