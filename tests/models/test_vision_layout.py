"""Window/position bookkeeping of the vision tower against transformers' helpers and by hand."""

from __future__ import annotations

import pytest
import torch
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from megatron_latent.models.qwen25vl.vision import vision_layout

GRIDS = [[[1, 8, 10]], [[1, 10, 6], [1, 8, 8]], [[1, 16, 16], [1, 6, 22]], [[2, 4, 4]]]


@pytest.mark.parametrize("grids", GRIDS)
@pytest.mark.parametrize("window_merged", [2, 3, 4])
def test_matches_transformers(grids, window_merged):
    g = torch.tensor(grids)
    lay = vision_layout(g, merge=2, window_merged=window_merged)
    ref_index, ref_cu = get_vision_window_index(g, spatial_merge_size=2,
                                                window_size=window_merged * 28, patch_size=14)
    assert torch.equal(lay.window_index, ref_index)
    _, counts = torch.unique_consecutive(lay.segments[1], return_counts=True)
    assert torch.equal(torch.cat([torch.zeros(1), counts.cumsum(0)]).int(), ref_cu)
    cu_window, longest = lay.cu_seqlens[1]  # host-computed, handed to TE attention
    assert torch.equal(cu_window, ref_cu) and longest == int(ref_cu.diff().max())
    assert torch.equal(lay.restore, torch.argsort(ref_index))
    ref_pos = get_vision_position_ids(g, 2).view(-1, 4, 2)[ref_index].view(-1, 2)
    assert torch.equal(lay.hw_positions, ref_pos)
    # full-attention segments: one per frame, each of t*h*w / t patches
    _, frame_counts = torch.unique_consecutive(lay.segments[0], return_counts=True)
    assert frame_counts.tolist() == [h * w for t, h, w in grids for _ in range(t)]


def test_hand_worked_windows():
    # a 3 x 3 merged grid with 2 x 2 windows: windows {0,1,3,4}, {2,5}, {6,7}, {8}
    lay = vision_layout(torch.tensor([[1, 6, 6]]), merge=2, window_merged=2)
    assert lay.window_index.tolist() == [0, 1, 3, 4, 2, 5, 6, 7, 8]
    _, counts = torch.unique_consecutive(lay.segments[1], return_counts=True)
    assert (counts // 4).tolist() == [4, 2, 2, 1]
    assert lay.cu_seqlens[1][0].tolist() == [0, 16, 24, 32, 36]  # patches: 4 per merged token
    assert lay.cu_seqlens[0][0].tolist() == [0, 36] and lay.cu_seqlens[0][1] == 36


@pytest.mark.parametrize("grids", [[[1, 8, 8], [1, 8, 8]], [[1, 10, 6], [1, 8, 8]],
                                   [[1, 16, 16], [1, 6, 22]]])
def test_local_attention_by_length_equals_block_diagonal_mask(grids, megatron_single_rank):
    """The local vision attention runs each length's segments as one batched SDPA call; the
    oracle is one SDPA over the packed sequence with the block-diagonal mask (windows and whole
    frames, equal and mixed lengths)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_latent.models.qwen25vl.vision_attention import VisionLocalAttention

    lay = vision_layout(torch.tensor(grids), merge=2, window_merged=2).to("cpu")
    s = lay.segments.shape[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, 1, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                            attention_dropout=0.0)
    for row, full_layers in ((0, {1}), (1, set())):  # layer 1 full attention, or windowed
        attn = VisionLocalAttention(cfg, 1, None, None, full_attention_layers=full_layers)
        got = attn(q, k, v, lay.segments)
        seg = lay.segments[row]
        want = torch.nn.functional.scaled_dot_product_attention(
            *(t.permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=seg[:, None] == seg[None, :])
        assert torch.allclose(got, want.permute(2, 0, 1, 3).reshape(s, 1, -1), atol=1e-12)
        assert row in lay.segments._length_groups  # the grouped path ran, not the mask
