"""A learnable reward and the GRPO worker for the CPU end-to-end test (module-level so spawned
processes can import them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.distributed as dist

# special tokens (<|...|>) and added tag tokens (<latent>, <latent_pad>, ...): not the text
_TAGS = re.compile(r"<\|[^|]*\|>|<[/a-z_]+>")


def vowel_reward(completion: str, reference: str) -> float:
    """Share of vowels among the letters of the completion's text (special and tag tokens
    removed): a tiny random model can learn it from group-relative advantages in a few dozen
    steps."""
    letters = [c for c in _TAGS.sub("", completion).lower() if c.isalpha()]
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
    {name: history}, or {name: "error: ..."} for a config with `expect_error` that raised."""
    from megatron.core import parallel_state as ps

    results = {}
    for name, kw in runs.items():
        kw = dict(kw)
        if kw.pop("expect_error", False):
            try:
                _run(kw)
                results[name] = "no error"
            except Exception as e:  # noqa: BLE001 - the test reads the message
                results[name] = f"error: {type(e).__name__}: {e}"
        else:
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


def save_rl_start(name: str, hf_dir: str, hparams: dict, out: str) -> str:
    """A model-only checkpoint of method `name` at the start of its RL stage, as its kit
    describes it (method_kits.MethodKit.rl_start: e.g. DeepLatent's trained-like MLPs and
    sigmas), from the HF dir's weights. Call with parallel state initialised (TP = PP = 1)."""
    from transformers import AutoTokenizer

    from megatron_latent import checkpointing
    from megatron_latent.conversion.hf_load import load_hf_weights
    from megatron_latent.latent import registry
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
    from megatron_latent.models.qwen25vl.model import Qwen25VLModel
    from megatron_latent.testing.method_kits import KITS

    cfg = Qwen25VLConfig.from_hf(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    method = registry.build(name, tokenizer, cfg, hparams)
    model = Qwen25VLModel(cfg, latent_modules=method.build_modules(cfg, pre_process=True,
                                                                   post_process=True))
    load_hf_weights(model, hf_dir, latent_method=method)
    if KITS[name].rl_start is not None:
        method = KITS[name].rl_start(method, model.latent_modules)
    checkpointing.save_model(out, model, iteration=0)
    checkpointing.write_metadata(out, json.loads((Path(hf_dir) / "config.json").read_text()),
                                 cfg.spec, cfg.params_dtype, hf_dir,
                                 vision_ffn_divisible_by=cfg.vision_ffn_divisible_by,
                                 latent_method=registry.describe(method))
    return out
