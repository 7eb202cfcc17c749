"""DeepLatent's decode program builds the latents of rows with the same grid and question-image
layout in one batched LatentFormer call: equal (fp32) to `build_latents` row by row."""

from __future__ import annotations

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
    prog.modules = mods
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
