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


class KVCache(BaseInferenceContext):
    """Per layer: keys and values [max_len, b, kv_heads_local, head_dim].

    `valid[b, j]` marks cache slots that hold a real token (prompt padding stays False).
    `write_index` (int64 scalar, on device) is where the next forward writes its first token.
    """

    def __init__(self, batch_size: int, max_len: int, device, dtype=None):
        super().__init__(InferenceConfig(materialize_only_last_token_logits=False))
        self.batch_size, self.max_len = batch_size, max_len
        self.device, self.dtype = torch.device(device), dtype
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=self.device)
        self.write_index = torch.zeros((), dtype=torch.long, device=self.device)
        self.slots = torch.arange(max_len, device=self.device)
        self.decode_mode = False

    # ---- megatron-core's context protocol
    def is_static_batching(self) -> bool:
        return True

    def is_decode_only(self) -> bool:
        return self.decode_mode

    # ---- bookkeeping, called by the generator between forwards
    def mark(self, token_valid: torch.Tensor) -> None:
        """Record which of the next forward's s tokens are real ([b, s] bool); call before it."""
        s = token_valid.shape[1]
        idx = self.write_index + torch.arange(s, device=self.device)
        self.valid.index_copy_(1, idx, token_valid.to(self.device))

    def advance(self, n: int) -> None:
        self.write_index.add_(n)

    def reset(self) -> None:
        self.valid.zero_()
        self.write_index.zero_()
        self.decode_mode = False

    # ---- used by CachedSelfAttention
    def attend(self, layer_number: int, query, key, value, softmax_scale: float) -> torch.Tensor:
        """query [s, b, h, d], key/value [s, b, g, d] (rotated) -> context [s, b, h*d]."""
        s, b, h, d = query.shape
        if b != self.batch_size:
            raise ValueError(f"KV cache holds {self.batch_size} sequences, forward has {b}")
        k_buf, v_buf = self._buffers(layer_number, key)
        idx = self.write_index + torch.arange(s, device=self.device)
        k_buf.index_copy_(0, idx, key.to(k_buf.dtype))
        v_buf.index_copy_(0, idx, value.to(v_buf.dtype))
        # key j is visible to query i iff it is a real token and not in the query's future;
        # every query also sees itself, so padding rows are never fully masked (NaN)
        causal = self.slots.unsqueeze(0) <= idx.unsqueeze(1)  # [s, L]
        itself = self.slots.unsqueeze(0) == idx.unsqueeze(1)
        mask = (causal.unsqueeze(0) & self.valid.unsqueeze(1)) | itself.unsqueeze(0)  # [b, s, L]
        q = query.permute(1, 2, 0, 3)  # [b, h, s, d]
        k = k_buf.permute(1, 2, 0, 3)
        v = v_buf.permute(1, 2, 0, 3)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                             attn_mask=mask.unsqueeze(1), scale=softmax_scale,
                                             enable_gqa=h != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def _buffers(self, layer_number: int, key: torch.Tensor):
        if layer_number not in self.buffers:
            shape = (self.max_len, self.batch_size, key.shape[2], key.shape[3])
            dtype = self.dtype or key.dtype
            self.buffers[layer_number] = (
                torch.zeros(shape, dtype=dtype, device=self.device),
                torch.zeros(shape, dtype=dtype, device=self.device))
        return self.buffers[layer_number]
