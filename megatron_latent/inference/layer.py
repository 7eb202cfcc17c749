"""The LLM's transformer layer: megatron-core's, with a decode step's MLP through our kernels.

In the TE spec the pre-MLP RMSNorm lives inside fc1 (TE's LayerNormLinear), which at decode
runs TE's general norm kernel (5 us for 8 rows; 28 a step). A fused decode step (the KV cache
says which forwards are: kv_cache.KVCache.fused_decode) runs the norm as one Triton kernel and
fc1's GEMM plainly (decode_norm_linear.py), then megatron's own SwiGLU, fc2 and residual add.
Everything else, and every other forward, is megatron's layer unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_latent.inference import decode_norm_linear
from megatron_latent.inference.kv_cache import KVCache


def mlp_fusable(layer: TransformerLayer) -> bool:
    """A dense SwiGLU MLP whose norm is fused into a `decode_norm_linear.fusable` fc1."""
    mlp, cfg = layer.mlp, layer.config
    return (type(mlp) is MLP and isinstance(layer.pre_mlp_layernorm, IdentityOp)
            and cfg.gated_linear_unit and cfg.activation_func is F.silu
            and not cfg.use_te_activation_func and cfg.activation_func_clamp_value is None
            and not cfg.glu_linear_offset and not cfg.fp8
            and decode_norm_linear.fusable(mlp.linear_fc1))


class CachedTransformerLayer(TransformerLayer):
    def _forward_mlp(self, hidden_states, inference_context=None, *args, **kwargs):
        if not (isinstance(inference_context, KVCache)
                and inference_context.fused_decode(hidden_states, self.config.kv_channels)
                and mlp_fusable(self)):
            return super()._forward_mlp(hidden_states, inference_context, *args, **kwargs)
        fc1, bias = decode_norm_linear.project(self.mlp.linear_fc1, hidden_states)
        out_with_bias = self.mlp.linear_fc2(bias_swiglu_impl(fc1, bias))
        return self._forward_post_mlp(out_with_bias, hidden_states)
