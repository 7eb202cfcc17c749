"""Split-K decode attention (inference/decode_attention.py) against SDPA, on the CPU through
Triton's interpreter (fp32): the kernel alone over awkward shapes and masks, and greedy LVR
generation with it against generation with SDPA (same tokens, logits within 1e-5). The bf16
kernel on a GPU: tests/gpu/test_decode_attention_gpu.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def test_split_k_decode_attention_matches_sdpa(tiny_ckpts):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "megatron_latent.testing.decode_attention_check",
                           tiny_ckpts["tiny-a"]], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernel = float(re.search(r"kernel max diff (\S+)", proc.stdout).group(1))
    m = re.search(r"generation same tokens (\w+) logits max diff (\S+)", proc.stdout)
    assert kernel <= 1e-5, proc.stdout
    assert m.group(1) == "True" and float(m.group(2)) <= 1e-5, proc.stdout
