"""Self-attention that decodes from a `KVCache`; otherwise megatron-core's SelfAttention as is.

Only the cached path is overridden (projections, RoPE and the output projection are megatron's
own modules and functions), so the state dict and the training path are unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention

from megatron_latent.inference.kv_cache import KVCache


class CachedSelfAttention(SelfAttention):
    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, *args, **kwargs):
        if not isinstance(inference_context, KVCache):
            return super().forward(hidden_states, attention_mask, key_value_states,
                                   inference_context, rotary_pos_emb, *args, **kwargs)
        if self.config.sequence_parallel:
            raise ValueError("cached decoding does not support sequence parallelism; build the "
                             "generation model with sequence_parallel=False")
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)[:3]
        if rotary_pos_emb is not None:
            freqs = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            if freqs.shape[-1] == query.shape[-1] and not self.config.rotary_interleaved:
                cos, sin = inference_context.rope_cos_sin(freqs, query.dtype)
                query, key = _rope(query, cos, sin), _rope(key, cos, sin)
            else:  # partial or interleaved rotary: megatron's own function
                query = apply_rotary_pos_emb(query, freqs, config=self.config)
                key = apply_rotary_pos_emb(key, freqs, config=self.config)
        scale = self.config.softmax_scale or query.shape[-1] ** -0.5
        context = inference_context.attend(self.layer_number, query, key, value, scale)
        return self.linear_proj(context)


def _rope(x, cos, sin):
    """megatron's non-interleaved RoPE (x * cos + rotate_half(x) * sin) with cos/sin computed
    once per forward instead of in every layer."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
