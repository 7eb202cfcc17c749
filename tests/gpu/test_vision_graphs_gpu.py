"""On a GPU: the frozen vision tower replayed from a CUDA graph equals its eager forward, one
graph per image-grid layout, and a tower that trains never goes through a graph.
Run: pytest tests/gpu -s"""

from __future__ import annotations

import pytest
import torch

from megatron_latent.conversion.hf_load import load_hf_weights
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel

pytestmark = pytest.mark.gpu


def _pixels(cfg, grids, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    return torch.randn(n, dim, generator=g).cuda(), torch.tensor(grids)


@pytest.mark.parametrize("spec", ["te", "local"])
def test_vision_graph_equals_eager(spec, tiny_ckpts, megatron_single_rank):
    if spec == "te":
        pytest.importorskip("transformer_engine")
    path = tiny_ckpts["tiny-a"]
    cfg = Qwen25VLConfig.from_hf(path, spec=spec, params_dtype=torch.bfloat16)
    model = Qwen25VLModel(cfg).cuda()
    load_hf_weights(model, path)
    vision = model.vision
    vision.requires_grad_(False)
    layouts = [[[1, 16, 16]], [[1, 8, 12], [1, 16, 8]]]
    for i, grids in enumerate(layouts):
        px, grid = _pixels(cfg, grids, i)
        vision.graphs.capacity = 0
        eager = vision(px, grid)
        vision.graphs.capacity = 4
        first = vision(px, grid)  # a layout seen once runs eagerly
        assert vision.graphs.captures == i and torch.equal(first, eager)
        graphed = [vision(px, grid) for _ in range(2)]  # seen twice: capture; then replay
        assert vision.graphs.disabled_reason is None, vision.graphs.disabled_reason
        assert vision.graphs.captures == i + 1  # one graph per layout, reused
        for out in graphed:
            diff = (out.float() - eager.float()).abs().max().item()
            print(f"\n[{spec}] grids {grids}: graph vs eager max diff {diff:.2e}")
            assert diff == 0.0  # the same kernels (measured 0 on an H200)
        px2, _ = _pixels(cfg, grids, 100 + i)  # new pixels, same layout: the replay reads them
        assert torch.equal(vision(px2, grid),
                           vision.run(px2.to(torch.bfloat16), vision.layout(grid, "cuda")))
    # moved to other memory and back (the RL reference's host offload): the old weights' memory
    # is kept alive and zeroed, so a graph replayed over it would give different features
    px, grid = _pixels(cfg, layouts[0], 0)
    before = vision(px, grid)
    old = [t.data for t in vision.parameters()]
    vision.cpu()
    vision.cuda()
    for t in old:
        t.zero_()
    again = [vision(px, grid) for _ in range(3)]  # eager, capture, replay
    assert all(torch.equal(a, before) for a in again)
    vision.requires_grad_(True)  # a trained tower: eager with autograd
    px, grid = _pixels(cfg, layouts[0], 0)
    captures = vision.graphs.captures
    out = vision(px, grid)
    assert out.requires_grad and vision.graphs.captures == captures

