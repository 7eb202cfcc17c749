"""The Qwen2.5-VL vision tower on megatron-core: patch embedding, 2-D rotary, window attention
blocks (a stock TransformerBlock), and the 2x2 patch merger into the LLM width.

Tensor parallel like the LLM (column/row-parallel linears); it sits on the first pipeline stage.
All images of a micro-batch are one packed sequence [s, 1, h]; attention never crosses images
(full layers) or windows (window layers). Output rows are merged tokens in row-major order per
image, images in input order: exactly the order of the image-pad tokens in the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_latent.models.qwen25vl import specs
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.vision_attention import segments_to_cu_seqlens, set_cu_seqlens
from megatron_latent.models.qwen25vl.vision_graphs import VisionGraphs


@dataclass
class VisionLayout:
    """Index bookkeeping for one micro-batch of images, computed on the host from grid_thw (no
    device synchronisation), then moved to the device once with `to`."""

    window_index: torch.Tensor  # [n_merged] merged-token order that makes windows contiguous
    segments: torch.Tensor  # [2, n_patches] image id / window id, in windowed order
    hw_positions: torch.Tensor  # [n_patches, 2] (row, col) of each patch, in windowed order
    restore: torch.Tensor  # [n_merged] inverse of window_index
    cu_seqlens: tuple  # per segments row: (cumulative lengths int32 [n+1], longest)

    def to(self, device) -> "VisionLayout":
        cu = tuple((c.to(device, non_blocking=True), m) for c, m in self.cu_seqlens)
        lay = VisionLayout(*(t.to(device, non_blocking=True) for t in
                             (self.window_index, self.segments, self.hw_positions, self.restore)),
                           cu)
        # the attention layers read the cu_seqlens off the segments tensor they all receive
        set_cu_seqlens(lay.segments, cu, tuple(c for c, _ in self.cu_seqlens))
        return lay


def vision_layout(grid_thw: torch.Tensor, merge: int, window_merged: int) -> VisionLayout:
    """`window_merged`: window side in merged tokens (window_size // patch // merge)."""
    unit = merge * merge
    window_index, window_ids, frame_ids, positions = [], [], [], []
    merged_offset = n_windows = n_frames = 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        # merged-token ids grouped by window: pad the grid up to whole windows, then read
        # window by window (row-major within a window), dropping the padding.
        nh, nw = -(-gh // window_merged), -(-gw // window_merged)
        ids = torch.full((t, nh * window_merged, nw * window_merged), -1, dtype=torch.long)
        ids[:, :gh, :gw] = torch.arange(t * gh * gw).view(t, gh, gw)
        ids = ids.view(t, nh, window_merged, nw, window_merged).permute(0, 1, 3, 2, 4)
        ids = ids.reshape(t * nh * nw, window_merged * window_merged)
        win = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
        keep = ids >= 0
        window_index.append(ids[keep] + merged_offset)
        window_ids.append((win[keep] + n_windows).repeat_interleave(unit))
        frame_ids.append((torch.arange(t) + n_frames).repeat_interleave(gh * gw * unit))
        # (row, col) of each patch, patches of one merged token adjacent (merge-block order)
        rows = torch.arange(h).view(gh, merge, 1, 1).expand(gh, merge, gw, merge)
        cols = torch.arange(w).view(1, 1, gw, merge).expand(gh, merge, gw, merge)
        pos = torch.stack([rows.permute(0, 2, 1, 3).reshape(-1),
                           cols.permute(0, 2, 1, 3).reshape(-1)], dim=-1).repeat(t, 1)
        positions.append(pos)
        merged_offset += t * gh * gw
        n_windows += ids.shape[0]
        n_frames += t
    window_index = torch.cat(window_index)
    positions = torch.cat(positions).view(-1, unit, 2)[window_index].view(-1, 2)
    # frame ids are constant within a merged token and windows never straddle frames, so
    # permuting by window_index keeps frames contiguous.
    frames = torch.cat(frame_ids).view(-1, unit)[window_index].view(-1)
    segments = torch.stack([frames, torch.cat(window_ids)])
    return VisionLayout(window_index, segments, positions, torch.argsort(window_index),
                        tuple(segments_to_cu_seqlens(row) for row in segments))


class VisionRotaryEmbedding(torch.nn.Module):
    """2-D rotary: half of each head's frequencies follow the row, half the column."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        quarter = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, hw_positions: torch.Tensor) -> torch.Tensor:
        """[n, 2] -> rotary angles [n, 1, 1, head_dim] in megatron's (non-interleaved) layout."""
        freqs = hw_positions.float()[..., None] * self.inv_freq.to(hw_positions.device)
        freqs = freqs.flatten(1)  # [n, head_dim/2]: row freqs then column freqs
        return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]


class Qwen25VisionModel(MegatronModule):
    def __init__(self, cfg: Qwen25VLConfig, pg_collection=None):
        config = cfg.vision_transformer_config()
        super().__init__(config=config)
        self.cfg = cfg
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        # The Conv3d with stride == kernel of HF is a linear map of each flattened patch.
        self.patch_embed = torch.nn.Linear(patch_dim, cfg.vision_hidden_size, bias=False,
                                           dtype=cfg.params_dtype)
        self.rotary = VisionRotaryEmbedding(config.kv_channels, cfg.vision_rope_theta)
        full = frozenset(i + 1 for i in cfg.fullatt_block_indexes)
        # final_layernorm of the block is the merger's RMSNorm (HF merger.ln_q).
        self.decoder = TransformerBlock(config, specs.vision_layer_spec(cfg.spec, full),
                                        post_layer_norm=True, pre_process=True,
                                        post_process=True, pg_collection=pg_collection)
        self.merger = build_module(specs.merger_mlp_spec(cfg.spec),
                                   config=cfg.merger_transformer_config(),
                                   input_size=cfg.vision_hidden_size * cfg.merge_unit)
        self.graphs = VisionGraphs(cfg.vision_graphs if not cfg.vision_fp8 else 0)
        self._zero_ffn_padding()

    @torch.no_grad()
    def _zero_ffn_padding(self) -> None:
        """A freshly initialised tower's MLP padding (cfg.vision_ffn_padded_size) must be zero,
        as a converted one's is: otherwise the export to HF, which drops it, changes the model."""
        from megatron.core import parallel_state

        cfg = self.cfg
        local = cfg.vision_ffn_padded_size // cfg.tensor_model_parallel_size
        rank = parallel_state.get_tensor_model_parallel_rank()
        start = min(max(cfg.vision_ffn_hidden_size - rank * local, 0), local)
        for layer in self.decoder.layers:
            fc1, fc2 = layer.mlp.linear_fc1, layer.mlp.linear_fc2
            for t in (fc1.weight, fc1.bias):  # this rank's [gate_r; up_r]
                t.view(2, local, *t.shape[1:])[:, start:] = 0
            fc2.weight[:, start:] = 0

    def _apply(self, fn, *args, **kwargs):
        if hasattr(self, "graphs"):  # .to()/.cpu()/.half() move the weights the graphs read
            self.graphs.reset()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [n_patches, C*T*P*P] (the HF processor's layout), grid_thw [n_images, 3]
        -> merged image features [n_patches / 4, LLM hidden]."""
        grid = grid_thw.cpu()  # host bookkeeping: keep grid_thw on the host to avoid a sync
        expected = int(grid.prod(-1).sum())
        if pixel_values.shape[0] != expected:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw "
                             f"{grid.tolist()} implies {expected}")
        key = tuple(map(tuple, grid.tolist()))
        make_layout = lambda: self.layout(grid, pixel_values.device)  # noqa: E731
        dtype = self.patch_embed.weight.dtype
        if self.graphs.usable(self, pixel_values, key):
            return self.graphs.run(key, self.run, pixel_values, dtype, make_layout)
        return self.run(pixel_values.to(dtype), make_layout())

    def layout(self, grid_thw: torch.Tensor, device) -> VisionLayout:
        """The window bookkeeping of these images (host grid_thw), on `device`."""
        cfg = self.cfg
        window = cfg.window_size // cfg.patch_size // cfg.spatial_merge_size
        return vision_layout(grid_thw, cfg.spatial_merge_size, window).to(device)

    def run(self, pixel_values: torch.Tensor, lay: VisionLayout) -> torch.Tensor:
        """The device part of the forward: no host synchronisation (CUDA-graph capturable)."""
        unit = self.cfg.merge_unit
        x = self.patch_embed(pixel_values)
        x = x.view(-1, unit, x.shape[-1])[lay.window_index].view(-1, 1, x.shape[-1])
        x = self.decoder(hidden_states=x, attention_mask=lay.segments,
                         rotary_pos_emb=self.rotary(lay.hw_positions))
        x, bias = self.merger(x.view(-1, unit * x.shape[-1]))
        if bias is not None:
            x = x + bias
        return x[lay.restore]
