"""The Triton cross entropy (ops/cross_entropy.py) against megatron-core's unfused
vocab_parallel_cross_entropy, on the CPU through Triton's interpreter (fp32): loss and logits
gradient over ragged vocab chunks, ignored and edge labels and strided logits, and TP=2 over
gloo against TP=1. The bf16 kernels on a GPU: tests/gpu/test_cross_entropy_gpu.py."""

from __future__ import annotations

import re

import pytest

from megatron_latent.testing.triton_interpreter import run_interpreted


def test_triton_cross_entropy_matches_megatron():
    pytest.importorskip("triton")
    out = run_interpreted("megatron_latent.testing.cross_entropy_check", timeout=300)
    for name in ("ce", "ce tp2"):
        m = re.search(rf"^{name} max diff loss (\S+) grad (\S+)$", out, re.MULTILINE)
        assert m, out
        assert float(m.group(1)) <= 1e-5 and float(m.group(2)) <= 1e-5, out
