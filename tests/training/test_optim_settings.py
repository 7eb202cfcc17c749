"""The precision-aware optimizer option refuses the setups it cannot run in when the settings
are made (before any model is built), naming the fix. Its numerics are checked on a GPU:
tests/gpu/test_precision_aware_gpu.py."""

from __future__ import annotations

import importlib.util

import pytest

from megatron_latent.training.build import OptimSettings


def test_precision_aware_needs_distributed_optimizer_and_te():
    with pytest.raises(ValueError, match="--use-distributed-optimizer"):
        OptimSettings(precision_aware=True)
    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(ValueError, match="Transformer Engine"):
            OptimSettings(precision_aware=True, use_distributed_optimizer=True)
    else:
        OptimSettings(precision_aware=True, use_distributed_optimizer=True)
