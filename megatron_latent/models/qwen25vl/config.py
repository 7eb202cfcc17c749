"""Qwen2.5-VL hyper-parameters read from an HF `config.json`, turned into megatron-core configs.

One `Qwen25VLConfig` holds what is not a TransformerConfig fact (token ids, patch geometry,
vocab padding); the three TransformerConfigs (LLM, vision tower, patch merger) are derived from it
so every shape has one source. Accepts both the flat layout of released checkpoints and the nested
`text_config` layout that transformers 5 writes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

Spec = Literal["te", "local"]


@dataclass(frozen=True)
class Qwen25VLConfig:
    # LLM (Qwen2 decoder)
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    tie_word_embeddings: bool
    # vision tower
    vision_depth: int
    vision_hidden_size: int
    vision_num_heads: int
    vision_ffn_hidden_size: int
    vision_hidden_act: str
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    in_channels: int = 3
    vision_rope_theta: float = 10000.0
    # special tokens
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # how to build it
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_in_first_pipeline_stage: int | None = None
    sequence_parallel: bool = False
    make_vocab_size_divisible_by: int = 128
    # the vision MLP's width is padded with zeros to a multiple of this (1: off); stored in
    # checkpoints (older ones, without it, hold the unpadded MLP)
    vision_ffn_divisible_by: int = 64
    spec: Spec = "local"
    params_dtype: torch.dtype = torch.float32
    # GPU speed (docs/performance.md)
    # bias-act/bias-dropout/softmax/wgrad/cross-entropy fusions, fused vision RoPE; None: on for TE
    fused_kernels: bool | None = None
    # CUDA graphs of the frozen vision tower's forward, one per distinct image-grid layout, at
    # most this many kept (0: off). It is CPU-bound otherwise: ~30 small kernels a block.
    vision_graphs: int = 4
    # fused cross-entropy kernel (with fused_kernels): "triton", ours (ops/cross_entropy.py:
    # no fp32 copy of the logits; 1.1 vs 7.5 ms for megatron's native one at 4096 x 152064 on
    # an H200), where Triton runs on the device, else megatron's "native" one (bf16 params;
    # others run the unfused fp32 CE); "te" is TE's, which Megatron-LM's argument validation
    # rejects for known stability issues
    cross_entropy_fusion_impl: str = "triton"
    fp8: str | None = None  # "hybrid" or "e4m3": the LLM's linears in FP8 through TE
    fp8_recipe: str = "tensorwise"  # delayed | tensorwise | blockwise | mxfp8
    vision_fp8: bool = False  # the vision tower's precision is its own choice (default bf16)
    recompute_granularity: str | None = None  # None | "selective" | "full" (LLM layers)
    recompute_method: str | None = None  # "uniform" | "block" (with "full")
    recompute_num_layers: int | None = None

    # ---------------------------------------------------------------- derived facts
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Vocab rows padded so every TP rank holds a multiple of `make_vocab_size_divisible_by`."""
        multiple = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    @property
    def vision_ffn_padded_size(self) -> int:
        """The vision MLP's width in our model: HF's, padded with zero rows of fc1 (gate and up)
        and zero columns of fc2 to a multiple of `vision_ffn_divisible_by`. Exact: silu(0) * 0
        = 0, and the padding's gradients are 0, so it stays 0 when trained. Independent of TP,
        so checkpoints reshard. Qwen2.5-VL's 3,420 gives fc2 a K of 3,420 elements, not 16-byte
        aligned: cuBLAS falls back to sm80 `align2` kernels (14 ms of a 7B SFT step on an
        H200); 3,456 = 2^7 x 27 also splits over TP=8, which 3,420 does not."""
        multiple = self.vision_ffn_divisible_by
        return int(math.ceil(self.vision_ffn_hidden_size / multiple) * multiple)

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict, **overrides) -> "Qwen25VLConfig":
        """Read an HF Qwen2.5-VL config (a checkpoint dir, a config.json path, or its dict)."""
        source = "<dict>"
        if isinstance(path_or_dict, dict):
            cfg = path_or_dict
        else:
            p = Path(path_or_dict)
            p = p / "config.json" if p.is_dir() else p
            source = str(p)
            if not p.is_file():
                raise FileNotFoundError(f"{source}: no config.json here; expected an HF "
                                        "Qwen2.5-VL checkpoint directory")
            try:
                cfg = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}: not valid JSON ({e})") from e
        model_type = cfg.get("model_type")
        if model_type != "qwen2_5_vl":
            raise ValueError(f"{source}: model_type is {model_type!r}, expected 'qwen2_5_vl' "
                             f"(architectures={cfg.get('architectures')})")
        text = {**cfg, **cfg.get("text_config", {})}
        vis = cfg.get("vision_config")
        if not vis:
            raise ValueError(f"{source}: field 'vision_config' is missing")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        mrope = tuple(rope.get("mrope_section", (16, 24, 24)))
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        if sum(mrope) * 2 != head_dim:
            raise ValueError(f"{source}: mrope_section {list(mrope)} sums to {sum(mrope)}, "
                             f"but head_dim/2 = {head_dim // 2}")
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        kwargs = dict(
            hidden_size=text["hidden_size"],
            num_layers=text["num_hidden_layers"],
            num_attention_heads=text["num_attention_heads"],
            num_query_groups=text.get("num_key_value_heads", text["num_attention_heads"]),
            ffn_hidden_size=text["intermediate_size"],
            vocab_size=text["vocab_size"],
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", text.get("rope_theta", 1e6)),
            mrope_section=mrope,
            max_position_embeddings=text.get("max_position_embeddings", 128000),
            tie_word_embeddings=bool(tie),
            vision_depth=vis["depth"],
            vision_hidden_size=vis["hidden_size"],
            vision_num_heads=vis["num_heads"],
            vision_ffn_hidden_size=vis["intermediate_size"],
            vision_hidden_act=vis.get("hidden_act", "silu"),
            patch_size=vis.get("patch_size", 14),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            window_size=vis.get("window_size", 112),
            fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", ())),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            vision_rope_theta=(vis.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            image_token_id=cfg.get("image_token_id", 151655),
            video_token_id=cfg.get("video_token_id", 151656),
            vision_start_token_id=cfg.get("vision_start_token_id", 151652),
            vision_end_token_id=cfg.get("vision_end_token_id", 151653),
        )
        if vis.get("out_hidden_size", kwargs["hidden_size"]) != kwargs["hidden_size"]:
            raise ValueError(f"{source}: vision_config.out_hidden_size "
                             f"{vis['out_hidden_size']} != LLM hidden_size {kwargs['hidden_size']}")
        return replace(cls(**kwargs), **overrides).validated()

    def validated(self) -> "Qwen25VLConfig":
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        for what, n in (("num_attention_heads", self.num_attention_heads),
                        ("num_key_value_heads", self.num_query_groups),
                        ("vision num_heads", self.vision_num_heads),
                        ("the padded vision MLP width (vision_ffn_divisible_by)",
                         self.vision_ffn_padded_size)):
            if n % tp:
                raise ValueError(f"tensor_model_parallel_size={tp} does not divide {what}={n}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_key_value_heads={self.num_query_groups} does not divide "
                             f"num_attention_heads={self.num_attention_heads}")
        first = self.num_layers_in_first_pipeline_stage
        rest = self.num_layers - (first or 0)
        stages = pp - (1 if first is not None else 0)
        if pp > 1 and (rest < 0 or (stages and rest % stages) or (first is None and self.num_layers % pp)):
            raise ValueError(f"num_layers={self.num_layers} cannot be split over "
                             f"pipeline_model_parallel_size={pp} "
                             f"(num_layers_in_first_pipeline_stage={first})")
        if self.fp8 is not None:
            if self.fp8 not in ("hybrid", "e4m3"):
                raise ValueError(f"fp8={self.fp8!r}: expected 'hybrid' or 'e4m3'")
            if self.fp8_recipe not in ("delayed", "tensorwise", "blockwise", "mxfp8"):
                raise ValueError(f"fp8_recipe={self.fp8_recipe!r}: expected delayed, "
                                 "tensorwise, blockwise or mxfp8")
            if self.spec != "te":
                raise ValueError("fp8 runs through Transformer Engine: use spec='te'")
        if self.cross_entropy_fusion_impl not in ("triton", "native", "te"):
            raise ValueError(f"cross_entropy_fusion_impl={self.cross_entropy_fusion_impl!r}: "
                             "expected 'triton', 'native' or 'te'")
        if self.cross_entropy_fusion_impl == "te" and self.fused and not _has_te():
            raise ValueError("cross_entropy_fusion_impl='te' needs Transformer Engine "
                             "(pip install megatron_latent[te])")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ValueError(f"recompute_granularity={self.recompute_granularity!r}: expected "
                             "None, 'selective' or 'full'")
        if self.recompute_granularity == "full" and (self.recompute_method is None
                                                     or not self.recompute_num_layers):
            raise ValueError("recompute_granularity='full' needs recompute_method ('uniform' or "
                             "'block') and recompute_num_layers")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.vision_depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} outside vision depth {self.vision_depth}")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(f"window_size={self.window_size} is not a multiple of "
                             f"patch_size*spatial_merge_size={self.patch_size * self.spatial_merge_size}")
        return self

    # ---------------------------------------------------------------- megatron-core configs
    @property
    def fused(self) -> bool:
        return self.spec == "te" if self.fused_kernels is None else self.fused_kernels

    @property
    def fused_rope(self) -> bool:
        """TE's fused RoPE kernel, for the vision tower's 2-D RoPE and the LLM's mRoPE."""
        return self.fused and self.spec == "te" and _has_te()

    def _common(self) -> dict:
        bf16 = self.params_dtype == torch.bfloat16
        fuse = self.fused
        return dict(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            params_dtype=self.params_dtype, bf16=bf16, fp16=self.params_dtype == torch.float16,
            pipeline_dtype=self.params_dtype,
            normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
            hidden_dropout=0.0, attention_dropout=0.0,
            use_cpu_initialization=not torch.cuda.is_available(),
            # megatron's RoPE fusion stays off: TE's fused RoPE takes one position row, mRoPE has
            # one per sample (the LLM's attention fuses it its own way: models/qwen25vl/cached_attention.py).
            # Weight-gradient accumulation fusion needs TE and DDP's main_grad buffers.
            apply_rope_fusion=False, bias_activation_fusion=fuse, masked_softmax_fusion=fuse,
            bias_dropout_fusion=fuse, persist_layer_norm=False,
            gradient_accumulation_fusion=fuse and self.spec == "te" and _has_fused_wgrad(),
            # losses are token sums; grads are divided by the global token count once
            calculate_per_token_loss=True,
        )

    def language_transformer_config(self):
        from megatron.core.transformer import TransformerConfig

        return TransformerConfig(
            **self._common(),
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups, kv_channels=self.head_dim,
            ffn_hidden_size=self.ffn_hidden_size, layernorm_epsilon=self.rms_norm_eps,
            add_bias_linear=False, add_qkv_bias=True, mrope_section=list(self.mrope_section),
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            num_layers_in_first_pipeline_stage=self.num_layers_in_first_pipeline_stage,
            sequence_parallel=self.sequence_parallel,
            fp8=self.fp8, fp8_recipe=self.fp8_recipe if self.fp8 else "delayed",
            recompute_granularity=self.recompute_granularity,
            recompute_method=self.recompute_method,
            recompute_num_layers=self.recompute_num_layers,
            # unfused CE makes fp32 copies of the logits: ~20 ms of a 7B-shaped 8k-token step
            # megatron's native kernel hands back bf16 logit gradients: bf16 params only
            # ("te" without TE is refused in __post_init__)
            cross_entropy_loss_fusion=self.fused and (
                self.cross_entropy_fusion_impl == "te" or self.params_dtype == torch.bfloat16),
            # megatron's own kernel choice: "triton" is ours (Qwen25VLModel.cross_entropy),
            # with megatron's native kernel where Triton cannot run
            cross_entropy_fusion_impl=("native" if self.cross_entropy_fusion_impl == "triton"
                                       else self.cross_entropy_fusion_impl),
        )

    def vision_transformer_config(self):
        """The ViT lives on the first pipeline stage only, so it is never pipeline-split."""
        from megatron.core.transformer import TransformerConfig

        common = self._common()
        common["activation_func"] = _activation(self.vision_hidden_act)
        # megatron fuses only gelu (tanh-approximated) and swiglu
        common["bias_activation_fusion"] &= common["activation_func"] is F.silu
        # 2-D RoPE with one angle row per patch ([s, 1, 1, d], batch 1): TE's fused kernel
        # applies it exactly; the LLM's mRoPE (one row per sample) cannot use it
        common["apply_rope_fusion"] = self.fused_rope
        return TransformerConfig(
            **common,
            num_layers=self.vision_depth, hidden_size=self.vision_hidden_size,
            num_attention_heads=self.vision_num_heads,
            kv_channels=self.vision_hidden_size // self.vision_num_heads,
            ffn_hidden_size=self.vision_ffn_padded_size, layernorm_epsilon=1e-6,
            add_bias_linear=True, add_qkv_bias=True, pipeline_model_parallel_size=1,
            fp8=self.fp8 if self.vision_fp8 else None,
            fp8_recipe=self.fp8_recipe if self.fp8 and self.vision_fp8 else "delayed",
        )

    def merger_transformer_config(self):
        """Patch merger MLP: (merge_unit * vision hidden) -> same -> LLM hidden, exact GELU."""
        from megatron.core.transformer import TransformerConfig

        common = self._common()
        # exact GELU: megatron's fused bias-GELU is the tanh approximation
        common.update(gated_linear_unit=False, activation_func=F.gelu,
                      bias_activation_fusion=False)
        return TransformerConfig(
            **common,
            num_layers=1, hidden_size=self.hidden_size,
            num_attention_heads=self.tensor_model_parallel_size,  # unused; must divide by TP
            ffn_hidden_size=self.vision_hidden_size * self.merge_unit, add_bias_linear=True,
            pipeline_model_parallel_size=1,
        )


def _has_te() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def _has_fused_wgrad() -> bool:
    """megatron's non-TE linears (the output layer) need Apex's fused wgrad kernel for it."""
    import importlib.util

    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def _activation(name: str):
    table = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu,
             "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
             "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}
    if name not in table:
        raise ValueError(f"vision_config.hidden_act={name!r} is not supported ({sorted(table)})")
    return table[name]
