"""On a GPU: the FP8 GEMM's cuBLAS path (row-wise scaled `_scaled_mm`, Triton activation
quantization) against the dequantized fp32 product of the same operands, and FP8 rollouts of a
tiny bf16 model replayed as CUDA graphs equal to eager ones (local spec; TE's when installed).
Run: pytest tests/gpu -s"""

from __future__ import annotations

import pytest
import torch

from megatron_latent.inference.generator import Generator
from megatron_latent.inference.sampling import SamplingParams
from megatron_latent.ops import fp8_gemm
from megatron_latent.testing.generation import demo_prompts, lvr_processor, lvr_rule

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("m", [1, 8, 64, 100])
def test_scaled_mm_equals_dequantized_product(m):
    if not fp8_gemm.native(torch.device("cuda")):
        pytest.skip("no FP8 tensor cores")
    g = torch.Generator(device="cuda").manual_seed(m)
    w = torch.randn(1024, 512, device="cuda", generator=g).to(torch.bfloat16) * 0.05
    x = torch.randn(m, 512, device="cuda", generator=g).to(torch.bfloat16) * 3
    x[0, 7] = 200.0  # an outlier: only its own row's scale grows
    q = fp8_gemm.Fp8Weight.empty_like(w).quantize_(w)
    xq, xs = fp8_gemm.quantize_rows(x)
    ref_q = (x.float() / (x.float().abs().amax(-1, keepdim=True) / 448)).clamp(-448, 448)
    assert torch.equal(xq.float(), ref_q.to(fp8_gemm.FP8).float())  # Triton = torch's cast
    want = (xq.float() * xs[:, None]) @ (q.data.float() * q.scale[:, None]).t()
    got = fp8_gemm.linear(x, q).float()
    assert ((got - want).abs() <= 1e-2 * want.abs() + 1e-2).all()
    exact = x.float() @ w.float().t()  # and the quantization error itself is small
    assert (got - exact).norm() / exact.norm() < 0.05


@pytest.mark.parametrize("spec", ["local", "te"])
def test_fp8_rollout_graphs_equal_eager(spec, tiny_ckpts, megatron_single_rank):
    if spec == "te":
        pytest.importorskip("transformer_engine")
    from megatron_latent.conversion.hf_load import load_hf_weights
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
    from megatron_latent.models.qwen25vl.model import Qwen25VLModel

    path = tiny_ckpts["tiny-a"]
    cfg = Qwen25VLConfig.from_hf(path, spec=spec, params_dtype=torch.bfloat16)
    model = Qwen25VLModel(cfg).cuda().eval()
    load_hf_weights(model, path)
    proc, ids = lvr_processor(path)
    prompts = demo_prompts(proc)
    params = SamplingParams(max_new_tokens=16, temperature=0.9, seed=2)
    out = {}
    for graphs in (False, True):
        gen = Generator(model, rule=lvr_rule(ids, steps=2), pad_id=proc.tokenizer.pad_token_id,
                        cuda_graphs=graphs, weight_precision="fp8")
        gen.generate(prompts, params)  # graphs captured on the first call
        out[graphs] = gen.generate(prompts, params)
        gen.release()
    for a, b in zip(out[False], out[True]):
        assert a.tokens == b.tokens and a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
    full = Generator(model, rule=lvr_rule(ids, steps=2),
                     pad_id=proc.tokenizer.pad_token_id).generate(prompts, params)
    gaps = []
    for a, b in zip(full, out[False]):  # up to the first token the two rollouts disagree on
        n = next((i for i, (s, t) in enumerate(zip(a.tokens, b.tokens)) if s != t),
                 min(len(a.tokens), len(b.tokens)))
        gaps += [abs(x - y) for x, y in zip(a.logprobs[:n], b.logprobs[:n])]
    assert 0 < sum(gaps) / len(gaps) < 0.2
