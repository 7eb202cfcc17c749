"""HyLaR, stage 1: "canvas" latents teacher-forced from a frozen SigLIP encoder.

Each reasoning image of a record becomes `canvas_tokens` vectors (frozen SigLIP -> a learnable
query compressor -> a projector to the LLM width: latent/canvas.py), which replace the input
embeddings at the `<|canvas|>` slots of its span (`<|canvas_start|>` + slots + `<|canvas_end|>`).
Loss = CE (targets equal to `<|canvas|>` are not supervised) + lambda * MSE between the
final-norm hidden state at t and the canvas vector fed at t+1, each a mean over the global batch
(spec hylar-deeplatent-spec.md 1.5). The MSE target is detached by default (`target_grad`):
with it trainable the cheapest way to lower the MSE is to shrink or average the canvas vectors.

At inference the released model has no canvas modules: a span's latents are the model's own
fed-back hidden states (decode mode "forced", at most 2 x canvas_tokens per span).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_latent.latent import depo, pipeline_channel
from megatron_latent.latent.base import LatentMethod
from megatron_latent.latent.decoding import LatentRule
from megatron_latent.latent.lvr import LVRStep
from megatron_latent.latent.registry import register

# HyLaR's order (canvas first) and non-special: the released checkpoints' ids 151665..151667
TOKENS = ("<|canvas|>", "<|canvas_start|>", "<|canvas_end|>")


@register
@dataclass
class HyLaR(LatentMethod):
    canvas_id: int
    start_id: int
    end_id: int
    hidden_size: int
    loss_lambda: float = 0.5
    canvas_tokens: int = 16
    encoder: str | None = None  # the frozen SigLIP's HF dir (SFT only)
    encoder_dim: int = 1152  # its width (the compressor's), so modules build without it
    compressor_layers: int = 2
    compressor_heads: int = 8
    target_grad: bool = False
    canvas_lr: float | None = 1e-4
    freeze_canvas: bool = False
    # stage 2 (DePO, latent/depo.py)
    depo_latent_logprob: str = "dot"
    depo_kappa: float = 0.01
    depo_latent_weight: float = 0.5
    depo_latent_clip: float = 0.1
    depo_dual_clip: float = 3.0
    depo_rho: float = 0.05
    depo_vmf_coef: float = 0.0
    name = "hylar"
    tokens = TOKENS
    special_tokens = False
    prompt_images_first = False  # Zebra-CoT SFT: the question, then its images (spec 1.4)

    @property
    def default_latent_steps(self) -> int:
        return 2 * self.canvas_tokens  # HyLaR's decode cap (its max_latent_steps is not wired)

    # ------------------------------------------------------------ construction
    @classmethod
    def create(cls, token_ids, model_cfg, **hparams) -> "HyLaR":
        if hparams.get("encoder") and "encoder_dim" not in hparams:
            from megatron_latent.latent.canvas import vision_config

            hparams["encoder_dim"] = vision_config(hparams["encoder"]).hidden_size
        return cls(canvas_id=token_ids[TOKENS[0]], start_id=token_ids[TOKENS[1]],
                   end_id=token_ids[TOKENS[2]], hidden_size=model_cfg.hidden_size, **hparams)

    def hparams(self) -> dict:
        keys = ("loss_lambda", "canvas_tokens", "encoder", "encoder_dim", "compressor_layers",
                "compressor_heads", "target_grad", "canvas_lr", "freeze_canvas")
        return {k: getattr(self, k) for k in keys + depo.HPARAMS}

    @classmethod
    def detect_hf(cls, hf_config: dict) -> dict | None:
        # HyLaR's released config.json: plain Qwen2.5-VL plus canvas_* keys (spec section 5)
        if "canvas_id" not in hf_config:
            return None
        return {"name": cls.name, "hparams": {"canvas_tokens": hf_config.get("canvas_token_num", 16)}}

    @classmethod
    def add_args(cls, parser) -> None:
        a = parser.add_argument
        a("--canvas-encoder", default=None,
          help="HyLaR: the frozen SigLIP vision encoder's HF dir (so400m-patch14-384)")
        a("--canvas-loss-lambda", type=float, default=None, help="HyLaR: MSE weight (0.5)")
        a("--canvas-tokens", type=int, default=None, help="HyLaR: latents per image (16)")
        a("--canvas-lr", type=float, default=None,
          help="HyLaR: LR of the compressor and projector (1e-4)")
        a("--canvas-target-grad", action="store_true", default=None,
          help="HyLaR: let the MSE train its target too (the seed's; PP=1 only)")
        a("--freeze-canvas", action="store_true", default=None,
          help="HyLaR: freeze the compressor and projector")
        depo.add_args(parser)

    @classmethod
    def hparams_from_args(cls, args) -> dict:
        pairs = (("encoder", "canvas_encoder"), ("loss_lambda", "canvas_loss_lambda"),
                 ("canvas_tokens", "canvas_tokens"), ("canvas_lr", "canvas_lr"),
                 ("target_grad", "canvas_target_grad"), ("freeze_canvas", "freeze_canvas"))
        return {**{k: getattr(args, f) for k, f in pairs if getattr(args, f, None) is not None},
                **depo.hparams_from_args(args)}

    # ------------------------------------------------------------ side modules
    def build_modules(self, model_cfg, *, pre_process: bool, post_process: bool):
        if not pre_process:  # the canvas is injected on the first stage only
            return None
        if self.target_grad:
            from megatron.core import parallel_state

            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                raise ValueError("--canvas-target-grad needs PP=1: under PP the target crosses "
                                 "stages without gradient")
        from megatron_latent.latent.canvas import CanvasEncoder

        # SigLIP is attached at the first SFT step (HyLaRStep): generation never needs it
        return CanvasEncoder(self.encoder_dim, self.hidden_size, n_queries=self.canvas_tokens,
                             n_layers=self.compressor_layers, n_heads=self.compressor_heads)

    def hf_side_name(self, hf_name: str) -> str | None:
        """HyLaR's mid-SFT checkpoints hold `canvas_extractor.{compressor,canvas_proj}.*` (ours
        minus the prefix) and the frozen SigLIP (`canvas_extractor.siglip2_vision.*`: dropped,
        it is reloaded from its own checkpoint)."""
        if not hf_name.startswith("canvas_extractor."):
            return None
        name = hf_name[len("canvas_extractor."):]
        return name if name.startswith(("compressor.", "canvas_proj.")) else ""

    def hf_config_keys(self) -> dict:
        """HyLaR's release keys (spec section 5), read by its own eval and RL code."""
        return {"canvas_id": self.canvas_id, "canvas_start_id": self.start_id,
                "canvas_end_id": self.end_id, "canvas_token_num": self.canvas_tokens,
                "compress_strategy": "compressor", "canvas_loss": "mse"}

    def optimizer_overrides(self) -> dict:
        return {} if self.canvas_lr is None else {("*latent_modules.*",): self.canvas_lr}

    def frozen_patterns(self) -> tuple[str, ...]:
        return ("*latent_modules.*",) if self.freeze_canvas else ()

    # ------------------------------------------------------------ data and training
    def sft_dataset(self, data_path, *, tokenizer, image_processor, vocab_size, **kwargs):
        from transformers import SiglipImageProcessor

        from megatron_latent.data.interleaved import ZebraCotDataset

        if not self.encoder:
            raise ValueError("HyLaR SFT needs the canvas encoder: --canvas-encoder SIGLIP_DIR")
        canvas = SiglipImageProcessor.from_pretrained(str(self.encoder), local_files_only=True)
        return ZebraCotDataset(data_path, tokenizer=tokenizer, image_processor=image_processor,
                               canvas_processor=canvas,
                               vocab_size=vocab_size, canvas_tokens=self.canvas_tokens, **kwargs)

    def sft_step(self, micro_batch: dict) -> "HyLaRStep":
        return HyLaRStep(self, micro_batch)

    def count(self, mb: dict) -> dict[str, float]:
        lat = mb["latent_mask"]
        if bool(lat[:, 0].any()):
            raise ValueError("a <|canvas|> slot starts a sample: nothing precedes it to predict it")
        return {"ce": float(mb["loss_mask"].sum()), "latent": float(lat.sum()) * self.hidden_size}

    def total_loss(self, means: dict) -> float:
        return means["lm loss"] + self.loss_lambda * means.get("latent mse", 0.0)

    # ------------------------------------------------------------ generation and RL
    def decode_program(self, mode: str | None = None, steps: int | None = None,
                       threshold: float = 0.5):
        if mode not in (None, "forced"):
            raise ValueError(f"HyLaR decodes in latent mode 'forced' only, got {mode!r}")
        return LatentRule(self.start_id, self.canvas_id, self.end_id, "forced",
                          self.default_latent_steps if steps is None else steps, threshold)

    def for_rl(self) -> "HyLaR":
        # DePO never runs the canvas encoder (rollout latents are the model's own hidden
        # states): its modules stay in the checkpoint, frozen, with no optimizer state
        return dataclasses.replace(self, freeze_canvas=True)

    def rl_decode_program(self, mode=None, steps=None, threshold=0.5):
        rule = self.decode_program(mode, steps, threshold)
        return depo.PolicyFeed(rule.start_id, rule.latent_id, rule.end_id, rule.mode, rule.steps,
                               rule.threshold, policy=self._depo().policy)

    def rl_defaults(self) -> dict:
        # spec 1.8: DePO's clip, text KL, 0.9 accuracy + 0.1 format, DAPO's group filter
        return {"eps_low": 0.2, "eps_high": 0.28, "kl_beta": 0.05,
                "rewards": "accuracy:0.9,format:0.1", "filter_low": 0.1, "filter_high": 0.9}

    def rl_policy_loss(self, eps_low, eps_high, kl_beta):
        return self._depo(eps_low=eps_low, eps_high=eps_high, beta=kl_beta)

    def _depo(self, **token_terms) -> depo.DePOLoss:
        return depo.DePOLoss(**token_terms, dual_clip=self.depo_dual_clip,
                             latent_weight=self.depo_latent_weight,
                             latent_clip=self.depo_latent_clip,
                             latent_logprob=self.depo_latent_logprob, kappa=self.depo_kappa,
                             rho=self.depo_rho, vmf_coef=self.depo_vmf_coef)

    def rl_rewards(self) -> dict:
        return depo.rewards(TOKENS)


class HyLaRStep(LVRStep):
    """LVR's regression step with the canvas encoder's output as input and target."""

    def inject(self, embeddings, image_features, modules=None):
        mask = self.batch["latent_mask"]
        if modules is None:
            raise ValueError("HyLaR's step needs the canvas modules (build the model with the "
                             "method: build_model(..., latent_method=method))")
        if modules.siglip is None:  # the frozen encoder, loaded once, outside the checkpoint
            if not self.m.encoder:
                raise ValueError("HyLaR SFT needs the canvas encoder: --canvas-encoder DIR")
            from megatron_latent.latent.canvas import load_siglip

            modules.attach_siglip(load_siglip(self.m.encoder)[0])
        canvas = modules(self.batch["canvas_pixel_values"]).flatten(0, 1)  # [n_img * k, h]
        if canvas.shape[0] != self.n_latent():
            raise ValueError(f"{self.n_latent()} <|canvas|> slots but {canvas.shape[0]} canvas "
                             f"vectors ({self.m.canvas_tokens} per reasoning image)")
        canvas = canvas.to(embeddings.dtype)
        targets = canvas if self.m.target_grad else canvas.detach()
        self.targets = pipeline_channel.first_to_last(targets, tuple(targets.shape),
                                                      targets.dtype, targets.device)
        return embeddings.masked_scatter(mask.unsqueeze(-1), canvas)

    def loss(self, output):
        total, n, logs = super().loss(output)
        # the target's scale: a collapse of the canvas (shrinking towards what is cheap to
        # predict) shows as this falling with the MSE
        t = self.targets.detach().float()
        logs["canvas target ms"] = torch.stack([t.pow(2).sum(), t.new_full((), float(t.numel()))])
        return total, n, logs
