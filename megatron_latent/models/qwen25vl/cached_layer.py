"""The LLM's transformer layer: megatron-core's, with a decode step's MLP through our kernels.

In the TE spec the pre-MLP RMSNorm lives inside fc1 (TE's LayerNormLinear), which at decode
runs TE's general norm kernel (5 us for 8 rows; 28 a step). A fused decode step (the KV cache
says which forwards are: kv_cache.KVCache.fused_decode) runs the norm as one Triton kernel,
fc1's and fc2's GEMMs through decode_gemm (our skinny kernel where it beats cuBLAS), then
megatron's own SwiGLU, tensor-parallel all-reduce and residual add. Everything else, and every
other forward, is megatron's layer unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_latent.ops import decode_norm_linear, fp8_gemm
from megatron_latent.models.qwen25vl.kv_cache import KVCache


def mlp_fusable(layer: TransformerLayer) -> bool:
    """A dense SwiGLU MLP whose norm is fused into a `decode_norm_linear.fusable` fc1."""
    mlp, cfg = layer.mlp, layer.config
    return (type(mlp) is MLP and isinstance(layer.pre_mlp_layernorm, IdentityOp)
            and cfg.gated_linear_unit and cfg.activation_func is F.silu
            and not cfg.use_te_activation_func and cfg.activation_func_clamp_value is None
            and not cfg.glu_linear_offset and not cfg.fp8
            and decode_norm_linear.fusable(mlp.linear_fc1) and _plain_row_parallel(mlp.linear_fc2))


def _plain_row_parallel(linear) -> bool:
    """TE's row-parallel Linear without bias, fp8 or sequence parallelism: x W^T, all-reduced."""
    return (getattr(linear, "parallel_mode", None) == "row" and not linear.use_bias
            and not linear.sequence_parallel and type(linear.weight) is torch.nn.Parameter)


class CachedTransformerLayer(TransformerLayer):
    def _forward_mlp(self, hidden_states, inference_context=None, *args, **kwargs):
        if not (isinstance(inference_context, KVCache)
                and inference_context.fused_decode(hidden_states, self.config.kv_channels)
                and mlp_fusable(self)):
            return super()._forward_mlp(hidden_states, inference_context, *args, **kwargs)
        fc1, bias = decode_norm_linear.project(self.mlp.linear_fc1, hidden_states)
        out = fp8_gemm.module_gemm(self.mlp.linear_fc2, bias_swiglu_impl(fc1, bias))
        if self.config.tensor_model_parallel_size > 1:
            out = reduce_from_tensor_model_parallel_region(out, self.tp_group)
        return self._forward_post_mlp((out, None), hidden_states)
