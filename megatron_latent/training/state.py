"""Save and restore everything a training run needs to resume exactly: model, optimizer (incl. the
distributed optimizer's shards), LR scheduler, RNG states of every rank, iteration and data
position. One megatron-core dist checkpoint per iteration (see megatron_latent.checkpointing)."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_latent import checkpointing
from megatron_latent.training.build import unwrap


def _rng_state() -> dict:
    state = {"random": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_rng() -> ShardedObject:
    """One entry per (pp, tp, dp) rank: dropout streams differ across all of them."""
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", _rng_state(), shape, offset, replica_id=0)


def _layout() -> list[int]:
    return [ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_world_size()]


def _sharded(model_chunks, optimizer, scheduler, train_state: dict, loading: bool,
             with_rng: bool = True) -> dict:
    # the unwrapped model: the same keys as converted checkpoints (no DDP "module." prefix)
    model_sd = unwrap(model_chunks[0]).sharded_state_dict()
    sd = {"model": model_sd, "train_state": train_state}
    if with_rng:
        sd["rng"] = _sharded_rng()
    if optimizer is not None:
        # "fully_reshardable": the distributed optimizer's state reloads at any TP/PP/DP
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    return sd


def save(ckpt, iteration: int, model_chunks, optimizer, scheduler, train_state: dict,
         keep_last: int | None = None):
    train_state = {**train_state, "layout": _layout()}
    return checkpointing.save_state(
        ckpt, iteration, _sharded(model_chunks, optimizer, scheduler, train_state, False),
        keep_last=keep_last)


def saved_train_state(ckpt, iteration: int | None = None) -> dict | None:
    """The train_state of a training checkpoint; None for a model-only (converted) one."""
    return checkpointing.load_common(ckpt, iteration).get("train_state")


def _check_distributed_optimizer_can_load(optimizer) -> None:
    """megatron-core 0.19 restores the distributed optimizer correctly only with Apex/TE Adam;
    with torch Adam (CPU) its per-parameter `step` breaks every load format (KeyError, or an
    inexact resume). Refuse instead of resuming wrongly."""
    from megatron.core.optimizer import distrib_optimizer as d

    if not d.HAVE_APEX_OR_TE and [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
                                  if isinstance(o, d.DistributedOptimizer)]:
        raise RuntimeError("resuming with --use-distributed-optimizer needs Transformer Engine "
                           "or Apex (megatron-core 0.19 cannot restore it for torch Adam); "
                           "resume without --use-distributed-optimizer on this machine")


# what the LR/WD schedule sets per parameter group; the command line's values win on resume
_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _saved_groups(tree) -> list[list[dict]]:
    """Every `param_groups` list in a loaded optimizer state, in the chained optimizers' order."""
    if isinstance(tree, dict):
        if isinstance(tree.get("param_groups"), list):
            return [tree["param_groups"]]
        return [g for v in tree.values() for g in _saved_groups(v)]
    if isinstance(tree, list):
        return [g for v in tree for g in _saved_groups(v)]
    return []


def _adopt_schedule(optimizer, saved_state: dict) -> None:
    """megatron-core pairs saved and current parameter groups by their hyper-parameters,
    `max_lr` included, so a resume with another --lr found no group. The command line's schedule
    wins on resume (build.build_scheduler): its values go into the saved groups, paired in order
    as megatron pairs their parameters, where all else about the two groups is equal. Another
    group layout is left to megatron-core (preflight.check_resume names the flag first)."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    current = [o.optimizer.param_groups for o in getattr(optimizer, "chained_optimizers",
                                                         [optimizer])]
    saved = _saved_groups(saved_state)
    if [len(g) for g in saved] != [len(g) for g in current]:
        return

    def rest(group):
        return [group.get(k) for k in param_group_identifier_keys if k not in _SCHEDULE_KEYS]

    for mine, theirs in zip(current, saved):
        for g, h in zip(mine, theirs):
            if rest(g) == rest(h):
                h.update({k: g[k] for k in _SCHEDULE_KEYS if k in g})


def load(ckpt, model_chunks, optimizer=None, scheduler=None, iteration: int | None = None) -> dict:
    """Restore in place; returns the saved train_state (iteration, consumed samples, ...).
    RNG states are per rank, so they are restored only when the parallel layout is unchanged
    (the model, optimizer and scheduler reshard to any layout)."""
    same_layout = (saved_train_state(ckpt, iteration) or {}).get("layout") == _layout()
    if optimizer is not None:
        _check_distributed_optimizer_can_load(optimizer)
    template = _sharded(model_chunks, optimizer, scheduler, {}, True, with_rng=same_layout)
    state = checkpointing.load_state(ckpt, template, iteration)
    unwrap(model_chunks[0]).load_state_dict(state["model"], strict=False)
    if optimizer is not None:
        _adopt_schedule(optimizer, state["optimizer"])
        with torch.no_grad():  # it copies into leaf main params
            optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if same_layout:
        _set_rng_state(state["rng"])
    return state["train_state"]
