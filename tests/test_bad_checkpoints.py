"""Bad input: every case raises an hpvit CheckpointError (a ValueError) naming the file, the format it
looked like (when it was readable) and the first keys that could not be placed; the source is never
modified."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from hpvit.checkpoints import load_plain
from hpvit.errors import CheckpointError


def tiny_timm_sd(depth: int = 2) -> dict[str, torch.Tensor]:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=depth, num_heads=1, num_classes=3).state_dict()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expect_error(path: Path, *fragments: str) -> str:
    before = sha(path) if path.is_file() else None
    with pytest.raises(CheckpointError) as e:
        load_plain(path)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in: {msg}"
    if before is not None:
        assert sha(path) == before, "the source was modified"
    return msg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(suffix, tmp_path):
    path = tmp_path / f"vit{suffix}"
    sd = tiny_timm_sd()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save(sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "corrupt")


def test_corrupt_bytes(tmp_path):
    path = tmp_path / "vit.pth"
    path.write_bytes(os.urandom(4096))
    expect_error(path, "corrupt")


def test_empty_file(tmp_path):
    path = tmp_path / "vit.bin"
    path.write_bytes(b"")
    expect_error(path, "empty")


def test_directory_without_weights(tmp_path):
    (tmp_path / "README.md").write_text("no weights here")
    expect_error(tmp_path, "no weight file")


def test_pickle_needing_code_execution(tmp_path):
    path = tmp_path / "evil.pth"

    class Payload:  # unpickling this needs the class: arbitrary code in general
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Payload()}, path)
    expect_error(path, "code execution", "weights_only")


def test_resnet_is_not_a_vit(tmp_path):
    timm = pytest.importorskip("timm")
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), path)
    msg = expect_error(path, "not a recognised plain-ViT checkpoint", "looked most like format 'timm'", "conv1.0.weight")
    assert "could not place" in msg


def test_unknown_key_layout(tmp_path):
    sd = {k.replace("blocks.", "encoder.stages."): v for k, v in tiny_timm_sd().items()}
    path = tmp_path / "renamed.pth"
    torch.save(sd, path)
    expect_error(path, "looked most like format", "encoder.stages.0.")


def test_extra_unplaceable_keys_in_detected_format(tmp_path):
    sd = tiny_timm_sd()
    sd["blocks.0.attn.rel_pos_h"] = torch.zeros(7, 64)
    path = tmp_path / "vit_relpos.pth"
    torch.save(sd, path)
    expect_error(path, "looked like format 'timm'", "blocks.0.attn.rel_pos_h")


def test_inconsistent_shapes(tmp_path):
    sd = tiny_timm_sd()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(128, 64)  # the other block has 256
    sd["blocks.1.mlp.fc1.bias"] = torch.zeros(128)
    path = tmp_path / "mixed.pth"
    torch.save(sd, path)
    expect_error(path, "blocks.1.mlp.fc1.weight", "inconsistent", "format 'timm'")


def test_inconsistent_pos_embed(tmp_path):
    sd = tiny_timm_sd()
    sd["pos_embed"] = torch.zeros(1, 5, 32)  # wrong width
    path = tmp_path / "bad_pos.pth"
    torch.save(sd, path)
    expect_error(path, "pos_embed", "format 'timm'")


def test_missing_block_tensor(tmp_path):
    sd = tiny_timm_sd()
    del sd["blocks.1.attn.proj.weight"]
    path = tmp_path / "incomplete.pth"
    torch.save(sd, path)
    expect_error(path, "blocks.1.attn.proj.weight", "missing")


def test_hf_with_half_of_qkv(tmp_path):
    pytest.importorskip("transformers")
    import transformers as T

    m = T.ViTModel(T.ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=128,
                               image_size=32, patch_size=16))
    sd = {k: v for k, v in m.state_dict().items() if "k_proj" not in k}
    path = tmp_path / "hf_broken.pth"
    torch.save(sd, path)
    expect_error(path, "looked like format 'hf'", "layers.0.attention.q_proj")


def test_dinov2_swiglu_is_refused_with_reason(tmp_path):
    sd = tiny_timm_sd()
    sd["mask_token"] = torch.zeros(1, 64)
    for i in range(2):
        sd[f"blocks.{i}.mlp.w12.weight"] = sd.pop(f"blocks.{i}.mlp.fc1.weight")
    path = tmp_path / "dinov2_vitg14.pth"
    torch.save(sd, path)
    expect_error(path, "format 'dinov2'", "SwiGLU")


def test_forced_wrong_format(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(tiny_timm_sd(), path)
    before = sha(path)
    with pytest.raises(CheckpointError) as e:
        load_plain(path, format="clip")
    assert "format='clip' was requested" in str(e.value) and "looked like format 'timm'" in str(e.value)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="unknown format"):
        load_plain(path, format="nope")
    assert sha(path) == before
