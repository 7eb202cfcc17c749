"""Self-attention that decodes from a `KVCache`; otherwise megatron-core's SelfAttention as is.

Only the cached path is overridden: the fused QKV projection and the output projection are
megatron's own modules, so the state dict and the training path are unchanged. The cached path
keeps the projection's [s, b, groups, (heads_per_group + 2) * d] layout, applies RoPE to all
heads of a group in one pass, and hands the grouped heads to the cache, which stores each group's
key and value side by side with one write (fewer, larger kernels: a decode step is launch-bound
at small batch).
"""

from __future__ import annotations

import torch
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
        if self.config.rotary_interleaved:
            raise NotImplementedError("cached decoding implements non-interleaved RoPE only")
        mixed, _ = self.get_query_key_value_tensors(hidden_states, None, split_qkv=False)
        s, b, g = mixed.shape[:3]
        d = self.hidden_size_per_attention_head
        heads = mixed.view(s, b, g, -1, d)  # per group: r query heads, then key, then value
        if rotary_pos_emb is not None:
            freqs = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            cos, sin = inference_context.rope_tables(freqs, heads.dtype, heads.shape[3])
            # megatron's non-interleaved RoPE, x * cos + rotate_half(x) * sin, as three kernels
            # over all heads at once: rotate_half(x) = roll(x, d/2) * [-1.., +1..] (the sign is
            # folded into `sin`); the value slot has cos 1, sin 0 and passes through exactly
            heads = torch.addcmul(heads * cos, heads.roll(d // 2, dims=-1), sin)
        scale = self.config.softmax_scale or d ** -0.5
        return self.linear_proj(inference_context.attend(self.layer_number, heads, scale))
