"""Build the model for this rank's pipeline stage, wrap it in megatron-core DDP, and build the
megatron-core optimizer (optionally the distributed one) over it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel


def build_model(cfg: Qwen25VLConfig, hf_dir: str | Path | None = None, *, wrap_ddp: bool = True,
                use_distributed_optimizer: bool = False) -> list[torch.nn.Module]:
    """One model chunk per rank (no virtual pipeline yet), weights from `hf_dir` if given."""
    from megatron_latent.conversion.hf_load import load_hf_weights

    model = Qwen25VLModel(cfg)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if hf_dir is not None:
        load_hf_weights(model, hf_dir)
    if not wrap_ddp:
        return [model]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=True)
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    ddp.broadcast_params()
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


def build_optimizer(model_chunks: list[torch.nn.Module], s: OptimSettings):
    cfg0 = model_chunks[0].config
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=s.lr, min_lr=s.min_lr, weight_decay=s.weight_decay,
        adam_beta1=s.adam_beta1, adam_beta2=s.adam_beta2, adam_eps=s.adam_eps,
        clip_grad=s.clip_grad, bf16=cfg0.bf16, fp16=cfg0.fp16, params_dtype=cfg0.params_dtype,
        use_distributed_optimizer=s.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_cfg, model_chunks)
    # what megatron's schedules read from the model config
    for chunk in model_chunks:
        chunk.config.finalize_model_grads_func = finalize_model_grads
        chunk.config.grad_scale_func = optimizer.scale_loss
        if isinstance(chunk, DistributedDataParallel):
            chunk.config.no_sync_func = chunk.no_sync
    return optimizer


def unwrap(chunk: torch.nn.Module) -> Qwen25VLModel:
    while not isinstance(chunk, Qwen25VLModel):
        chunk = chunk.module
    return chunk


def is_last_stage() -> bool:
    return parallel_state.is_pipeline_last_stage()
