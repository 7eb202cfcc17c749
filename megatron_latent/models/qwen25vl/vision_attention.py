"""Core attention for the Qwen2.5-VL vision tower: full or window attention, chosen per layer.

Every vision layer receives the same `attention_mask` argument: an int tensor `segments` of shape
[2, s]; row 0 numbers the image (frame) each token belongs to, row 1 the attention window. A layer
whose 1-based number is in `full_attention_layers` attends within row-0 segments, the others within
row-1 segments. Passing one tensor keeps the stock TransformerBlock/TransformerLayer untouched and
works with activation recompute (it is an ordinary tensor argument).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.extensions.transformer_engine import TEDotProductAttention
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

FULL, WINDOW = 0, 1


def segments_to_cu_seqlens(seg: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Contiguous segment ids [s] -> cumulative lengths [n+1] (int32) and the longest segment."""
    _, counts = torch.unique_consecutive(seg, return_counts=True)
    cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return cu, int(counts.max())


def set_cu_seqlens(segments: torch.Tensor, cu_seqlens: tuple, host_cu: tuple = ()) -> None:
    """Attach the cu_seqlens of each row to the segments tensor every layer receives (the stock
    TransformerBlock passes layers one `attention_mask` argument); `host_cu`: the same on the
    host, from which the local path groups segments by length (`length_groups`)."""
    segments._cu_seqlens = dict(enumerate(cu_seqlens))
    segments._host_cu = host_cu


def length_groups(cu: torch.Tensor, device) -> list[tuple[int, torch.Tensor | None]]:
    """Segments grouped by length: (L, the token indices of its segments [n * L] on `device`,
    or None when every segment has length L: the whole sequence is [n, L] as it lies)."""
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if len(set(lengths)) == 1:
        return [(lengths[0], None)]
    groups: dict[int, list] = {}
    for a, n in zip(bounds, lengths):
        groups.setdefault(n, []).append(torch.arange(a, a + n))
    return [(n, torch.cat(v).to(device, non_blocking=True)) for n, v in sorted(groups.items())]


class VisionLocalAttention(MegatronModule):
    """torch SDPA within each segment (CPU, tests, no TE): segments of one length run as one
    batched call, so the cost is sum(L^2), not (all patches)^2 as one block-diagonal mask over
    the packed sequence would be (measured: 3.8 of 5.1 s of a 64-image prefill on an H200).
    Without the host lengths (a recompute's detached copy) it falls back to that mask."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, full_attention_layers=frozenset()):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.row = FULL if layer_number in full_attention_layers else WINDOW
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        groups = self._groups(attention_mask)
        if groups is not None and query.shape[1] == 1:
            return self._by_length(query, key, value, groups)
        seg = attention_mask[self.row]
        allowed = seg[:, None] == seg[None, :]  # [s, s], True = may attend
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _groups(self, segments):
        """This row's length groups, cached on the segments tensor (first computed outside any
        CUDA-graph capture: the vision graphs run the forward once before capturing)."""
        host = getattr(segments, "_host_cu", ())
        if not host:
            return None
        cache = segments.__dict__.setdefault("_length_groups", {})
        if self.row not in cache:
            cache[self.row] = length_groups(host[self.row], segments.device)
        return cache[self.row]

    def _by_length(self, query, key, value, groups):
        s = query.shape[0]
        q, k, v = (t.squeeze(1) for t in (query, key, value))  # [s, n, d]
        out = None if groups[0][1] is None else torch.empty_like(q)
        for n, idx in groups:
            parts = [(t if idx is None else t.index_select(0, idx)).view(-1, n, *t.shape[1:])
                     .transpose(1, 2) for t in (q, k, v)]  # [segments, heads, n, d]
            o = F.scaled_dot_product_attention(
                *parts, scale=self.softmax_scale,
                dropout_p=self.dropout if self.training else 0.0).transpose(1, 2)
            if idx is None:
                return o.reshape(s, 1, -1)
            out.index_copy_(0, idx, o.reshape(-1, *q.shape[1:]))
        return out.reshape(s, 1, -1)


class VisionTEAttention(TEDotProductAttention):  # raises at construction when TE is absent
    """TE fused attention over variable-length segments (THD with cu_seqlens)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type="p2p",
                 pg_collection=None, full_attention_layers=frozenset()):
        super().__init__(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                         attention_type=attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection)
        self.row = FULL if layer_number in full_attention_layers else WINDOW

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        from megatron.core.transformer.enums import AttnMaskType

        s, b = query.shape[0], query.shape[1]
        assert b == 1, "vision tokens of all images form one packed sequence"
        attached = getattr(attention_mask, "_cu_seqlens", None)  # set by VisionLayout.to
        # (activation recompute hands layers a detached copy, without the attribute: compute)
        cu, max_len = (attached[self.row] if attached is not None
                       else segments_to_cu_seqlens(attention_mask[self.row]))
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                              max_seqlen_q=max_len, max_seqlen_kv=max_len)
        out = super().forward(query.squeeze(1), key.squeeze(1), value.squeeze(1), None,
                              attn_mask_type=AttnMaskType.no_mask, packed_seq_params=psp)
        return out.reshape(s, b, -1)
