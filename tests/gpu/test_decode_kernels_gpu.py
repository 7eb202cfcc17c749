"""On a GPU: the skinny decode GEMM (ops/decode_gemm.py) against an fp64 product at the
7B decode shapes it is picked for, and a whole fused decode step (our RMSNorm and GEMMs in the
QKV projection and the MLP, the fused RoPE + cache write, split-K attention) against TE's
modules with eager RoPE and SDPA, on a tiny checkpoint wide enough for our GEMM to be picked,
at TP=1 and (2 GPUs) TP=2. Run: pytest tests/gpu -s"""

from __future__ import annotations

import pytest
import torch

from megatron_latent.ops import decode_gemm
from megatron_latent.inference.generator import Generator
from megatron_latent.inference.loading import load_for_generation
from megatron_latent.inference.sampling import SamplingParams
from megatron_latent.testing.generation import (agree_until_near_tie, demo_prompts,
                                                generate_run, lvr_processor, lvr_rule,
                                                recompute_logits)

pytestmark = pytest.mark.gpu
SHAPES_7B = {"fc1": (3584, 37888), "fc2": (18944, 3584), "output": (3584, 152064)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 8, 16])
def test_decode_gemm_as_accurate_as_cublas(dtype, m):
    """Where tiling_for picks our kernel, its error from the fp64 product is within twice
    cuBLAS's (both accumulate in fp32; bf16 rounds the output once)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    pytest.importorskip("triton")
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(m)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, (k, n) in SHAPES_7B.items():
        assert decode_gemm.tiling_for(m, n, k, sms) is not None, name
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(dtype)
        x = torch.randn(2, m, k, device="cuda", generator=gen).to(dtype)[1]  # a strided view
        ref = x.double() @ w.double().T
        ours = (decode_gemm.gemm(x, w).double() - ref).abs().max().item()
        cublas = (torch.nn.functional.linear(x, w).double() - ref).abs().max().item()
        print(f"\n[{name} m={m} {dtype}] max error ours {ours:.2e} cuBLAS {cublas:.2e}")
        assert ours <= 2 * cublas + 1e-5 * ref.abs().max().item()  # fp32: ~2e-6 measured


def _wide_ckpt(root):
    """Tiny, but with hidden 128 and MLP 512 so fc1, fc2 and the output layer take our GEMM."""
    from megatron_latent.testing.tiny_checkpoint import make_tiny_qwen25vl

    return str(make_tiny_qwen25vl(root / "wide", preset="tiny-a", hidden_size=128,
                                  intermediate_size=512, mrope_section=[4, 6, 6]))


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    return _wide_ckpt(tmp_path_factory.mktemp("ckpt"))


def _te_model(path):
    return load_for_generation(path, spec="te", dtype=torch.float32)[0]


@pytest.mark.parametrize("ckpt", ["tiny-a", "wide"])
def test_fused_decode_equals_eager_fp32(ckpt, tiny_ckpts, wide_ckpt, megatron_single_rank,
                                        monkeypatch):
    """fp32 params: every step's logits equal the uncached recompute's within TF32's error (TE
    runs fp32 GEMMs in TF32, ours in full fp32), and the eager decode (TE's modules, eager
    RoPE, SDPA) gives the same tokens up to its first near-tie. On the wide checkpoint our GEMM
    runs fc1, fc2 and the output layer in every decode step."""
    pytest.importorskip("transformer_engine")
    pytest.importorskip("triton")
    from megatron_latent.ops import decode_norm_linear
    from megatron_latent.models.qwen25vl.cached_layer import mlp_fusable

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    path = wide_ckpt if ckpt == "wide" else tiny_ckpts[ckpt]
    model = _te_model(path)
    layers = model.language_model.decoder.layers
    assert all(decode_norm_linear.fusable(layer.self_attention.linear_qkv) for layer in layers)
    assert all(mlp_fusable(layer) for layer in layers)
    assert layers[0].self_attention.linear_qkv.use_bias  # Qwen's QKV bias goes through RoPE
    calls = []
    real = decode_gemm.linear
    monkeypatch.setattr(decode_gemm, "linear", lambda *a: calls.append(a[1].shape) or real(*a))
    proc, ids = lvr_processor(path)
    prompts, params = demo_prompts(proc), SamplingParams(max_new_tokens=12)
    runs = [Generator(model, rule=lvr_rule(ids), split_attention=split,
                      pad_id=proc.tokenizer.pad_token_id).generate(prompts, params,
                                                                   record_logits=True)
            for split in (False, True)]
    picked = {tuple(s) for s in calls}
    print(f"\n[{ckpt}] our GEMM ran {len(calls)} times on weights {sorted(picked)}")
    if ckpt == "wide":  # fc1 (gated: 2 x 512), fc2 and the (tied) output layer
        assert {(1024, 128), (128, 512), (model.cfg.padded_vocab_size, 128)} <= picked
    for prompt, eager, fused in zip(prompts, *runs):
        # the oracle: one uncached forward over the fused run's own tokens and latents
        full = (recompute_logits(model, prompt, fused) - fused.logits).abs().max().item()
        n, diff = agree_until_near_tie(eager, fused, 5e-3)
        print(f"fused decode (fp32): {len(fused.tokens)} steps, logits vs recompute {full:.2e}; "
              f"vs eager decode {diff:.2e} over {n} steps")
        assert full <= 5e-3


def test_fused_decode_tp2_nccl(wide_ckpt, megatron_single_rank, tmp_path):
    """TE spec at TP=2 (fc2's partial sums all-reduced after our path): every step's logits
    equal the uncached recompute's on one GPU within TF32's error, and TP=1 gives the same
    tokens up to its first near-tie."""
    from megatron_latent.testing.distributed import run_distributed

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    pytest.importorskip("transformer_engine")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = tmp_path / "gen.pt"
    run_distributed(generate_run, 2, wide_ckpt, str(out), 2, 1, 10, "te")
    got = torch.load(out, weights_only=False)["greedy"]
    model = _te_model(wide_ckpt)
    proc, ids = lvr_processor(wide_ckpt)
    prompts = demo_prompts(proc)
    ref = Generator(model, rule=lvr_rule(ids), pad_id=proc.tokenizer.pad_token_id).generate(
        prompts, SamplingParams(max_new_tokens=10), record_logits=True)
    for prompt, c, r in zip(prompts, got, ref):
        diff = (recompute_logits(model, prompt, c) - c.logits).abs().max().item()
        n, _ = agree_until_near_tie(r, c, 5e-3)
        print(f"\n[te tp2 nccl] cached vs recompute logits {diff:.2e}; TP1's tokens over {n} "
              f"steps")
        assert diff <= 5e-3
