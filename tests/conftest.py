"""Shared fixtures. Real data lives in ../shared/data on developer machines and CI, not on a user's
clone: tests that need it skip with a visible reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HPVIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test (with the reason) when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (set HPVIT_SHARED_DATA to the shared/data folder)")
    return p


@pytest.fixture
def deit_tiny_path() -> Path:
    return shared_path("deit_tiny", "deit_tiny_patch16_224.pth")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="module")
def tiny_vit_sd(tmp_path_factory):
    """A random 4-block ViT-Tiny-width plain checkpoint, saved as a state-dict file."""
    from helpers import random_timm_vit

    p = tmp_path_factory.mktemp("vit") / "tiny.pth"
    torch.save(random_timm_vit(0, depth=4).state_dict(), p)
    return p


@pytest.fixture(scope="session")
def small_vit_init(tmp_path_factory) -> Path:
    """A random 4-block, 64-wide timm ViT (patch 16, 10 classes) as a plain state-dict file: the cheap start of
    the end-to-end command-line runs that check plumbing (resume, evaluation, recipes), not what the weights know."""
    from helpers import save_small_vit

    return save_small_vit(tmp_path_factory.mktemp("small_vit") / "small_vit.pth", img_size=32)
