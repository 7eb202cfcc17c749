"""FP8 rollouts (issue #24): the quantized GEMM on a hand-worked example, and a tiny model
generating with FP8 decoder weights: close to its own full-precision log-probs but not equal
(it does quantize), copies refreshed from the live weights at every call, and nothing left
patched after it."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.inference.fp8_weights import decoder_linears
from megatron_latent.inference.generator import Generator
from megatron_latent.inference.sampling import SamplingParams
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.ops import fp8_gemm
from megatron_latent.testing.generation import demo_prompts, lvr_processor, lvr_rule
from megatron_latent.training.build import build_model, unwrap


def test_fp8_linear_by_hand():
    """W row [2, -1, 0.3, 0]: scale 2/448, so 0.3 -> 67.2 -> e4m3's nearest 64 (steps of 8 in
    [64, 128)) -> 64 * 2/448 = 0.285714; -1 -> -224 (exact). x = [1, 1, 1, 1] quantizes exactly.
    y = 2 - 1 + 0.285714 = 1.285714; the zero row stays zero, the bias is added after."""
    w = torch.tensor([[2.0, -1.0, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q = fp8_gemm.Fp8Weight.empty_like(w).quantize_(w)
    assert q.scale.tolist() == pytest.approx([2 / 448, 1.0])
    assert q.data.float()[0].tolist() == [448.0, -224.0, 64.0, 0.0]
    y = fp8_gemm.linear(torch.ones(1, 1, 4), q, torch.tensor([0.5, -0.5]))
    assert y.shape == (1, 1, 2)
    assert y[0, 0].tolist() == pytest.approx([2 - 1 + 64 * 2 / 448 + 0.5, -0.5], abs=1e-6)


@pytest.fixture(scope="module")
def tiny(tiny_ckpts, megatron_single_rank):
    path = tiny_ckpts["tiny-a"]
    proc, ids = lvr_processor(path)
    model = unwrap(build_model(Qwen25VLConfig.from_hf(path), path)[0])
    model.eval()
    return model, proc, ids


def _rollout(model, proc, ids, precision):
    gen = Generator(model, rule=lvr_rule(ids, steps=2), pad_id=proc.tokenizer.pad_token_id,
                    weight_precision=precision)
    prompts = demo_prompts(proc)
    return gen, gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.9, seed=3))


def test_fp8_rollout_close_to_full_precision_and_unpatched_after(tiny):
    model, proc, ids = tiny
    linears = decoder_linears(model)
    assert len(linears) == 4 * model.cfg.num_layers  # qkv, proj, fc1, fc2 per layer
    _, ref = _rollout(model, proc, ids, "params")
    gen, out = _rollout(model, proc, ids, "fp8")
    # forced to the full-precision rollout's tokens, so the log-probs compare position by position
    diffs = []
    for r, o in zip(ref, out):
        n = next((i for i, (a, b) in enumerate(zip(r.tokens, o.tokens)) if a != b),
                 min(len(r.tokens), len(o.tokens)))
        diffs += [abs(a - b) for a, b in zip(r.logprobs[:n], o.logprobs[:n])]
    assert len(diffs) >= 4
    gap = sum(diffs) / len(diffs)
    assert 1e-5 < gap < 0.1, gap  # quantized (not bit-equal), yet the same policy
    for m in linears:
        assert "_forward_impl" not in vars(m) and "forward" not in vars(m)
        assert not hasattr(m, fp8_gemm.ATTR)
    _, again = _rollout(model, proc, ids, "params")
    assert [c.logprobs for c in again] == [c.logprobs for c in ref]


def test_fp8_copies_follow_the_live_weights(tiny):
    """A generator keeps its FP8 buffers across calls; after the weights change its next call
    must equal a fresh generator's (quantized from the new weights), not the old copies."""
    model, proc, ids = tiny
    gen, before = _rollout(model, proc, ids, "fp8")
    w = decoder_linears(model)[0].weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(1.5)
        prompts = demo_prompts(proc)
        params = SamplingParams(max_new_tokens=8, temperature=0.9, seed=3)
        kept = gen.generate(prompts, params)
        _, fresh = _rollout(model, proc, ids, "fp8")
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert [c.logprobs for c in kept] == [c.logprobs for c in fresh]
    assert [c.logprobs for c in kept] != [c.logprobs for c in before]
