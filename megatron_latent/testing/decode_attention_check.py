"""Checks of the split-K decode attention that run under Triton's CPU interpreter
(TRITON_INTERPRET=1 must be set before triton is imported, hence a separate process:
tests/inference/test_decode_attention.py runs `python -m megatron_latent.testing.decode_attention_check
CKPT`). fp32: the interpreter does not model bf16 (the GPU test covers it)."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def kernel_cases() -> float:
    """Largest |split-K - SDPA| over shapes with r not a power of two, one and many chunks, a
    chunk with no visible key, and keys past the last full tile."""
    from megatron_latent.inference.decode_attention import decode_attention

    torch.manual_seed(0)
    worst = 0.0
    for b, g, r, d, n, splits in [(2, 2, 3, 16, 150, None), (3, 1, 7, 32, 64, 1),
                                  (1, 2, 2, 16, 200, 4), (2, 1, 1, 16, 256, 4)]:
        heads = torch.randn(1, b, g, r + 2, d)
        kv = torch.randn(b, g, n, 2, d)
        mask = torch.rand(b, 1, 1, n) < 0.6
        mask[..., 64:128] = False  # the second 64-key tile sees nothing
        mask[..., 5] = True
        q = heads[0, :, :, :r]
        out = decode_attention(q, kv, mask, d ** -0.5, splits=splits)
        ref = F.scaled_dot_product_attention(q, kv[:, :, :, 0], kv[:, :, :, 1], attn_mask=mask,
                                             scale=d ** -0.5)
        worst = max(worst, (out - ref).abs().max().item())
    return worst


def generation_case(path: str) -> tuple[bool, float]:
    """Greedy LVR generation with the split-K decode kernel vs SDPA: (same tokens, max logit
    difference)."""
    from megatron_latent import parallel
    from megatron_latent.conversion.hf_load import load_hf_weights
    from megatron_latent.inference.generator import Generator
    from megatron_latent.inference.sampling import SamplingParams
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
    from megatron_latent.models.qwen25vl.model import Qwen25VLModel
    from megatron_latent.testing.generation import demo_prompts, lvr_processor, lvr_rule

    parallel.initialize(parallel.ParallelConfig(), seed=1234)
    model = Qwen25VLModel(Qwen25VLConfig.from_hf(path))
    load_hf_weights(model, path)
    model.eval()
    from megatron_latent.inference import decode_attention as kernel

    calls = []
    real = kernel.decode_attention
    kernel.decode_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)  # count only
    proc, ids = lvr_processor(path)
    runs = []
    for split in (False, True):
        gen = Generator(model, rule=lvr_rule(ids, steps=3), pad_id=proc.tokenizer.pad_token_id,
                        split_attention=split)
        runs.append(gen.generate(demo_prompts(proc), SamplingParams(max_new_tokens=8),
                                 record_logits=True))
    kernel.decode_attention = real
    if not calls:
        raise RuntimeError("the split-K kernel was never called")
    same = all(a.tokens == c.tokens for a, c in zip(*runs))
    diff = max((a.logits - c.logits).abs().max().item() for a, c in zip(*runs))
    parallel.destroy()
    return same, diff


if __name__ == "__main__":
    print(f"kernel max diff {kernel_cases():.3e}")
    same, diff = generation_case(sys.argv[1])
    print(f"generation same tokens {same} logits max diff {diff:.3e}")
