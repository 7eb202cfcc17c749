"""Worker bodies for multi-process tests (module-level so spawned processes can import them)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_latent import parallel
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.testing.samples import MICRO_BATCH_KEYS, two_sample_batch
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer
from megatron_latent.training.step import eval_loss, full_logits, train_step


def _is_reporter() -> bool:
    return (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def layout_run(hf_dir: str, out_path: str, layouts: list[dict], seq_length: int = 128) -> None:
    """For each layout {tp, pp, sp, first, dist_opt}: logits, loss, one Adam step, loss again.
    The reporting rank of each layout writes {layout-name: results} to out_path."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(hf_dir)
    results = {}
    for lay in layouts:
        tp, pp = lay.get("tp", 1), lay.get("pp", 1)
        parallel.initialize(parallel.ParallelConfig(tp, pp), seed=1234)
        cfg = Qwen25VLConfig.from_hf(hf_dir, tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp,
                                     sequence_parallel=lay.get("sp", False),
                                     num_layers_in_first_pipeline_stage=lay.get("first"),
                                     spec=lay.get("spec", "local"))
        batch = two_sample_batch(processor, cfg, seq_length=seq_length)
        mb = {k: batch[k] for k in MICRO_BATCH_KEYS}
        dist_opt = lay.get("dist_opt", False)
        model = build_model(cfg, hf_dir, use_distributed_optimizer=dist_opt)
        optimizer = build_optimizer(model, OptimSettings(lr=1e-3, use_distributed_optimizer=dist_opt))
        logits = full_logits(model, mb)
        step = train_step(model, optimizer, [mb])
        after = eval_loss(model, [mb])
        if _is_reporter():
            results[lay["name"]] = {"logits": logits, "loss": step["loss"], "loss_after": after,
                                    "grad_norm": step["grad_norm"],
                                    "attention_mask": batch["attention_mask"]}
        dist.barrier()
        del model, optimizer
        ps.destroy_model_parallel()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        merged = {k: v for r in gathered for k, v in r.items()}
        torch.save(merged, out_path)


def reshard_run(hf_dir: str, ckpt_tp1: str, ckpt_tp2: str, out_path: str,
                layouts: list[dict]) -> None:
    """Convert `hf_dir` at TP=2 into `ckpt_tp2` (on these 2 ranks), then load both `ckpt_tp1`
    (converted at TP=1 beforehand) and `ckpt_tp2` at every layout; record full logits."""
    from transformers import AutoProcessor

    from megatron_latent import checkpointing
    from megatron_latent.conversion.convert import hf_to_megatron

    hf_to_megatron(hf_dir, ckpt_tp2, tp=2)
    ps.destroy_model_parallel()
    processor = AutoProcessor.from_pretrained(hf_dir)
    results = {}
    for ckpt_name, ckpt in (("from_tp1", ckpt_tp1), ("from_tp2", ckpt_tp2)):
        for lay in layouts:
            tp, pp = lay.get("tp", 1), lay.get("pp", 1)
            parallel.initialize(parallel.ParallelConfig(tp, pp))
            cfg = checkpointing.config_from_checkpoint(
                ckpt, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                num_layers_in_first_pipeline_stage=lay.get("first"))
            model = build_model(cfg, wrap_ddp=False)
            checkpointing.load_model(ckpt, model[0])
            logits = full_logits(model, two_sample_batch(processor, cfg))
            if _is_reporter():
                results[f"{ckpt_name}/{lay['name']}"] = logits
            del model
            ps.destroy_model_parallel()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        torch.save({k: v for r in gathered for k, v in r.items()}, out_path)


def train_runs(runs: dict, out_path: str) -> None:
    """Run the SFT trainer once per named config (kwargs of TrainConfig); rank 0 saves
    {name: [per-iteration logs]}."""
    from megatron_latent.training.build import OptimSettings
    from megatron_latent.training.trainer import TrainConfig, train

    results = {}
    for name, kw in runs.items():
        kw = dict(kw)
        optim = OptimSettings(**kw.pop("optim", {}))
        kw.setdefault("latent_method", "lvr")
        results[name] = train(TrainConfig(**kw, optim=optim, wandb_mode="disabled"))
        ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        torch.save(results, out_path)
