"""The precision-aware optimizer option refuses the setups it cannot run in, naming the fix
(its numerics are checked on a GPU: tests/gpu/test_precision_aware_gpu.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer


def test_precision_aware_needs_distributed_optimizer_and_te(tiny_ckpts, megatron_single_rank):
    path = tiny_ckpts["tiny-a"]
    model = build_model(Qwen25VLConfig.from_hf(path, params_dtype=torch.float32), path)
    with pytest.raises(ValueError, match="--use-distributed-optimizer"):
        build_optimizer(model, OptimSettings(precision_aware=True))
    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(ValueError, match="Transformer Engine"):
            build_optimizer(model, OptimSettings(precision_aware=True,
                                                 use_distributed_optimizer=True))
