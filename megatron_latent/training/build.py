"""Build the model for this rank's pipeline stage, wrap it in megatron-core DDP, and build the
megatron-core optimizer (optionally the distributed one) over it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel
from megatron_latent.training.wgrad_fusion import fuse_wgrad_accumulation


def build_model(cfg: Qwen25VLConfig, hf_dir: str | Path | None = None, *, wrap_ddp: bool = True,
                use_distributed_optimizer: bool = False, freeze_vision: bool = False,
                freeze_merger: bool = False, latent_method=None) -> list[torch.nn.Module]:
    """One model chunk per rank (no virtual pipeline yet), weights from `hf_dir` if given;
    `latent_method`'s side modules built with it on this stage (frozen as the method says)."""
    from megatron.core import parallel_state

    from megatron_latent.conversion.hf_load import load_hf_weights

    modules = None
    if latent_method is not None:
        modules = latent_method.build_modules(
            cfg, pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage())
    model = Qwen25VLModel(cfg, latent_modules=modules)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if hf_dir is not None:
        load_hf_weights(model, hf_dir, latent_method=latent_method)
    freeze([model], vision_tower=freeze_vision, merger=freeze_merger,
           extra=latent_method.frozen_patterns() if latent_method is not None else ())
    if not wrap_ddp:
        return [model]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=True)
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    ddp.broadcast_params()
    if cfg.fused:
        fuse_wgrad_accumulation(model, linears=cfg.spec == "te" and torch.cuda.is_available())
    return [ddp]


@dataclass
class OptimSettings:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    # TE's FusedAdam keeps the fp32 master weights itself and writes the bf16 params inside the
    # Adam kernel, saving the separate main->model copy; needs the distributed optimizer and TE
    precision_aware: bool = False
    vision_lr: float | None = None  # the vision tower's own LR (None: same as lr)
    merger_lr: float | None = None  # the patch merger's own LR (None: same as vision_lr or lr)

    def __post_init__(self):  # before any model is built
        if self.precision_aware:
            if not self.use_distributed_optimizer:
                raise ValueError("the precision-aware optimizer needs the distributed optimizer "
                                 "(--use-distributed-optimizer)")
            try:
                import transformer_engine  # noqa: F401
            except ImportError as e:
                raise ValueError("the precision-aware optimizer needs Transformer Engine's "
                                 "FusedAdam (pip install megatron_latent[te])") from e


# parameter groups by name (fnmatch on names inside DDP, e.g. "module.vision.decoder...")
VISION_TOWER = ("*vision.patch_embed*", "*vision.decoder*")
MERGER = ("*vision.merger*",)


def freeze(model_chunks, vision_tower: bool = False, merger: bool = False,
           extra: tuple[str, ...] = ()) -> None:
    """Call before DDP wrapping: frozen parameters get no grad buffers nor optimizer state.
    `extra`: more fnmatch name patterns (a latent method's frozen side modules)."""
    from fnmatch import fnmatch

    patterns = (VISION_TOWER if vision_tower else ()) + (MERGER if merger else ()) + tuple(extra)
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if any(fnmatch(name, pat) for pat in patterns):
                p.requires_grad_(False)


def build_optimizer(model_chunks: list[torch.nn.Module], s: OptimSettings,
                    lr_overrides: dict[tuple[str, ...], float] | None = None):
    """`lr_overrides`: {fnmatch name patterns: LR}, e.g. a latent method's side modules."""
    from megatron.core.optimizer.optimizer_config import ParamKey

    cfg0 = model_chunks[0].config
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=s.lr, min_lr=s.min_lr, weight_decay=s.weight_decay,
        adam_beta1=s.adam_beta1, adam_beta2=s.adam_beta2, adam_eps=s.adam_eps,
        clip_grad=s.clip_grad, bf16=cfg0.bf16, fp16=cfg0.fp16, params_dtype=cfg0.params_dtype,
        use_distributed_optimizer=s.use_distributed_optimizer,
        use_precision_aware_optimizer=s.precision_aware, main_params_dtype=torch.float32,
        # megatron-core 0.19.2 reloads the masters as fp32 where TE's remainder storage wants
        # int16 (an assert on resume, tests/gpu/test_precision_aware_gpu.py): full fp32 masters
        store_param_remainders=False,
        main_grads_dtype=torch.float32, exp_avg_dtype=torch.float32,
        exp_avg_sq_dtype=torch.float32)
    overrides = {}
    merger_lr = s.merger_lr if s.merger_lr is not None else s.vision_lr
    groups = ((VISION_TOWER, s.vision_lr), (MERGER, merger_lr), *(lr_overrides or {}).items())
    for patterns, lr in groups:
        if lr is not None:  # the scheduler scales max_lr/min_lr of each group alike
            overrides[ParamKey(name=patterns)] = {"max_lr": lr, "min_lr": s.min_lr * lr / s.lr}
    optimizer = get_megatron_optimizer(opt_cfg, model_chunks, config_overrides=overrides or None)
    # what megatron's schedules read from the model config
    for chunk in model_chunks:
        # the step's losses come pre-divided by the global token count (training/step.py)
        chunk.config.finalize_model_grads_func = finalize_grads
        chunk.config.grad_scale_func = optimizer.scale_loss
        if isinstance(chunk, DistributedDataParallel):
            chunk.config.no_sync_func = chunk.no_sync
            if s.clip_grad > 0:
                # the clip computes the gradient norm anyway and the step checks it is finite
                # (step.PendingStep); DDP's own check would add a pass over every gradient and
                # two waits for the GPU per step
                chunk.ddp_config.check_for_nan_in_grad = False
    return optimizer


def build_scheduler(optimizer, s: OptimSettings, train_iters: int, warmup_iters: int,
                    decay_style: str = "cosine"):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=s.lr, min_lr=s.min_lr, lr_warmup_steps=warmup_iters,
        lr_decay_steps=train_iters, lr_decay_style=decay_style, start_wd=s.weight_decay,
        end_wd=s.weight_decay, wd_incr_steps=train_iters, wd_incr_style="constant",
        # on resume the command line's schedule wins over the checkpoint's (and the
        # scheduler's step count comes from the checkpoint)
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def finalize_grads(model, num_tokens=None, **kwargs):
    """megatron's finalize_model_grads without the 1/num_tokens scaling: our losses arrive
    already divided by the global token count (training/step.py, _normalized_loss). With
    calculate_per_token_loss, DDP sums over data-parallel ranks (no 1/dp), so the result is the
    global mean's gradient."""
    return finalize_model_grads(model, None, **kwargs)


def unwrap(chunk: torch.nn.Module) -> Qwen25VLModel:
    while not isinstance(chunk, Qwen25VLModel):
        chunk = chunk.module
    return chunk

