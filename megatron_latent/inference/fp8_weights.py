"""FP8 copies of the LLM decoder's weights for rollouts (`--rollout-precision fp8`).

Every linear layer of the decoder (QKV, attention output, MLP fc1 and fc2) gets an e4m3 copy of
its weight (per output channel scales, ops/fp8_gemm.py) that its forward uses while the copies
are attached: prefill, decode and chunk forwards alike. The vision tower, the norms, the
embedding and the output layer stay in the parameters' dtype (the output layer as vLLM keeps it:
the sampled log-probs come from it). The copies are quantized in place from the live
parameters at every `attached()` (co-located RL: the optimizer has just written them), into
buffers whose addresses do not change, so captured CUDA graphs stay valid; `release()` frees
them (1 byte per weight).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from megatron_latent.ops import fp8_gemm


def decoder_linears(model) -> list[torch.nn.Module]:
    """The linear layers of this stage's LLM decoder: megatron's local ones or TE's."""
    decoder = getattr(model.language_model, "decoder", None)
    if decoder is None:
        return []
    return [m for m in decoder.modules()
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) or _is_te_linear(m)]


def _is_te_linear(m) -> bool:
    return getattr(m, "parallel_mode", None) in ("column", "row") and hasattr(m, "te_return_bias")


def _local_impl(q):
    """megatron's ColumnParallelLinear / RowParallelLinear `_forward_impl` (the GEMM between the
    layer's own communication) with the FP8 weight."""

    def impl(input, weight, bias=None, *, sequence_parallel=False, **_):
        if sequence_parallel:
            raise ValueError("FP8 rollouts run without sequence parallelism (as cached decoding)")
        return fp8_gemm.linear(input, q, bias)

    return impl


def _te_forward(m, q):
    """TE's Linear / LayerNormLinear (RMSNorm) forward, as megatron's wrappers return it."""
    norm = hasattr(m, "layer_norm_weight")
    if norm and (m.normalization != "RMSNorm" or m.zero_centered_gamma
                 or m.return_layernorm_output):
        raise NotImplementedError("FP8 rollouts: TE LayerNormLinear supports a plain RMSNorm only")
    if m.sequence_parallel:
        raise ValueError("FP8 rollouts run without sequence parallelism (as cached decoding)")
    tp = m.tp_size if hasattr(m, "tp_size") else 1

    def forward(x, *_, **__):
        h = x
        if norm:
            from megatron_latent.ops.decode_norm_linear import rms_norm, triton

            if x.is_cuda and triton is not None:
                h = rms_norm(x, m.layer_norm_weight, m.eps)
            else:
                v = x.float()
                h = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + m.eps)
                     * m.layer_norm_weight.float()).to(x.dtype)
        y = fp8_gemm.linear(h, q)
        if m.parallel_mode == "row" and tp > 1:
            y = reduce_from_tensor_model_parallel_region(y, m.tp_group)
        bias = m.bias if m.use_bias else None
        if m.te_return_bias:
            return y, bias
        return (y if bias is None else y + bias), None

    return forward


class Fp8RolloutWeights:
    def __init__(self, model):
        self.model = model
        self._copies: list | None = None  # (module, Fp8Weight)

    def refresh(self) -> None:
        """Quantize the live weights into the (persistent) FP8 buffers."""
        if self._copies is None:
            self._copies = [(m, fp8_gemm.Fp8Weight.empty_like(m.weight))
                            for m in decoder_linears(self.model)]
        with torch.no_grad():
            for m, q in self._copies:
                q.quantize_(m.weight)

    @contextmanager
    def attached(self):
        """The decoder's linears compute with fresh FP8 copies inside the block."""
        self.refresh()
        patched = []
        try:
            for m, q in self._copies:
                name = "forward" if _is_te_linear(m) else "_forward_impl"
                setattr(m, name, _te_forward(m, q) if name == "forward" else _local_impl(q))
                setattr(m, fp8_gemm.ATTR, q)
                patched.append((m, name))
            yield self
        finally:
            for m, name in patched:
                delattr(m, name)
                delattr(m, fp8_gemm.ATTR)

    def release(self) -> None:
        self._copies = None
