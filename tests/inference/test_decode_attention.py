"""Split-K decode attention (ops/decode_attention.py), the fused decode RoPE + cache write
(decode_rope.py), the decode RMSNorm (decode_norm_linear.py) and the skinny decode GEMM
(decode_gemm.py) against their eager forms, on the CPU
through Triton's interpreter (fp32): the kernel alone over awkward shapes and masks, and greedy LVR
generation with it against generation with SDPA (same tokens, logits within 1e-5). The bf16
kernel on a GPU: tests/gpu/test_decode_attention_gpu.py."""

from __future__ import annotations

import re

import pytest

from megatron_latent.testing.triton_interpreter import run_interpreted


def test_split_k_decode_attention_matches_sdpa(tiny_ckpts):
    pytest.importorskip("triton")
    out = run_interpreted("megatron_latent.testing.decode_attention_check", tiny_ckpts["tiny-a"])
    kernel = float(re.search(r"kernel max diff (\S+)", out).group(1))
    rope = float(re.search(r"rope write max diff (\S+)", out).group(1))
    assert rope <= 1e-5, out
    assert float(re.search(r"rms norm max diff (\S+)", out).group(1)) <= 1e-6, out
    assert float(re.search(r"gemm max diff (\S+)", out).group(1)) <= 1e-6, out
    m = re.search(r"generation same tokens (\w+) logits max diff (\S+)", out)
    assert kernel <= 1e-5, out
    assert m.group(1) == "True" and float(m.group(2)) <= 1e-5, out
