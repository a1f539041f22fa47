"""torch.compile sees the whole forward as one graph (no graph breaks), in inference (the chunked
in-place path) and training; compiled outputs equal eager ones."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import hpvit
from helpers import randomize_new_params, rel_err


@pytest.fixture(scope="module")
def sd():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64).state_dict()


@pytest.mark.parametrize("config", ["paper-cls", "lite-cls", "paper-det"])
@pytest.mark.parametrize("train", [False, True])
def test_no_graph_breaks(sd, config, train):
    m = hpvit.from_plain(sd, config, img_size=64)
    randomize_new_params(m)
    m.train(train)
    m.chunk_tokens = 40  # several chunks per windowed stage; 64 px also pads the 1/4 and 1/8 maps
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    ctx = torch.enable_grad() if train else torch.no_grad()
    with ctx:
        explain = torch._dynamo.explain(m)(x)
    assert explain.graph_break_count == 0, [str(r.reason) for r in explain.break_reasons]
    assert explain.graph_count == 1


def test_compiled_matches_eager(sd):
    m = hpvit.from_plain(sd, "paper-cls", img_size=64).eval()
    randomize_new_params(m)
    m.chunk_tokens = 40
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = m(x)
        out = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    assert rel_err(out, ref) < 1e-5
