"""A learnable reward and the GRPO worker for the CPU end-to-end test (module-level so spawned
processes can import them)."""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

_SPECIAL = re.compile(r"<\|[^|]*\|>")


def vowel_reward(completion: str, reference: str) -> float:
    """Share of vowels among the letters of the completion's text (special tokens removed): a
    tiny random model can learn it from group-relative advantages in a few dozen steps."""
    letters = [c for c in _SPECIAL.sub("", completion).lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0


def _register() -> None:
    from megatron_latent.rl.rewards import REWARDS, register_reward

    if "vowels" not in REWARDS:
        register_reward("vowels", vowel_reward)


_register()  # importing this module (e.g. --reward-module) makes "vowels" available


def grpo_run(cfg_kwargs: dict, out_path: str) -> None:
    history = _run(cfg_kwargs)
    if dist.get_rank() == 0:
        torch.save(history, out_path)


def grpo_runs(runs: dict, out_path: str) -> None:
    """One GRPO run per named config, in sequence in the same processes; rank 0 saves
    {name: history}."""
    from megatron.core import parallel_state as ps

    results = {}
    for name, kw in runs.items():
        results[name] = _run(kw)
        ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        torch.save(results, out_path)


def _run(cfg_kwargs: dict) -> list[dict]:
    from megatron_latent.rl.loop import GRPOConfig, run_grpo
    from megatron_latent.training.build import OptimSettings

    kw = dict(cfg_kwargs)
    kw["optim"] = OptimSettings(**kw.pop("optim", {}))
    return run_grpo(GRPOConfig(**kw))
