"""The one table between HF Qwen2.5-VL names and our Megatron names, used in both directions.

Each row: a Megatron name pattern, the HF name pattern(s) it is made from, and a transform with
two directions (`to_megatron(*hf) -> full tensor`, `to_hf(full) -> tuple of hf tensors`). "Full"
means the tensor as it would be at TP=1; `tp_shard`/`tp_unshard` move between that and a rank's
slice. `{i}` is a layer index. TE fuses the pre-attention/pre-MLP norms into the following linear;
`TE_ALIASES` maps those names onto the local-spec names used in the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

LLM = "language_model.decoder.layers.{i}."
HF_LLM = "model.language_model.layers.{i}."
VIS = "vision.decoder.layers.{i}."
HF_VIS = "model.visual.blocks.{i}."


@dataclass(frozen=True)
class Transform:
    to_megatron: Callable[..., torch.Tensor]
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def _copy() -> Transform:
    return Transform(lambda t: t, lambda t: (t,))


def _qkv(heads: int, groups: int, head_dim: int) -> Transform:
    """HF q/k/v -> Megatron's fused layout: per query group [its q heads, k, v]."""
    per = heads // groups

    def to_megatron(q, k, v):
        rest = q.shape[1:]
        q = q.view(groups, per * head_dim, *rest)
        k, v = (t.view(groups, head_dim, *rest) for t in (k, v))
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def to_hf(fused):
        rest = fused.shape[1:]
        g = fused.view(groups, (per + 2) * head_dim, *rest)
        q, k, v = g.split([per * head_dim, head_dim, head_dim], dim=1)
        return tuple(t.reshape(-1, *rest) for t in (q, k, v))

    return Transform(to_megatron, to_hf)


def _fused_qkv(heads: int, head_dim: int) -> Transform:
    """HF vision attention keeps q, k, v stacked in one `qkv` tensor."""
    inner = _qkv(heads, heads, head_dim)
    return Transform(lambda qkv: inner.to_megatron(*qkv.chunk(3, dim=0)),
                     lambda fused: (torch.cat(inner.to_hf(fused), dim=0),))


def _pad_to(t: torch.Tensor, size: int, dim: int = 0) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to `size`."""
    shape = list(t.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _gate_up(real: int, padded: int) -> Transform:
    """An MLP's fc1 (weight or bias) = [gate; up], each padded with zero rows from HF's width
    `real` to ours (the vision MLP's: Qwen25VLConfig.vision_ffn_padded_size; the LLM's: none)."""
    def to_megatron(gate, up):
        return torch.cat([_pad_to(gate, padded), _pad_to(up, padded)], dim=0)

    return Transform(to_megatron, lambda fc1: tuple(t[:real] for t in fc1.chunk(2, dim=0)))


def _padded_columns(real: int, padded: int) -> Transform:
    """The vision MLP's fc2 weight [out, width]: zero columns for the padded width."""
    return Transform(lambda w: _pad_to(w, padded, dim=1), lambda w: (w[:, :real],))


def _vocab(real: int, padded: int) -> Transform:
    def to_megatron(t):
        if t.shape[0] != real:
            raise ValueError(f"embedding has {t.shape[0]} rows, config vocab_size is {real}")
        return _pad_to(t, padded)

    return Transform(to_megatron, lambda t: (t[:real],))


def _patch(patch_shape: tuple[int, ...]) -> Transform:
    """HF Conv3d weight [out, C, T, P, P] <-> our Linear weight [out, C*T*P*P]."""
    return Transform(lambda w: w.reshape(w.shape[0], -1),
                     lambda w: (w.reshape(w.shape[0], *patch_shape),))


def mapping(cfg: Qwen25VLConfig) -> list[tuple[str, tuple[str, ...], Transform]]:
    copy, gate_up = _copy(), _gate_up(cfg.ffn_hidden_size, cfg.ffn_hidden_size)
    llm_qkv = _qkv(cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim)
    vis_qkv = _fused_qkv(cfg.vision_num_heads, cfg.vision_hidden_size // cfg.vision_num_heads)
    vocab = _vocab(cfg.vocab_size, cfg.padded_vocab_size)
    vis_fc1 = _gate_up(cfg.vision_ffn_hidden_size, cfg.vision_ffn_padded_size)
    vis_fc2 = _padded_columns(cfg.vision_ffn_hidden_size, cfg.vision_ffn_padded_size)
    rows = [
        ("language_model.embedding.word_embeddings.weight",
         ("model.language_model.embed_tokens.weight",), vocab),
        ("language_model.decoder.final_layernorm.weight", ("model.language_model.norm.weight",), copy),
        (LLM + "input_layernorm.weight", (HF_LLM + "input_layernorm.weight",), copy),
        *[(LLM + f"self_attention.linear_qkv.{p}",
           tuple(HF_LLM + f"self_attn.{x}_proj.{p}" for x in "qkv"), llm_qkv)
          for p in ("weight", "bias")],
        (LLM + "self_attention.linear_proj.weight", (HF_LLM + "self_attn.o_proj.weight",), copy),
        (LLM + "pre_mlp_layernorm.weight", (HF_LLM + "post_attention_layernorm.weight",), copy),
        (LLM + "mlp.linear_fc1.weight",
         (HF_LLM + "mlp.gate_proj.weight", HF_LLM + "mlp.up_proj.weight"), gate_up),
        (LLM + "mlp.linear_fc2.weight", (HF_LLM + "mlp.down_proj.weight",), copy),
        ("vision.patch_embed.weight", ("model.visual.patch_embed.proj.weight",),
         _patch((cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size))),
        (VIS + "input_layernorm.weight", (HF_VIS + "norm1.weight",), copy),
        (VIS + "pre_mlp_layernorm.weight", (HF_VIS + "norm2.weight",), copy),
        ("vision.decoder.final_layernorm.weight", ("model.visual.merger.ln_q.weight",), copy),
    ]
    for p in ("weight", "bias"):
        rows += [
            (VIS + f"self_attention.linear_qkv.{p}", (HF_VIS + f"attn.qkv.{p}",), vis_qkv),
            (VIS + f"self_attention.linear_proj.{p}", (HF_VIS + f"attn.proj.{p}",), copy),
            (VIS + f"mlp.linear_fc1.{p}",
             (HF_VIS + f"mlp.gate_proj.{p}", HF_VIS + f"mlp.up_proj.{p}"), vis_fc1),
            (VIS + f"mlp.linear_fc2.{p}", (HF_VIS + f"mlp.down_proj.{p}",),
             vis_fc2 if p == "weight" else copy),
            (f"vision.merger.linear_fc1.{p}", (f"model.visual.merger.mlp.0.{p}",), copy),
            (f"vision.merger.linear_fc2.{p}", (f"model.visual.merger.mlp.2.{p}",), copy),
        ]
    # With tied embeddings the last PP stage still holds its own copy of the embedding.
    head = "model.language_model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    rows.append(("language_model.output_layer.weight", (head,), vocab))
    return rows


TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

def canonical_hf_name(name: str) -> str:
    """Released checkpoints use the transformers-4 layout (model.layers.*, visual.*); map it to
    the nested layout transformers 5 uses (model.language_model.*, model.visual.*)."""
    if name.startswith(("model.language_model.", "model.visual.", "lm_head.")):
        return name
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def legacy_hf_name(name: str) -> str:
    """Inverse of canonical_hf_name: the layout of released checkpoints, which transformers
    (4.x and 5.x) and vLLM load."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def canonical_megatron_name(name: str) -> str:
    for te, local in TE_ALIASES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


class NameTable:
    """Resolves a (canonical) Megatron name to its HF names and transform, and back."""

    def __init__(self, cfg: Qwen25VLConfig):
        self.rows = [(_compile(m), m, hf, t) for m, hf, t in mapping(cfg)]

    def lookup(self, megatron_name: str) -> tuple[tuple[str, ...], Transform]:
        name = canonical_megatron_name(megatron_name)
        for rx, _, hf, t in self.rows:
            m = rx.match(name)
            if m:
                i = m.groupdict().get("i")
                return tuple(h.format(i=i) for h in hf), t
        raise KeyError(f"no HF mapping for Megatron parameter {megatron_name!r}")

    def all_hf_names(self, num_layers: int, vision_depth: int) -> set[str]:
        out = set()
        for _, m, hf, _ in self.rows:
            n = num_layers if m.startswith("language_model.decoder.layers") else vision_depth
            for i in range(n) if "{i}" in m else [None]:
                out.update(h.format(i=i) for h in hf)
        return out


def tp_shard(full: torch.Tensor, param: torch.Tensor, name: str, rank: int,
             size: int) -> torch.Tensor:
    """Slice a full (TP=1-layout) tensor into this rank's piece of `param`."""
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if canonical_megatron_name(name).rsplit(".", 1)[0].endswith("mlp.linear_fc1"):  # SwiGLU
        gate, up = full.chunk(2, dim=dim)  # each rank holds [gate_r; up_r]
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    return full.chunk(size, dim=dim)[rank]
