"""One GRPO step's rollout groups on this data-parallel rank.

A try draws the next `prompts_per_step` prompts of the global sample order (this rank's share),
generates `group_size` completions for each and scores them. With DAPO's group filter on, groups
whose mean filter reward is outside (low, high) (all solved or all failed: no group-relative
signal) are set aside and further tries run, up to `max_refill_tries`; then the step is topped
up with set-aside groups, so every step trains the same number of groups (full micro-batches).
Prompts skipped for length are refilled the same way. All data-parallel ranks run the same number
of tries (a rank that is full draws but does not generate), so the consumed-sample count, which a
resume restarts from, is the same everywhere.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_latent.rl.filtering import GroupPool, keep_groups
from megatron_latent.rl.rewards import score_completions


@dataclass
class Group:
    prompt: object  # inference.generator.Prompt
    completions: list
    texts: list[str]
    rewards: torch.Tensor  # [G]
    parts: dict  # reward name -> [G]


@dataclass
class Scoring:
    spec: list
    known: dict
    judge: object = None


def _more_tries_needed(short: bool, device) -> bool:
    flag = torch.tensor([int(short)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    return bool(flag.item())


def collect_groups(cfg, *, order, consumed: int, builder, generator, policy, records,
                   scoring: Scoring, iteration: int, device):
    """-> (groups [prompts_per_step / dp], stats, consumed after the tries)."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = cfg.prompts_per_step // dp
    filtering = cfg.filter_low is not None or cfg.filter_high is not None
    low = -float("inf") if cfg.filter_low is None else cfg.filter_low
    high = float("inf") if cfg.filter_high is None else cfg.filter_high
    pool = GroupPool(per_rank)
    skipped, n_groups, t_rollout, n_tok = 0, 0, 0.0, 0
    for attempt in range(cfg.max_refill_tries):
        idx = order.take(consumed, cfg.prompts_per_step)[rank * per_rank:(rank + 1) * per_rank]
        consumed += cfg.prompts_per_step
        if not pool.full:
            t0 = time.perf_counter()
            groups, n_skip = _generate(cfg, builder, generator, policy, [records[i] for i in idx],
                                       scoring, iteration, rank, attempt)
            t_rollout += time.perf_counter() - t0
            skipped += n_skip
            n_groups += len(groups)
            n_tok += sum(len(c.tokens) for g in groups for c in g.completions)
            if groups and filtering:
                values = torch.stack([g.parts[cfg.filter_reward] for g in groups])
                pool.add(groups, keep_groups(values, cfg.group_size, low, high))
            else:
                pool.add(groups, [True] * len(groups))
        if not _more_tries_needed(not pool.full, device):
            break
    try:
        groups, stats = pool.take()
    except ValueError as e:
        limit = cfg.seq_length - cfg.max_new_tokens
        raise ValueError(f"{e}: {skipped} prompts did not fit seq_length {cfg.seq_length} - "
                         f"max_new_tokens {cfg.max_new_tokens} = {limit} tokens; raise "
                         "--seq-length or shrink images") from e
    stats.update({"skipped prompts": float(skipped), "rollout_s": t_rollout,
                  "rollout_tok_s": n_tok / max(t_rollout, 1e-9)})
    return groups, stats, consumed


def _generate(cfg, builder, generator, policy, records, scoring, iteration, rank, attempt):
    prompts, refs, ids, skipped = builder.build(records, allow_empty=True)
    if not prompts:
        return [], skipped
    G = cfg.group_size
    rollouts = [p for p in prompts for _ in range(G)]
    params = builder.sampling(iteration, rank)
    if attempt:  # a refill samples afresh; the first try keeps the step's seed
        params = dataclasses.replace(params, seed=params.seed + 7_919 * attempt)
    policy.eval()
    comps = generator.generate(rollouts, params)
    generator.release()
    policy.train()
    texts = [builder.completion_text(c) for c in comps]
    g_refs = [r for r in refs for _ in range(G)]
    g_ids = [f"{i}/{k}" for i in ids for k in range(G)]
    by_id = {r.id: r for r in records}
    questions = [by_id[i].question for i in ids for _ in range(G)] if scoring.judge else None
    rewards, parts = score_completions(texts, g_refs, scoring.spec, g_ids, scoring.known,
                                       judge=scoring.judge, questions=questions)
    out = []
    for k, prompt in enumerate(prompts):
        s = slice(k * G, (k + 1) * G)
        out.append(Group(prompt, comps[s], texts[s], rewards[s],
                         {name: v[s] for name, v in parts.items()}))
    return out, skipped
