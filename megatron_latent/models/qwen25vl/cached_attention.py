"""The LLM's self-attention: megatron-core's SelfAttention, plus decoding from a `KVCache` and
TE's fused RoPE for mRoPE.

The fused QKV projection and the output projection are megatron's own modules, so the state dict
is unchanged. Two paths are ours:
- Training/prefill with `fused_rope`: megatron applies TE's fused RoPE only to one position row
  ([s, 1, 1, d]); mRoPE has a row per sample ([s, b, 1, d]), and a packed (THD) row holds
  positions that restart per image/sample, which TE's THD kernel would misread. Both are one
  row per token: merging s and b of q/k ([s*b, 1, h, d], a view) and of the angles makes every
  case a single-row call, exact. Without it megatron runs ~6 unfused kernels per tensor and
  their backward (~14 ms of a 7B-shaped 8-micro-batch LVR step on an H200).
- The cached path keeps the projection's [s, b, groups, (heads_per_group + 2) * d] layout
(a decode step on a GPU: our RMSNorm + GEMM, decode_norm_linear.py, then one Triton kernel
for the bias, RoPE and the cache write, decode_rope.py), applies RoPE to all heads of a group
in one pass, and hands the grouped heads to the cache, which stores each group's
key and value side by side with one write (fewer, larger kernels: a decode step is launch-bound
at small batch).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.attention import SelfAttention

from megatron_latent.ops import decode_norm_linear
from megatron_latent.models.qwen25vl.kv_cache import KVCache


class CachedSelfAttention(SelfAttention):
    def __init__(self, *args, fused_rope: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_rope = fused_rope
        self._rope_freqs = None  # set for the duration of one forward (fused_rope)

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, *args, **kwargs):
        if not isinstance(inference_context, KVCache):
            if self._rope_fusable(inference_context, rotary_pos_emb):
                # applied in get_query_key_value_tensors; megatron then sees no RoPE to apply
                self._rope_freqs, rotary_pos_emb = rotary_pos_emb, None
            try:
                return super().forward(hidden_states, attention_mask, key_value_states,
                                       inference_context, rotary_pos_emb, *args, **kwargs)
            finally:
                self._rope_freqs = None
        if self.config.sequence_parallel:
            raise ValueError("cached decoding does not support sequence parallelism; build the "
                             "generation model with sequence_parallel=False")
        if self.config.rotary_interleaved:
            raise NotImplementedError("cached decoding implements non-interleaved RoPE only")
        d = self.hidden_size_per_attention_head
        scale = self.config.softmax_scale or d ** -0.5
        freqs = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
        if freqs is not None and inference_context.fused_decode(hidden_states, d):
            bias = None  # TE's RMSNorm + GEMM with bias, or ours with the bias left to RoPE
            if decode_norm_linear.fusable(self.linear_qkv) and not self.config.fp8:
                mixed, bias = decode_norm_linear.project(self.linear_qkv, hidden_states)
            else:
                mixed, _ = self.get_query_key_value_tensors(hidden_states, None, split_qkv=False)
            s, b = hidden_states.shape[:2]
            heads = mixed.view(s, b, self.num_query_groups_per_partition, -1, d)
            return self.linear_proj(
                inference_context.decode_step(self.layer_number, heads, freqs, scale, bias))
        mixed, _ = self.get_query_key_value_tensors(hidden_states, None, split_qkv=False)
        s, b, g = mixed.shape[:3]
        heads = mixed.view(s, b, g, -1, d)  # per group: r query heads, then key, then value
        if freqs is not None:
            cos, sin = inference_context.rope_tables(freqs, heads.dtype, heads.shape[3])
            # megatron's non-interleaved RoPE, x * cos + rotate_half(x) * sin, as three kernels
            # over all heads at once: rotate_half(x) = roll(x, d/2) * [-1.., +1..] (the sign is
            # folded into `sin`); the value slot has cos 1, sin 0 and passes through exactly
            heads = torch.addcmul(heads * cos, heads.roll(d // 2, dims=-1), sin)
        return self.linear_proj(inference_context.attend(self.layer_number, heads, scale))

    def _rope_fusable(self, inference_context, rotary_pos_emb) -> bool:
        """Plain RoPE with one angle tensor for q and k, as Qwen2.5-VL has; megatron's own path
        keeps what this one does not do (YaRN's mscale, layers without RoPE, CP)."""
        if not self.fused_rope or inference_context is not None or rotary_pos_emb is None:
            return False
        if isinstance(rotary_pos_emb, tuple) and rotary_pos_emb[0] is not rotary_pos_emb[1]:
            return False
        return (self._yarn_concentration_factor == 1.0 and not self.config.no_rope_freq
                and self.config.context_parallel_size == 1)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None,
                                    output_gate=False, split_qkv=True):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                  output_gate=output_gate, split_qkv=split_qkv)
        if self._rope_freqs is None:
            return out
        if not split_qkv:  # megatron asks for the unsplit tensor only when it fuses RoPE itself
            raise RuntimeError("fused mRoPE expects split q/k/v")
        freqs = self._rope_freqs[0] if isinstance(self._rope_freqs, tuple) else self._rope_freqs
        query, key = (_rope_per_token(t, freqs, self.config.rotary_interleaved) for t in out[:2])
        return (query, key, *out[2:])


def _rope_per_token(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """TE's fused RoPE with one angle row per token: t [s, b, h, d], freqs [s, b, 1, d] (b = 1
    for packed rows). Merging s and b is a view of both (s's stride is b times b's)."""
    from megatron.core.extensions.transformer_engine import fused_apply_rotary_pos_emb

    s, b = t.shape[:2]
    if freqs.shape[:2] != (s, b):
        raise ValueError(f"mRoPE angles {tuple(freqs.shape)} do not match q/k {tuple(t.shape)}")
    out = fused_apply_rotary_pos_emb(t.reshape(s * b, 1, *t.shape[2:]),
                                     freqs.reshape(s * b, 1, 1, freqs.shape[-1]),
                                     interleaved=interleaved)
    return out.view(t.shape)
