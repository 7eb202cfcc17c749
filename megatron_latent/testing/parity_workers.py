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


def latentformer_tp_run(ref_path: str, ckpt_tp1: str, ckpt_tp2: str, out_path: str) -> None:
    """DeepLatent's side modules at TP=2, loaded from the TP=1 dist checkpoint `ckpt_tp1`
    (a reshard): their latents and gradients on the TP=1 run's inputs (`ref_path`: shape,
    inputs, loss weights, TP=1 results per noise flag), as max abs errors against TP=1 (a
    sharded parameter's gradient against its slice) in `out_path`. Then one SGD step
    (p -= 0.01 * the last pass's grad) and a save at TP=2 into `ckpt_tp2` (the reverse)."""
    from pathlib import Path

    from megatron.core import dist_checkpointing

    from megatron_latent.latent.latentformer import DeepLatentModules, parallel_linear_config

    parallel.initialize(parallel.ParallelConfig(2), seed=99)  # another seed: weights must load
    ref = torch.load(ref_path, weights_only=False)
    shape = dict(ref["shape"])
    dim, heads = shape.pop("dim"), shape.pop("num_heads")
    mods = DeepLatentModules(parallel_linear_config(2, torch.float32), dim, heads, **shape)
    mods.load_state_dict(dist_checkpointing.load(mods.sharded_state_dict(), ckpt_tp1))
    rank = ps.get_tensor_model_parallel_rank()
    errs = {}
    for noise, want in ref["results"].items():
        mods.zero_grad(set_to_none=True)
        lat, _ = mods.build_latents(**ref["inputs"], noise=noise,
                                    generator=torch.Generator().manual_seed(5))
        (lat * ref["weights"]).sum().backward()
        errs[f"latents/noise={noise}"] = (lat - want["latents"]).abs().max().item()
        for name, p in mods.named_parameters():
            if p.grad is None:  # the scale head: not on this path
                continue
            full = want["grads"][name]
            if getattr(p, "tensor_model_parallel", False):
                full = full.chunk(2, dim=p.partition_dim)[rank]
            errs[f"grad/noise={noise}/{name}"] = (p.grad - full).abs().max().item()
    with torch.no_grad():
        for p in mods.parameters():
            if p.grad is not None:
                p.sub_(0.01 * p.grad)
    if dist.get_rank() == 0:
        Path(ckpt_tp2).mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(mods.sharded_state_dict(), ckpt_tp2)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, errs)
    if dist.get_rank() == 0:
        torch.save({k: max(g[k] for g in gathered) for k in errs}, out_path)
