"""DeepLatent's side modules at TP=2 (gloo, 2 processes): loaded from a TP=1 dist checkpoint,
the TP-sharded LatentFormer gives the TP=1 latents and every parameter the TP=1 gradient (a
sharded one: its slice), with and without noise; a checkpoint saved at TP=2 loads at TP=1."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.testing.distributed import run_distributed
from megatron_latent.testing.parity_workers import latentformer_tp_run

pytestmark = pytest.mark.slow
SHAPE = dict(dim=32, num_heads=4, grid_size=4, mlp_hidden=16, latentformer_layers=2,
             latentformer_ffn=True)


def _modules():
    from megatron_latent.latent.latentformer import DeepLatentModules, parallel_linear_config

    shape = dict(SHAPE)
    dim, heads = shape.pop("dim"), shape.pop("num_heads")
    return DeepLatentModules(parallel_linear_config(1, torch.float32), dim, heads, **shape)


def test_tp2_matches_tp1_and_reshards_both_ways(megatron_single_rank, tmp_path):
    from megatron.core import dist_checkpointing

    torch.manual_seed(0)
    mods = _modules()
    with torch.no_grad():  # non-trivial modulation, norms and biases
        for p in mods.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = SHAPE["dim"]
    inputs = dict(h_l=torch.randn(d), h_i=torch.randn(d), height=2, width=3,
                  feats=torch.randn(12, d), feat_coords=None, feat_grid=(3, 4), sigma_q=0.1,
                  sigma_f=0.2)
    weights = torch.randn(6, d)
    results = {}
    for noise in (False, True):
        mods.zero_grad(set_to_none=True)
        lat, _ = mods.build_latents(**inputs, noise=noise,
                                    generator=torch.Generator().manual_seed(5))
        (lat * weights).sum().backward()
        results[noise] = {"latents": lat.detach(),
                          "grads": {n: p.grad.clone() for n, p in mods.named_parameters()
                                    if p.grad is not None}}
    (tmp_path / "tp1").mkdir()
    dist_checkpointing.save(mods.sharded_state_dict(), str(tmp_path / "tp1"))
    torch.save({"shape": SHAPE, "inputs": inputs, "weights": weights, "results": results},
               tmp_path / "ref.pt")

    run_distributed(latentformer_tp_run, 2, str(tmp_path / "ref.pt"), str(tmp_path / "tp1"),
                    str(tmp_path / "tp2"), str(tmp_path / "errs.pt"), timeout=300)
    errs = torch.load(tmp_path / "errs.pt")
    assert any(k.startswith("grad/noise=True/latentformer.blocks.1.ffn") for k in errs)
    assert len(errs) == 2 * (1 + sum(1 for n in results[True]["grads"]))
    bad = {k: v for k, v in errs.items() if v > 1e-5}
    assert not bad, bad

    # the reverse: the TP=2 checkpoint (after p -= 0.01 * grad at TP=2) loads at TP=1
    back = _modules()
    back.load_state_dict(dist_checkpointing.load(back.sharded_state_dict(),
                                                 str(tmp_path / "tp2")))
    grads = results[True]["grads"]
    for name, p in back.named_parameters():
        want = mods.get_parameter(name).detach() - 0.01 * grads.get(name, torch.zeros_like(p))
        assert torch.allclose(p, want, atol=1e-6), name
