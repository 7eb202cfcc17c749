"""The Triton cross entropy (ops/cross_entropy.py) against megatron-core's unfused
vocab_parallel_cross_entropy, on the CPU through Triton's interpreter (fp32): loss and logits
gradient over ragged vocab chunks, ignored and edge labels and strided logits, and TP=2 over
gloo against TP=1. The bf16 kernels on a GPU: tests/gpu/test_cross_entropy_gpu.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def test_triton_cross_entropy_matches_megatron():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "megatron_latent.testing.cross_entropy_check"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("ce", "ce tp2"):
        m = re.search(rf"^{name} max diff loss (\S+) grad (\S+)$", proc.stdout, re.MULTILINE)
        assert m, proc.stdout
        assert float(m.group(1)) <= 1e-5 and float(m.group(2)) <= 1e-5, proc.stdout
