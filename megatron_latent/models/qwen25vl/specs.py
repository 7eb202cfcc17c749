"""ModuleSpecs for Qwen2.5-VL: Transformer Engine or torch-native ("local"), chosen by config.

The LLM uses megatron-core's stock GPT layer specs. The vision tower reuses the same layer
submodules with two changes: bidirectional attention, and a core attention that picks, per layer,
full attention (one segment per image) or window attention (one segment per window), given a
[2, s] tensor of segment ids passed in place of the attention mask (see vision_attention.py).
"""

from __future__ import annotations

from dataclasses import replace

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_latent.models.qwen25vl.config import Spec


def _require_te(spec: Spec) -> None:
    if spec == "te":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as e:
            raise ImportError("spec='te' needs Transformer Engine (pip install "
                              "'megatron_latent[te]'); use spec='local' without it") from e
    elif spec != "local":
        raise ValueError(f"unknown spec {spec!r}; expected 'te' or 'local'")


def language_layer_spec(spec: Spec, fused_rope: bool = False) -> ModuleSpec:
    """`fused_rope`: TE's fused RoPE kernel for mRoPE (models/qwen25vl/cached_attention.py)."""
    from megatron.core.models.gpt import gpt_layer_specs as g

    _require_te(spec)
    if spec == "te":
        layer = g.get_gpt_layer_with_transformer_engine_spec()
    else:
        layer = g.get_gpt_layer_local_spec(normalization="RMSNorm")
    return _with_decoding(layer, fused_rope)


def _with_decoding(layer: ModuleSpec, fused_rope: bool) -> ModuleSpec:
    """Swap SelfAttention for its subclass that can also decode from our KV cache and apply
    mRoPE with TE's fused kernel, and the layer for its subclass with a fused decode MLP."""
    from megatron_latent.models.qwen25vl.cached_attention import CachedSelfAttention
    from megatron_latent.models.qwen25vl.cached_layer import CachedTransformerLayer

    attn = layer.submodules.self_attention
    attn = replace(attn, module=CachedSelfAttention,
                   params={**attn.params, "fused_rope": fused_rope})
    return replace(layer, module=CachedTransformerLayer,
                   submodules=replace(layer.submodules, self_attention=attn))


def vision_layer_spec(spec: Spec, full_attention_layers: frozenset[int]) -> ModuleSpec:
    """`full_attention_layers`: 1-based layer numbers that attend across the whole image."""
    from megatron.core.models.gpt import gpt_layer_specs as g

    from megatron_latent.models.qwen25vl import vision_attention as va

    _require_te(spec)
    if spec == "te":
        layer = g.get_gpt_layer_with_transformer_engine_spec()
        core_cls = va.VisionTEAttention
    else:
        layer = g.get_gpt_layer_local_spec(normalization="RMSNorm")
        core_cls = va.VisionLocalAttention
    attn = layer.submodules.self_attention
    core = ModuleSpec(module=core_cls, params={"full_attention_layers": full_attention_layers})
    vision_attn = ModuleSpec(
        module=attn.module,
        params={**attn.params, "attn_mask_type": AttnMaskType.no_mask},
        submodules=replace(attn.submodules, core_attention=core),
    )
    return ModuleSpec(module=layer.module,
                      submodules=replace(layer.submodules, self_attention=vision_attn))


def merger_mlp_spec(spec: Spec) -> ModuleSpec:
    """Plain (non-gated) MLP from backend linears: column-parallel in, row-parallel out."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    _require_te(spec)
    if spec == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        backend = TESpecProvider()
    else:
        backend = LocalSpecProvider()
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()))
