"""Run HF transformers and our Megatron model on the same text+image input and compare logits."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_latent import checkpointing, parallel
from megatron_latent.data.sample_inputs import two_sample_batch


def compare(hf_dir: str | Path, ckpt: str | Path, tp: int = 1, pp: int = 1) -> dict | None:
    """Every rank calls; rank 0 returns {max_abs_diff, top1_agreement, tokens, ...}."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from megatron_latent.training.build import build_model
    from megatron_latent.training.step import full_logits

    parallel.initialize(parallel.ParallelConfig(tp, pp))
    cfg = checkpointing.config_from_checkpoint(ckpt, tensor_model_parallel_size=tp,
                                               pipeline_model_parallel_size=pp)
    model = build_model(cfg, wrap_ddp=False)
    checkpointing.load_model(ckpt, model[0])
    batch = two_sample_batch(AutoProcessor.from_pretrained(hf_dir), cfg)
    ours = full_logits(model, batch)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, None if ours is None else ours.float().cpu())
    if dist.get_rank() != 0:
        return None
    ours = next(g for g in gathered if g is not None)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=cfg.params_dtype).eval()
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    with torch.no_grad():
        ref = hf(**{k: batch[k] for k in keys}).logits.float()
    real = batch["attention_mask"].bool()
    a, b = ours[real], ref[real]
    return {"max_abs_diff": (a - b).abs().max().item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "tokens": int(real.sum()), "dtype": str(cfg.params_dtype).removeprefix("torch."),
            "tp": tp, "pp": pp}
