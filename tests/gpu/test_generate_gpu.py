"""On a GPU: the CUDA-graph decode iteration equals eager decode (greedy and sampled; fp32 local
spec also against the uncached recompute; TE bf16), and TP=2 / PP=2 generation over NCCL equals
TP=1. Run: pytest tests/gpu -s"""

from __future__ import annotations

import pytest
import torch

from megatron_latent.conversion.hf_load import load_hf_weights
from megatron_latent.inference.generator import Generator
from megatron_latent.inference.sampling import SamplingParams
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel
from megatron_latent.testing.generation import (demo_prompts, generate_run, lvr_processor,
                                                lvr_rule, recompute_logits)

pytestmark = pytest.mark.gpu


def _model(path, spec, dtype):
    cfg = Qwen25VLConfig.from_hf(path, spec=spec, params_dtype=dtype)
    model = Qwen25VLModel(cfg).cuda().eval()
    load_hf_weights(model, path)
    return model


@pytest.mark.parametrize("spec,dtype", [("local", torch.float32), ("te", torch.bfloat16)])
@pytest.mark.parametrize("sampled", [False, True])
def test_cuda_graph_decode_equals_eager(spec, dtype, sampled, tiny_ckpts, megatron_single_rank):
    """The graphed iteration (forward, sampling, latent rule and records in one graph) against
    the same iteration run eagerly: identical tokens, log-probs and latents (a replay runs the
    same kernels; sampling draws from the same generator states). Eager with per-step logits
    is then checked against the uncached recompute (fp32)."""
    if spec == "te":
        pytest.importorskip("transformer_engine")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    path = tiny_ckpts["tiny-a"]
    model = _model(path, spec, dtype)
    proc, ids = lvr_processor(path)
    prompts = demo_prompts(proc)
    params = (SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, seed=7) if sampled
              else SamplingParams(max_new_tokens=12))
    runs = {}
    for graphs in (False, True):
        gen = Generator(model, rule=lvr_rule(ids), cuda_graphs=graphs,
                        pad_id=proc.tokenizer.pad_token_id)
        first = gen.generate(prompts, params)  # with graphs: captures
        runs[graphs] = gen.generate(prompts, params)  # replays
        assert [c.tokens for c in first] == [c.tokens for c in runs[graphs]]  # same seed
    for eager, graphed in zip(runs[False], runs[True]):
        assert graphed.tokens == eager.tokens
        assert graphed.latent_positions == eager.latent_positions
        assert graphed.logprobs == eager.logprobs
        assert torch.equal(graphed.latents, eager.latents)
    print(f"\n[{spec} {dtype} {'sampled' if sampled else 'greedy'}] graph == eager: tokens "
          f"{[c.tokens for c in runs[True]]}")
    if dtype == torch.float32 and not sampled:
        gen = Generator(model, rule=lvr_rule(ids), pad_id=proc.tokenizer.pad_token_id)
        recorded = gen.generate(prompts, params, record_logits=True)
        for prompt, c, graphed in zip(prompts, recorded, runs[True]):
            assert c.tokens == graphed.tokens
            assert (recompute_logits(model, prompt, c) - c.logits).abs().max() <= 1e-4


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_generation_nccl(tp, pp, tiny_ckpts, megatron_single_rank, tmp_path):
    from megatron_latent.testing.distributed import run_distributed

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    path = tiny_ckpts["tiny-a"]
    out = tmp_path / "gen.pt"
    run_distributed(generate_run, 2, path, str(out), tp, pp)
    got = torch.load(out, weights_only=False)
    model = _model(path, "local", torch.float32)
    proc, ids = lvr_processor(path)
    prompts = demo_prompts(proc)
    ref = Generator(model, rule=lvr_rule(ids), pad_id=proc.tokenizer.pad_token_id).generate(
        prompts, SamplingParams(max_new_tokens=10))
    for prompt, c, r in zip(prompts, got["greedy"], ref):
        assert c.tokens == r.tokens and c.latent_positions == r.latent_positions
        diff = (recompute_logits(model, prompt, c) - c.logits).abs().max().item()
        print(f"\n[tp{tp} pp{pp} nccl] cached vs recompute logits {diff:.2e}")
        assert diff <= 1e-4
