"""Token sampling on device without host synchronisation (so decode steps can run ahead)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        self.stop_ids = tuple(int(t) for t in self.stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def policy_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the policy the tokens are drawn from, before top-k/top-p filtering
    (what the RL training forward recomputes as log_softmax(logits / T))."""
    t = 1.0 if params.greedy else params.temperature
    return torch.log_softmax(logits.float() / t, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           suppress: torch.Tensor | None = None) -> torch.Tensor:
    """logits [b, v] -> token ids [b]; ids in `suppress` are never drawn."""
    if suppress is not None:
        logits = logits.index_fill(-1, suppress, float("-inf"))
    if params.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.empty_like(scores).scatter_(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    # exponential race (Gumbel-max in probability space): a draw from `probs`, no host sync
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)
