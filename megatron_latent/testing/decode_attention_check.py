"""Checks of the split-K decode attention, the fused decode RoPE + cache write, the decode
RMSNorm and the skinny decode GEMM that run under Triton's CPU interpreter
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
    from megatron_latent.ops.decode_attention import decode_attention

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


def rope_write_cases() -> float:
    """Largest difference of the fused decode RoPE + cache write (decode_rope.py) from the
    eager form (rotate_half RoPE on queries and key, index copy into the slot), over the
    rotated queries and the whole cache (other slots must stay untouched)."""
    from megatron_latent.ops.decode_rope import rope_rows, rope_write

    torch.manual_seed(0)
    worst = 0.0
    for b, g, r, d, n, slot, fb, with_bias in [(2, 2, 3, 16, 40, 7, 2, True),
                                               (3, 1, 7, 32, 20, 19, 1, False),
                                               (1, 4, 1, 64, 9, 0, 1, True)]:
        raw = torch.randn(b, g, r + 2, d)
        bias = torch.randn(g * (r + 2) * d) if with_bias else None
        heads = raw + bias.view(g, r + 2, d) if with_bias else raw  # what the kernel adds
        freqs = torch.randn(1, fb, 1, d) * 3  # one row for all sequences when fb == 1
        kv = torch.randn(b, g, n, 2, d)
        index = torch.tensor([slot])
        ref_kv = kv.clone()
        q = rope_write(raw, *rope_rows(freqs, b), kv, index, bias)
        f = freqs[0, :, 0].expand(b, d)[:, None, None]  # [b, 1, 1, d]
        half = d // 2
        rotated = heads[:, :, :r + 1] * f.cos() + torch.cat(
            [-heads[:, :, :r + 1, half:], heads[:, :, :r + 1, :half]], dim=-1) * f.sin()
        ref_kv[:, :, slot, 0] = rotated[:, :, r]
        ref_kv[:, :, slot, 1] = heads[:, :, r + 1]
        worst = max(worst, (q - rotated[:, :, :r]).abs().max().item(),
                    (kv - ref_kv).abs().max().item())
    return worst


def rms_norm_cases() -> float:
    """Largest relative difference of the decode RMSNorm kernel (decode_norm_linear.py) from the
    formula, over widths that are and are not powers of two."""
    from megatron_latent.ops.decode_norm_linear import rms_norm

    torch.manual_seed(0)
    worst = 0.0
    for rows, n in [(1, 48), (5, 100), (8, 64)]:
        x, w = torch.randn(rows, n) * 3, torch.randn(n)
        ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        worst = max(worst, ((rms_norm(x, w, 1e-6) - ref).abs().max() / ref.abs().max()).item())
    return worst


def gemm_cases() -> float:
    """Largest relative difference of the skinny decode GEMM (decode_gemm.py) from x W^T, over
    one and several k ranges (one uneven: its surplus blocks load zeros), one row and rows past
    one tile of 16, and x with a row stride (a [1, b, k] slice); plus `tiling_for`'s picks for
    the 7B shapes on a 132-SM GPU, against what the H200 sweep measured (none for QKV)."""
    from megatron_latent.ops.decode_gemm import Tiling, linear, tiling_for

    torch.manual_seed(0)
    worst = 0.0
    for m, k, n, t in [(1, 64, 32, Tiling(32, 32, 1)), (5, 128, 64, Tiling(32, 32, 3)),
                       (20, 96, 64, Tiling(64, 32, 2)), (8, 256, 32, Tiling(32, 64, 4)),
                       (70, 64, 32, Tiling(32, 32, 2))]:
        x, w = torch.randn(2 * m, k)[::2], torch.randn(n, k)
        ref = x @ w.T
        worst = max(worst, ((linear(x, w, t) - ref).abs().max() / ref.abs().max()).item())
    picks = {name: tiling_for(8, n, k, 132) for name, (k, n) in
             {"qkv": (3584, 4608), "fc1": (3584, 37888), "fc2": (18944, 3584),
              "output": (3584, 152064)}.items()}
    expect = {"qkv": None, "fc1": Tiling(64, 128, 1, 3), "fc2": Tiling(32, 128, 5, 3),
              "output": Tiling(128, 128, 1, 3)}
    if picks != expect or tiling_for(64, 37888, 3584, 132) is not None:
        raise AssertionError(f"tilings {picks} != {expect}")
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
    from megatron_latent.ops import decode_attention as kernel
    from megatron_latent.ops import decode_rope

    calls, rope_calls = [], []
    real, real_rope = kernel.decode_attention, decode_rope.rope_write
    kernel.decode_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)  # count only
    decode_rope.rope_write = lambda *a, **kw: rope_calls.append(1) or real_rope(*a, **kw)
    proc, ids = lvr_processor(path)
    runs = []
    for split in (False, True):
        gen = Generator(model, rule=lvr_rule(ids, steps=3), pad_id=proc.tokenizer.pad_token_id,
                        split_attention=split)
        runs.append(gen.generate(demo_prompts(proc), SamplingParams(max_new_tokens=8),
                                 record_logits=True))
    kernel.decode_attention, decode_rope.rope_write = real, real_rope
    if not calls or not rope_calls:
        raise RuntimeError(f"a decode kernel was never called (split-K {len(calls)}, fused "
                           f"RoPE {len(rope_calls)})")
    same = all(a.tokens == c.tokens for a, c in zip(*runs))
    diff = max((a.logits - c.logits).abs().max().item() for a, c in zip(*runs))
    parallel.destroy()
    return same, diff


if __name__ == "__main__":
    print(f"kernel max diff {kernel_cases():.3e}")
    print(f"rope write max diff {rope_write_cases():.3e}")
    print(f"rms norm max diff {rms_norm_cases():.3e}")
    print(f"gemm max diff {gemm_cases():.3e}")
    same, diff = generation_case(sys.argv[1])
    print(f"generation same tokens {same} logits max diff {diff:.3e}")
