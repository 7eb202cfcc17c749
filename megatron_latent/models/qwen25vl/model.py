"""Qwen2.5-VL on megatron-core: the vision tower (first pipeline stage) + a GPTModel with mRoPE.

Data flow on one micro-batch (tensors in megatron's [s, b, h] layout inside the LLM):
  first stage: token embeddings -> image features scattered into the image-pad positions
               -> (sequence-parallel scatter) -> decoder layers of this stage
  later stages: hidden states from the previous stage (set_input_tensor) -> their layers
  last stage:  final norm -> `head` (an output processor: logits, CE loss, or a latent method's
               loss; it sees the final-norm hidden states) .
mRoPE positions [3, b, s] are needed on every stage; they are cheap to recompute from input_ids.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Callable, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_latent.models.qwen25vl import specs
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.layer_hooks import LayerHooks
from megatron_latent.models.qwen25vl.rope_index import rope_index
from megatron_latent.models.qwen25vl.vision import Qwen25VisionModel
from megatron_latent.ops import cross_entropy as ops_ce


class Qwen25VLModel(MegatronModule):
    def __init__(self, cfg: Qwen25VLConfig, pre_process: Optional[bool] = None,
                 post_process: Optional[bool] = None, vp_stage: Optional[int] = None,
                 latent_modules: Optional[torch.nn.Module] = None):
        """`latent_modules`: the latent method's own modules for this stage (its
        `build_modules`); their parameters are the model's `latent_modules.*`, so DDP, the
        optimizer and the dist checkpoint treat them like any other."""
        lm_config = cfg.language_transformer_config()
        super().__init__(config=lm_config)
        self.cfg = cfg
        if pre_process is None:
            pre_process = parallel_state.is_pipeline_first_stage()
        if post_process is None:
            post_process = parallel_state.is_pipeline_last_stage()
        self.pre_process, self.post_process = pre_process, post_process
        self.vision = Qwen25VisionModel(cfg) if pre_process else None
        self.latent_modules = latent_modules
        self.language_model = GPTModel(
            config=lm_config,
            transformer_layer_spec=specs.language_layer_spec(cfg.spec, cfg.fused_rope),
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=pre_process, post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            position_embedding_type="mrope", rotary_base=cfg.rope_theta,
            # image features are merged in before the sequence-parallel scatter
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )
        # read by megatron's schedules and finalize_model_grads (tied-embedding grad sync)
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = cfg.tie_word_embeddings
        # wraps the token lookup; training/wgrad_fusion.py swaps in a context that sends the
        # embedding's weight gradient straight into DDP's main_grad
        self.embedding_grad_route = nullcontext
        self._layer_hooks = None  # LayerHooks, installed by the first step that has hooks
        if cfg.params_dtype in (torch.bfloat16, torch.float16):
            # megatron's local norms (torch.nn.RMSNorm) are built fp32; its mixed-precision
            # optimizer maps state onto half parameters only (a checkpoint save fails), and
            # Megatron-LM's Float16Module casts the whole model, so every parameter is half
            for p in self.parameters():
                if p.is_floating_point() and p.dtype != cfg.params_dtype:
                    p.data = p.data.to(cfg.params_dtype)

    # ------------------------------------------------------------ pipeline plumbing
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    # ------------------------------------------------------------ pieces
    def position_ids(self, input_ids, image_grid_thw=None, attention_mask=None):
        return rope_index(input_ids, image_grid_thw, image_token_id=self.cfg.image_token_id,
                          spatial_merge_size=self.cfg.spatial_merge_size,
                          attention_mask=attention_mask)[0]

    def token_counts(self, input_ids: torch.Tensor) -> tuple[int, int]:
        """(image, video) placeholder tokens in input_ids: the embedding's input checks. On a
        host tensor this costs no GPU sync; callers with host copies pass the result to
        `forward(token_counts=...)` (training/step.py)."""
        cfg = self.cfg
        return tuple(torch.stack([(input_ids == cfg.image_token_id).sum(),
                                  (input_ids == cfg.video_token_id).sum()]).tolist())

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, latent=None,
              token_counts: tuple[int, int] | None = None) -> torch.Tensor:
        """Token embeddings with image features in the image-pad slots, then the latent method's
        injection: [s, b, h] (not SP-split). `token_counts`: (image, video) tokens of input_ids
        counted on the host by the caller; without them the checks read the device (a sync,
        which would cost the host its lead over the GPU every micro-batch)."""
        cfg = self.cfg
        # launch the vision tower before anything waits on the GPU, so the host can queue it
        # while the GPU still runs earlier work (the previous micro-batch's backward)
        feats = None if pixel_values is None else self.vision(pixel_values, image_grid_thw)
        with self.embedding_grad_route():
            emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        is_image = input_ids == cfg.image_token_id
        n_tokens, n_video = token_counts or self.token_counts(input_ids)  # else one sync
        if n_video:
            raise ValueError("video input is not supported yet: input_ids contain "
                             f"video_token_id={cfg.video_token_id}")
        emb = emb.transpose(0, 1)  # [b, s, h]: images and latents are listed sample by sample
        if feats is None:
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} image tokens but no pixel_values")
        else:
            if feats.shape[0] != n_tokens:
                raise ValueError(
                    f"input_ids hold {n_tokens} image tokens (id {cfg.image_token_id}) but "
                    f"image_grid_thw {image_grid_thw.tolist()} gives {feats.shape[0]} image "
                    "features")
            emb = emb.masked_scatter(is_image.unsqueeze(-1), feats.to(emb.dtype))
        if latent is not None:
            emb = latent.inject(emb, feats, self.latent_modules)
        return emb.transpose(0, 1).contiguous()

    # ------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                decoder_input: Optional[torch.Tensor] = None,
                latent=None, head: Optional[Callable] = None, inference_context=None,
                runtime_gather_output: Optional[bool] = None, packed_seq_params=None,
                token_counts: Optional[tuple[int, int]] = None):
        """input_ids [b, s] (right-padded; causal attention makes masks unnecessary).

        Last stage returns, by default, per-token CE loss [b, s] when `labels` is given, else
        logits [b, s, vocab] (vocab-parallel unless runtime_gather_output). `latent` (a
        latent.base.LatentStep) injects at latent positions and supplies the last-stage head;
        `head` replaces the output processor directly. Other stages return hidden states.
        Packed (THD) micro-batches: b = 1 and `packed_seq_params` (data/packing.py).
        `token_counts`: see `embed`.
        """
        if position_ids is None:
            position_ids = self.position_ids(input_ids, image_grid_thw)
        if self.pre_process and decoder_input is None:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, latent,
                                       token_counts)
        if head is None and latent is not None:
            head = partial(latent.head, self)
        if decoder_input is not None and self.config.sequence_parallel:
            decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        with self.layer_hooks(getattr(latent, "layer_hooks", dict)()):
            return self.language_model(
                input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                decoder_input=decoder_input, labels=labels, inference_context=inference_context,
                runtime_gather_output=runtime_gather_output, packed_seq_params=packed_seq_params,
                output_processor=head or self.lm_head)

    def layer_hooks(self, hooks: dict):
        """A context running `hooks` ({global 1-based layer: fn(h) -> h}, layer_hooks.py) at
        this stage's decoder layers for one forward; installed on first use."""
        if not hooks and self._layer_hooks is None:
            return nullcontext()
        if self._layer_hooks is None:
            self._layer_hooks = LayerHooks(self.language_model.decoder, self.config)
        return self._layer_hooks.use(hooks)

    def lm_head(self, *, hidden_states, output_layer, output_weight, labels=None,
                runtime_gather_output=None, **_):
        """Default output processor: logits with the vocab padding masked out, or CE loss."""
        logits = self.logits(hidden_states, output_layer, output_weight, runtime_gather_output)
        if labels is None:
            if logits.shape[-1] == self.cfg.padded_vocab_size:  # whole vocab here: drop padding
                logits = logits[..., : self.cfg.vocab_size]
            return logits.transpose(0, 1).contiguous()
        return self.cross_entropy(labels, logits)

    def cross_entropy(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-token CE [b, s] of vocab-parallel logits [s, b, v/tp]: our Triton kernel
        (cross_entropy_fusion_impl="triton", where Triton runs on the device), else megatron's
        own (fused or not by the config)."""
        if (self.cfg.fused and self.cfg.cross_entropy_fusion_impl == "triton"
                and ops_ce.available(logits.device)):
            return ops_ce.vocab_parallel_cross_entropy(
                logits, labels, parallel_state.get_tensor_model_parallel_group())
        return self.language_model.compute_language_model_loss(labels, logits)

    def logits(self, hidden_states, output_layer, output_weight, runtime_gather_output=None,
               matmul=None):
        """[s, b, h] -> [s, b, v] logits; padded vocab rows get the dtype's minimum so they
        never take probability mass (HF has no such rows). `matmul(x, weight)`: the GEMM to
        use instead of the layer's where it is a plain x W^T (one TP rank, no bias)."""
        plain = (matmul is not None and output_layer.bias is None
                 and parallel_state.get_tensor_model_parallel_world_size() == 1)
        if plain:
            logits = matmul(hidden_states, output_layer.weight if output_weight is None
                            else output_weight)
        else:
            logits, _ = output_layer(hidden_states, weight=output_weight,
                                     runtime_gather_output=runtime_gather_output)
        gathered = logits.shape[-1] == self.cfg.padded_vocab_size
        start = 0 if gathered else (
            parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1])
        n_real = max(0, min(logits.shape[-1], self.cfg.vocab_size - start))
        if n_real < logits.shape[-1]:
            pad = torch.full_like(logits[..., n_real:], torch.finfo(logits.dtype).min)
            logits = torch.cat([logits[..., :n_real], pad], dim=-1)
        return logits
