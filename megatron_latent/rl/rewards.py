"""Rule-based rewards for GRPO and group-relative advantages.

A reward is a plain function `fn(completion: str, reference: str) -> float`. Rewards are named in
a registry and combined by a spec such as "accuracy:1.0,format:0.5".
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Callable

import torch

from megatron_latent.eval.answers import answers_match, extract_answer
from megatron_latent.eval.formats import make_format_reward  # noqa: F401  (re-export)

RewardFn = Callable[[str, str], float]


class RewardError(RuntimeError):
    """A reward function failed or returned a value that is not a finite number."""


def accuracy_reward(completion: str, reference: str) -> float:
    """1.0 if the completion's <answer> matches the reference's (LVR stage-2 references are
    "<answer>X</answer>"; a bare reference is used as is). No <answer> in the completion: 0.0."""
    pred = extract_answer(completion)
    if pred is None:  # also keeps an empty reference from matching a missing answer
        return 0.0
    ref = extract_answer(reference)
    return 1.0 if answers_match(pred, reference if ref is None else ref) else 0.0


# the method-independent rewards; a latent method adds its own (`format`) through
# `with_method_rewards`
REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward}


def with_method_rewards(method) -> dict[str, RewardFn]:
    """The registry plus the latent method's rewards (its `format`)."""
    fmt = method.rl_format_reward()
    return {**REWARDS, **({"format": fmt} if fmt is not None else {})}


def register_reward(name: str, fn: RewardFn, overwrite: bool = False) -> None:
    if not name or any(c in name for c in ":, "):
        raise ValueError(f"reward name {name!r} must be non-empty, without ':', ',' or spaces")
    if not callable(fn):
        raise TypeError(f"reward {name!r}: {fn!r} is not callable")
    if name in REWARDS and not overwrite:
        raise ValueError(f"reward {name!r} is already registered (pass overwrite=True)")
    REWARDS[name] = fn


def parse_reward_spec(spec: str, rewards: dict | None = None) -> list[tuple[str, float]]:
    """Parse e.g. "accuracy:1.0,format:0.5" -> [("accuracy", 1.0), ("format", 0.5)]; a bare name
    weighs 1.0."""
    out: list[tuple[str, float]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"reward spec {spec!r}: empty entry")
        name, sep, weight_text = (part.strip() for part in item.partition(":"))
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise ValueError(f"reward spec {spec!r}: weight {weight_text!r} of {name!r} is not "
                             f"a number") from None
        out.append((name, weight))
    _check_spec(out, where=f"reward spec {spec!r}", rewards=rewards)
    return out


def _check_spec(spec: list[tuple[str, float]], where: str, rewards: dict | None = None) -> None:
    rewards = REWARDS if rewards is None else rewards
    if not spec:
        raise ValueError(f"{where}: no rewards")
    names = [name for name, _ in spec]
    for name, weight in spec:
        if name not in rewards:
            raise ValueError(f"{where}: unknown reward {name!r}; known: {sorted(rewards)}")
        if not math.isfinite(weight):
            raise ValueError(f"{where}: weight of {name!r} is {weight}, not finite")
        if names.count(name) > 1:
            raise ValueError(f"{where}: reward {name!r} appears {names.count(name)} times")


def _call(name: str, fn: RewardFn, completion: str, reference: str, where: str) -> float:
    try:
        value = fn(completion, reference)
    except Exception as e:
        raise RewardError(f"reward {name!r} raised on {where}: {type(e).__name__}: {e}") from e
    if not isinstance(value, numbers.Real):
        raise RewardError(f"reward {name!r} returned non-numeric {value!r} "
                          f"({type(value).__name__}) on {where}")
    if not math.isfinite(value):
        raise RewardError(f"reward {name!r} returned non-finite {value!r} on {where}")
    return float(value)


def score_completions(completions: list[str], references: list[str], spec: list[tuple[str, float]],
                      sample_ids: list[str] | None = None, rewards: dict | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted total [n], {reward name: values [n]}), float32. A failing reward raises
    RewardError naming it and the sample: a silent 0 would train on a wrong signal."""
    n = len(completions)
    if len(references) != n:
        raise ValueError(f"{n} completions but {len(references)} references")
    if sample_ids is not None and len(sample_ids) != n:
        raise ValueError(f"{n} completions but {len(sample_ids)} sample ids")
    rewards = REWARDS if rewards is None else rewards
    _check_spec(spec, where="score_completions", rewards=rewards)
    components: dict[str, torch.Tensor] = {}
    total = torch.zeros(n, dtype=torch.float64)
    for name, weight in spec:
        fn = rewards[name]
        values = []
        for i, (c, r) in enumerate(zip(completions, references)):
            where = f"sample {i}" + (f" (id {sample_ids[i]!r})" if sample_ids is not None else "")
            values.append(_call(name, fn, c, r, where))
        v = torch.tensor(values, dtype=torch.float64)
        total += weight * v
        components[name] = v.float()
    return total.float(), components


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                     scale: bool = True) -> torch.Tensor:
    """GRPO advantages: (r - group mean) / (group std + eps), std unbiased as in TRL; only
    mean-centred when `scale` is False. `rewards` is [n_groups * G] (groups contiguous) or
    [n_groups, G]; the result has its shape. Groups of size 1 get advantage 0: the unbiased std
    of one value is NaN, and one sample carries no relative signal anyway."""
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be 1-D or 2-D, got shape {tuple(rewards.shape)}")
    if rewards.dim() == 2 and rewards.shape[1] != group_size:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)} but group_size={group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards.reshape(-1)))[0].item()
        raise ValueError(f"rewards[{bad}] (flat index) is {rewards.reshape(-1)[bad].item()}")
    r = rewards.reshape(-1, group_size)
    r = r if r.is_floating_point() else r.float()
    if group_size == 1:
        return torch.zeros_like(r).reshape(rewards.shape)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(rewards.shape)


def import_reward_module(name: str) -> None:
    """Import a module (dotted name) or a .py file whose import registers rewards with
    `register_reward` (how users add their own, e.g. `--reward-module my_rewards.py`)."""
    import importlib
    import importlib.util
    from pathlib import Path

    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--reward-module {name}: no such file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        importlib.import_module(name)
