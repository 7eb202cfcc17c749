"""Shared fixtures: tiny random Qwen2.5-VL checkpoints (built offline) and an in-process
single-rank megatron-core set-up."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process (gloo) or long tests")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (and Transformer Engine for TE paths)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    from megatron_latent.testing.tiny_checkpoint import make_tiny_qwen25vl

    root = tmp_path_factory.mktemp("ckpt")
    return {name: str(make_tiny_qwen25vl(root / name, preset=name, seed=seed))
            for seed, name in enumerate(["tiny-a", "tiny-b"])}


@pytest.fixture(scope="session")
def megatron_single_rank():
    """World size 1, TP=PP=1, in this process (CPU shim on CPU)."""
    from megatron_latent import parallel

    parallel.initialize(parallel.ParallelConfig(), seed=1234)
    yield
    parallel.destroy()


@pytest.fixture(scope="session")
def synthetic_lvr(tmp_path_factory):
    """A small synthetic visual-search dataset in the LVR format (real photos as backgrounds)."""
    from megatron_latent.data.synthetic_lvr import make_synthetic_lvr

    return make_synthetic_lvr(tmp_path_factory.mktemp("synth") / "data", num=48, val_num=8,
                              seed=0, min_side=112, max_side=224, progress=False)
