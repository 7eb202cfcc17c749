"""A static-shape KV cache for decoding, as a megatron-core inference context.

Why not megatron-core's `StaticInferenceContext` as is: it keeps the write offset as a Python int
(so each decode step has new tensor shapes and cannot be replayed as a CUDA graph), stores keys
before RoPE and re-rotates the whole prefix every step, and has no key-padding mask, which
left-padded batched prompts need. Its fast path (flash decode) needs flash-attn.

This context keeps the same contract for GPTModel and the transformer block (`is_static_batching`,
`is_decode_only`) and is read by `CachedSelfAttention` (attention.py): keys are stored rotated, the
write position is a device tensor, and attention runs over the whole fixed-length buffer with a
mask built on device, so every decode step has identical shapes and no host synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.inference.config import InferenceConfig
from megatron.core.inference.contexts.base_context import BaseInferenceContext

from megatron_latent.ops import decode_attention, decode_rope


class KVCache(BaseInferenceContext):
    """Per layer: keys and values side by side, [b, kv_heads_local, max_len, 2, head_dim] (one
    write per forward; attention reads strided views of each).

    `valid[b, j]` marks cache slots that hold a real token (prompt padding stays False).
    `write_index` (int64 scalar, on device) is where the next forward writes its first token.
    What every layer of one forward shares (the attention mask, RoPE cos/sin) is computed once.
    """

    def __init__(self, batch_size: int, max_len: int, device, dtype=None,
                 split_attention: bool = False):
        super().__init__(InferenceConfig(materialize_only_last_token_logits=False))
        # slots rounded up to 16: aligned masks keep SDPA on its fused kernels
        self.batch_size, self.max_len = batch_size, -(-max_len // 16) * 16
        self.device, self.dtype = torch.device(device), dtype
        self.buffers: dict[int, torch.Tensor] = {}
        self.valid = torch.zeros(batch_size, -(-max_len // 16) * 16, dtype=torch.bool, device=self.device)
        self.write_index = torch.zeros((), dtype=torch.long, device=self.device)
        self.slots = torch.arange(self.max_len, device=self.device)
        self.dense_prefill = False  # set by the generator: a prefill without padding
        # decode steps through the split-K kernel (decode_attention.py) instead of SDPA
        self.split_attention = split_attention
        self._rope = (None, None)
        self._rope_rows = (None, None)

    # ---- megatron-core's context protocol
    def is_static_batching(self) -> bool:
        return True

    def is_decode_only(self) -> bool:
        # False keeps megatron's own decode-only paths (flash decode, its RoPE offsets) out of
        # the way: CachedSelfAttention handles prefill and decode itself
        return False

    # ---- bookkeeping, called by the generator around each forward
    def mark(self, token_valid: torch.Tensor) -> None:
        """Before a forward of s tokens: record which are real ([b, s] bool) and build the mask
        all layers use. Key j is visible to query i iff it is a real token not in i's future;
        every query also sees itself, so padding rows are never fully masked (NaN). A forward of
        s > 1 tokens at write_index > 0 (a decode program's chunk append) is causal within its
        tokens and sees the whole valid cache; its tokens marked not real stay invisible to
        every later query (holes). It attends through SDPA (`attend`), s = 1 through the
        decode kernels where they run."""
        s = token_valid.shape[1]
        self.index = self.write_index + torch.arange(s, device=self.device)
        self.valid.index_copy_(1, self.index, token_valid.to(self.device))
        causal = self.slots.unsqueeze(0) <= self.index.unsqueeze(1)  # [s, L]
        itself = self.slots.unsqueeze(0) == self.index.unsqueeze(1)
        self.mask = ((causal.unsqueeze(0) & self.valid.unsqueeze(1)) | itself).unsqueeze(1)
        if s == 1:  # decode: an additive mask in the compute dtype, shared by all layers
            self.bias = torch.zeros(self.mask.shape, dtype=self.dtype or torch.float32,
                                    device=self.device).masked_fill(~self.mask, float("-inf"))

    def advance(self, n: int) -> None:
        self.write_index.add_(n)

    def reset(self) -> None:
        self.valid.zero_()
        self.write_index.zero_()

    # ---- used by CachedSelfAttention
    def rope_tables(self, freqs: torch.Tensor, dtype, heads: int):
        """(cos, signed sin), each [s, b, 1, heads, d], of this forward's RoPE angles
        [s, b, 1, d] for a group of `heads` (queries, key, then the value: cos 1, sin 0);
        computed by the first layer only (megatron computes them in every layer)."""
        if self._rope[0] is not freqs:
            f = freqs.unsqueeze(-2)
            cos, sin = decode_rope.cos_signed_sin(f)
            shape = (*f.shape[:-2], heads - 1, f.shape[-1])
            cos = torch.cat([cos.expand(shape), torch.ones_like(cos)], dim=-2).to(dtype)
            sin = torch.cat([sin.expand(shape), torch.zeros_like(sin)], dim=-2).to(dtype)
            self._rope = (freqs, (cos, sin))
        return self._rope[1]

    def fused_decode(self, hidden_states: torch.Tensor, head_dim: int) -> bool:
        """Whether this forward is one decode step through the Triton kernels: RoPE and the
        cache write fused (decode_rope.py), then split-K attention (decode_attention.py)."""
        return (hidden_states.shape[0] == 1 and self.split_attention
                and decode_attention.available(hidden_states, head_dim))

    def decode_step(self, layer_number: int, heads: torch.Tensor, freqs: torch.Tensor,
                    softmax_scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
        """heads [1, b, g, r + 2, d] before RoPE (and before the projection's `bias`, if
        given), angles [1, b, 1, d] -> context [1, b, g*r*d] (see fused_decode); the cos/sin
        rows are computed by the first layer."""
        _, b, g, n, d = heads.shape
        if b != self.batch_size:
            raise ValueError(f"KV cache holds {self.batch_size} sequences, forward has {b}")
        kv = self._buffer(layer_number, heads)
        if self._rope_rows[0] is not freqs:
            self._rope_rows = (freqs, decode_rope.rope_rows(freqs, b))
        q = decode_rope.rope_write(heads[0], *self._rope_rows[1], kv, self.index, bias)
        out = decode_attention.decode_attention(q, kv, self.mask, softmax_scale)
        return out.reshape(1, b, g * (n - 2) * d)

    def attend(self, layer_number: int, heads: torch.Tensor, softmax_scale: float) -> torch.Tensor:
        """heads [s, b, g, r + 2, d]: per KV group, r query heads then the key and the value
        (rotated) -> context [s, b, g*r*d] (megatron's head order)."""
        s, b, g, n, d = heads.shape
        r = n - 2
        if b != self.batch_size:
            raise ValueError(f"KV cache holds {self.batch_size} sequences, forward has {b}")
        kv = self._buffer(layer_number, heads)
        kv.index_copy_(2, self.index, heads[:, :, :, r:].permute(1, 2, 0, 3, 4).to(kv.dtype))
        k_buf, v_buf = kv[:, :, :, 0], kv[:, :, :, 1]
        if s == 1 and self.split_attention and decode_attention.available(heads):
            out = decode_attention.decode_attention(heads[0, :, :, :r], kv, self.mask,
                                                    softmax_scale)
            return out.reshape(1, b, g * r * d)
        if s == 1:
            # decode: a group's r query heads act as r queries against its one KV head, so
            # K and V are read once (no GQA repeat) by one fused attention kernel
            out = F.scaled_dot_product_attention(heads[0, :, :, :r], k_buf, v_buf,
                                                 attn_mask=self.bias, scale=softmax_scale)
            return out.reshape(1, b, g * r * d)
        q = heads[:, :, :, :r].permute(1, 2, 3, 0, 4).reshape(b, g * r, s, d)
        if self.dense_prefill:  # no padding, empty cache before: plain causal (flash kernels)
            out = F.scaled_dot_product_attention(q, k_buf[:, :, :s], v_buf[:, :, :s],
                                                 is_causal=True, scale=softmax_scale,
                                                 enable_gqa=r > 1)
        else:
            out = F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=self.mask,
                                                 scale=softmax_scale, enable_gqa=r > 1)
        return out.permute(2, 0, 1, 3).reshape(s, b, g * r * d)

    def _buffer(self, layer_number: int, heads: torch.Tensor) -> torch.Tensor:
        if layer_number not in self.buffers:
            shape = (self.batch_size, heads.shape[2], self.max_len, 2, heads.shape[4])
            self.buffers[layer_number] = torch.zeros(shape, dtype=self.dtype or heads.dtype,
                                                     device=self.device)
        return self.buffers[layer_number]
