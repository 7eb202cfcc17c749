"""DeepLatent's decode program builds the latents of rows with the same grid and question-image
layout in one batched LatentFormer call: equal (fp32) to `build_latents` row by row. On a GPU
those calls replay CUDA graphs (`LatentGraphs`): equal to eager, alone and in generation."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.latent.deeplatent_decode import DeepLatentProgram
from megatron_latent.latent.deeplatent_modules import grid_coords

D, HEADS = 32, 4


def test_batched_latents_equal_per_row(megatron_single_rank):
    from megatron_latent.latent.latentformer import DeepLatentModules, parallel_linear_config

    torch.manual_seed(0)
    mods = DeepLatentModules(parallel_linear_config(1, torch.float32), D, HEADS, grid_size=4,
                             mlp_hidden=16, latentformer_layers=2).eval()
    with torch.no_grad():  # non-zero modulations (fc2 is zero-initialised)
        for mlp in (mods.mlp_l, mods.mlp_i):
            mlp.fc2.weight.normal_(0, 0.1)
            mlp.fc2.bias.normal_(0, 0.1)
    prog = DeepLatentProgram.__new__(DeepLatentProgram)
    prog.modules, prog.sigmas = mods, None  # inference latents (no RL sampling)
    shared = grid_coords(3, 4)
    prog.features = [(torch.randn(12, D), shared, (3, 4)),  # rows 0, 1, 3: one group
                     (torch.randn(12, D), shared.clone(), (3, 4)),
                     (torch.randn(12, D), shared, (3, 4)),  # other grid
                     (torch.randn(12, D), shared, (3, 4)),
                     (torch.randn(6, D), grid_coords(2, 3), (2, 3)),  # other image
                     (torch.zeros(0, D), torch.zeros(0, 2), None),  # no image, two rows
                     (torch.zeros(0, D), torch.zeros(0, 2), None)]
    b = len(prog.features)
    h = torch.randn(b, 3, D)
    hh = torch.tensor([3, 3, 2, 3, 2, 2, 2])
    ww = torch.tensor([4, 4, 4, 4, 2, 3, 3])
    sel = list(range(b))
    with torch.no_grad():
        idx, zs = prog._latents(h, hh, ww, sel, torch.device("cpu"))
        assert sorted(len(i) for i in idx) == [1, 1, 2, 3]
        got = {int(i): z for ii, zz in zip(idx, zs) for i, z in zip(ii, zz)}
        assert sorted(got) == sel
        for i in sel:
            feats, coords, frame = prog.features[i]
            want, _ = mods.build_latents(h[i, 1], h[i, 2], int(hh[i]), int(ww[i]), feats,
                                         coords, frame or (int(hh[i]), int(ww[i])), 0.3, 0.2,
                                         noise=False)
            assert got[i].shape == want.shape
            assert torch.allclose(got[i], want, atol=1e-5, rtol=1e-5), \
                (i, (got[i] - want).abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_graphs_equal_eager(dtype, megatron_single_rank):
    """On a GPU: `LatentGraphs` runs a shape eager the first time, captures it the second and
    replays it after; every call equals `inference_latents` eager exactly (same kernels)."""
    from megatron_latent.latent.deeplatent_decode import LatentGraphs
    from megatron_latent.latent.latentformer import DeepLatentModules, parallel_linear_config

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    mods = DeepLatentModules(parallel_linear_config(1, dtype), 64, 4, grid_size=4,
                             mlp_hidden=16).cuda().eval()
    with torch.no_grad():
        for mlp in (mods.mlp_l, mods.mlp_i):
            mlp.fc2.weight.normal_(0, 0.1)
            mlp.fc2.bias.normal_(0, 0.1)
    graphs = LatentGraphs()
    with torch.no_grad():
        for _ in range(4):  # eager, capture, replay, replay
            h_l, h_i = (torch.randn(2, 64, device="cuda", dtype=dtype) for _ in range(2))
            feats = torch.randn(6, 2, 64, device="cuda", dtype=dtype)
            want = mods.inference_latents(h_l, h_i, 3, 4, feats, grid_coords(2, 3), (2, 3))
            got = graphs(mods, h_l, h_i, 3, 4, feats, grid_coords(2, 3), (2, 3)).clone()
            assert torch.equal(got, want)
        assert len(graphs.graphs) == 1
        # another layout (same sizes, other coordinates) is another shape
        other = torch.tensor([[0., 0.], [0., 1.], [0., 2.], [1., 0.], [2., 0.], [3., 0.]])
        want = mods.inference_latents(h_l, h_i, 3, 4, feats, other, (2, 3))
        assert torch.equal(graphs(mods, h_l, h_i, 3, 4, feats, other, (2, 3)), want)
        assert len(graphs.graphs) == 1  # seen once: eager


@pytest.mark.gpu
def test_deeplatent_generation_graphed_equals_eager(tiny_ckpts, megatron_single_rank):
    """On a GPU, fp32: DeepLatent generation with graphed decode steps, chunk forwards and
    LatentFormer calls (captured on a shape's second sighting) = all eager: same tokens, latent
    positions and mRoPE offsets; latents and log-probs within 1e-4 (the chunk graphs pad the
    grid chunk to 16 x 16 + 1 with masked slots)."""
    from megatron_latent.conversion.hf_load import load_hf_weights
    from megatron_latent.inference.generator import Generator
    from megatron_latent.inference.prompts import build_prompt
    from megatron_latent.inference.sampling import SamplingParams
    from megatron_latent.latent import registry
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
    from megatron_latent.models.qwen25vl.model import Qwen25VLModel
    from megatron_latent.testing.samples import photos
    from transformers import AutoProcessor

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    path = tiny_ckpts["tiny-a"]
    proc = AutoProcessor.from_pretrained(path)
    cfg = Qwen25VLConfig.from_hf(path)
    method = registry.build("deeplatent", proc.tokenizer, cfg, {"stage": 2, "max_blocks": 2})
    torch.manual_seed(0)
    model = Qwen25VLModel(cfg, latent_modules=method.build_modules(cfg, pre_process=True,
                                                                   post_process=True))
    load_hf_weights(model, path)
    mods = model.latent_modules
    with torch.no_grad():  # non-trivial modulations; 2 x 3 grids
        for mlp in (mods.mlp_l, mods.mlp_i):
            mlp.fc2.weight.normal_(0, 0.02)
        mods.scale_head.h.bias[1] += 100.0
        mods.scale_head.w.bias[2] += 100.0
    model = model.cuda().eval()
    ph = photos()
    prompts = [build_prompt(proc, "Where is the astronaut looking?", [ph[0]],
                            answer_prefix="<latent>"),
               build_prompt(proc, "Describe the cat.", [ph[2]])]  # no event: it waits
    params = SamplingParams(max_new_tokens=24)
    pad = proc.tokenizer.pad_token_id
    runs = {}
    for graphs in (False, True):
        gen = Generator(model, rule=method.decode_program(), cuda_graphs=graphs, pad_id=pad)
        first = [gen.generate(prompts, params) for _ in range(2)]  # eager, then captures
        runs[graphs] = gen.generate(prompts, params)  # replays
        assert all([c.tokens for c in f] == [c.tokens for c in runs[graphs]] for f in first)
    assert len(gen.rule._graphs.graphs) == 1
    assert runs[True][0].latent_positions and not runs[True][1].latent_positions
    for eager, graphed in zip(runs[False], runs[True]):
        assert graphed.tokens == eager.tokens
        assert graphed.latent_positions == eager.latent_positions
        assert torch.equal(graphed.position_offsets, eager.position_offsets)
        assert torch.allclose(graphed.latents, eager.latents, atol=1e-4, rtol=0)
        assert max(abs(x - y) for x, y in zip(graphed.logprobs, eager.logprobs)) <= 1e-4
    print(f"\n[deeplatent fp32] graphed == eager: {[c.tokens for c in runs[True]]}")
