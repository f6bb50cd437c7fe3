"""Shared fixtures: a tiny 1-channel ViT (28x28 MNIST-sized, ~20k parameters) that builds in milliseconds.

Tests run torch single-threaded (``ADVTRANSFER_TEST_THREADS`` to change): on a small machine shared with
training jobs, intra-op threads that spin-wait against other processes make tiny ops over 10x slower.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from advtransfer.checkpoints import save_checkpoint
from advtransfer.models import Classifier, ModelSpec, build

torch.set_num_threads(int(os.environ.get("ADVTRANSFER_TEST_THREADS", "1")))

TINY_VIT = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def tiny(seed: int, num_classes: int = 10, **kwargs) -> Classifier:
    """The tiny ViT (``TINY_VIT`` updated with ``kwargs``), seeded, in eval mode."""
    torch.manual_seed(seed)
    return build(ModelSpec("vit_tiny_patch16_224", {**TINY_VIT, **kwargs}, num_classes)).eval()


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return ModelSpec("vit_tiny_patch16_224", dict(TINY_VIT), 10)


@pytest.fixture
def tiny_vit(tiny_spec: ModelSpec) -> Classifier:
    torch.manual_seed(0)
    return build(tiny_spec).eval()


@pytest.fixture(scope="session")
def source(tmp_path_factory) -> Path:
    """A tiny 1-channel mini-ViT source checkpoint (untrained is enough for plumbing runs)."""
    torch.manual_seed(0)
    spec = ModelSpec("vit_tiny_patch16_224", dict(TINY_VIT), 10, mean=[0.5], std=[0.5])
    path = tmp_path_factory.mktemp("src") / "tiny.safetensors"
    save_checkpoint(build(spec), spec, path)
    return path
