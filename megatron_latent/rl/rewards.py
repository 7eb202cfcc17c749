"""Rule-based rewards for GRPO and group-relative advantages.

A reward is a plain function `fn(completion: str, reference: str) -> float`. Rewards are named in
a registry and combined by a spec such as "accuracy:1.0,format:0.5". An optional judge (a local
callable, see `load_judge`) re-scores answers the accuracy rule marks wrong.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_latent.eval.answers import answers_match, extract_answer
from megatron_latent.eval.formats import make_format_reward  # noqa: F401  (re-export)
from megatron_latent.eval.formats import squeeze_tag_whitespace
from megatron_latent.eval.repetition import repetition_score

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


def make_accuracy_reward(repetition_limit: float | None = None,
                         preprocess: Callable[[str], str] | None = None) -> RewardFn:
    """`accuracy_reward`, but -1.0 when the completion's repetition score exceeds
    `repetition_limit` (HyLaR: 0.5), so degenerate loops score below wrong answers. As in HyLaR,
    the score is taken after `preprocess` (e.g. a method's span renderer) and with the whitespace
    around tags squeezed out. None: plain `accuracy_reward`."""
    if repetition_limit is None:
        return accuracy_reward
    if not math.isfinite(repetition_limit):
        raise ValueError(f"repetition_limit={repetition_limit} is not finite")

    def accuracy_unless_repetitive(completion: str, reference: str) -> float:
        text = preprocess(completion) if preprocess is not None else completion
        if repetition_score(squeeze_tag_whitespace(text)) > repetition_limit:
            return -1.0
        return accuracy_reward(completion, reference)

    return accuracy_unless_repetitive


# the method-independent rewards; a latent method adds its own (`format`) through
# `with_method_rewards`
REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward}


def with_method_rewards(method) -> dict[str, RewardFn]:
    """The registry plus the latent method's own rewards (its `format`; they win by name)."""
    return {**REWARDS, **method.rl_rewards()}


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


@dataclass(frozen=True)
class JudgeItem:
    """One answer for the judge. `prediction` is the completion's <answer> content, `reference`
    the reference's (or the bare reference); `completion` is the whole text, for judges that read
    the reasoning (HyLaR's LLM judge was shown the full response)."""
    question: str
    prediction: str
    reference: str
    completion: str = ""


# Batched so that a local LLM judge can run one generate call. A verdict per item: True (correct),
# False (wrong), None (cannot say: the rule's 0 stands).
Judge = Callable[[list[JudgeItem]], list[bool | None]]


def _where(i: int, sample_ids: list[str] | None) -> str:
    return f"sample {i}" + (f" (id {sample_ids[i]!r})" if sample_ids is not None else "")


def score_completions(completions: list[str], references: list[str], spec: list[tuple[str, float]],
                      sample_ids: list[str] | None = None, rewards: dict | None = None,
                      judge: Judge | None = None, questions: list[str] | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted total [n], {reward name: values [n]}), float32. A failing reward raises
    RewardError naming it and the sample: a silent 0 would train on a wrong signal.

    With a `judge`, the samples whose "accuracy" is exactly 0.0 and that have an <answer> go to it
    in one call; a True verdict sets their accuracy to 1.0 (-1.0, a repetition penalty, is kept).
    The components then also hold "judged" and "judge_flipped" (0/1 per sample), for logging."""
    n = len(completions)
    if len(references) != n:
        raise ValueError(f"{n} completions but {len(references)} references")
    if sample_ids is not None and len(sample_ids) != n:
        raise ValueError(f"{n} completions but {len(sample_ids)} sample ids")
    if questions is not None and len(questions) != n:
        raise ValueError(f"{n} completions but {len(questions)} questions")
    rewards = REWARDS if rewards is None else rewards
    _check_spec(spec, where="score_completions", rewards=rewards)
    if judge is not None and "accuracy" not in dict(spec):
        raise ValueError("score_completions: a judge re-scores the 'accuracy' reward, which the "
                         f"spec {spec} does not have")
    values: dict[str, torch.Tensor] = {}
    for name, _ in spec:
        values[name] = torch.tensor([_call(name, rewards[name], c, r, _where(i, sample_ids))
                                     for i, (c, r) in enumerate(zip(completions, references))],
                                    dtype=torch.float64)
    extra: dict[str, torch.Tensor] = {}
    if judge is not None:
        judged, flipped = _judge(judge, completions, references, questions, sample_ids,
                                 values["accuracy"])
        values["accuracy"] = torch.where(flipped, 1.0, values["accuracy"])
        extra = {"judged": judged.float(), "judge_flipped": flipped.float()}
    total = torch.zeros(n, dtype=torch.float64)
    for name, weight in spec:
        total += weight * values[name]
    return total.float(), {**{k: v.float() for k, v in values.items()}, **extra}


def _judge(judge: Judge, completions, references, questions, sample_ids, accuracy: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sent to the judge [n], flipped to correct [n]) bool masks."""
    items, index = [], []
    for i, (c, r) in enumerate(zip(completions, references)):
        pred = extract_answer(c)
        if accuracy[i].item() == 0.0 and pred is not None:
            ref = extract_answer(r)
            items.append(JudgeItem(questions[i] if questions is not None else "", pred,
                                   r if ref is None else ref, c))
            index.append(i)
    judged = torch.zeros(len(completions), dtype=torch.bool)
    flipped = torch.zeros(len(completions), dtype=torch.bool)
    if not items:
        return judged, flipped
    try:
        verdicts = judge(items)
    except Exception as e:
        raise RewardError(f"judge raised on {len(items)} samples (first: "
                          f"{_where(index[0], sample_ids)}): {type(e).__name__}: {e}") from e
    if not isinstance(verdicts, (list, tuple)) or len(verdicts) != len(items):
        got = f"{len(verdicts)} verdicts" if isinstance(verdicts, (list, tuple)) else repr(verdicts)
        raise RewardError(f"judge returned {got} for {len(items)} samples; expected a list of "
                          f"{len(items)} True/False/None")
    for i, v in zip(index, verdicts):
        if v is not None and not isinstance(v, bool):
            raise RewardError(f"judge returned {v!r} ({type(v).__name__}) for "
                              f"{_where(i, sample_ids)}; expected True, False or None")
        judged[i], flipped[i] = True, v is True
    return judged, flipped


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


def _import(name: str, what: str):
    """A module by dotted name or from a .py file."""
    import importlib
    import importlib.util
    from pathlib import Path

    if not name.endswith(".py"):
        return importlib.import_module(name)
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {name}: no such file")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_reward_module(name: str) -> None:
    """Import a module (dotted name) or a .py file whose import registers rewards with
    `register_reward` (how users add their own, e.g. `--reward-module my_rewards.py`)."""
    _import(name, "--reward-module")


def load_judge(spec: str) -> Judge:
    """The judge named by "package.module:function" or "path/to/file.py:function" (see `Judge`).
    It runs in this process: a local rule or model, never a network service in CI."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"judge {spec!r}: expected 'package.module:function' or "
                         f"'path/to/file.py:function'")
    try:
        module = _import(module_name, "judge")
    except ImportError as e:
        raise ImportError(f"judge {spec!r}: cannot import {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise AttributeError(f"judge {spec!r}: {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise TypeError(f"judge {spec!r}: {attr!r} is not callable ({type(fn).__name__})")
    return fn
