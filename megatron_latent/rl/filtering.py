"""DAPO-style dynamic sampling: keep the prompt groups whose mean score (e.g. accuracy) is strictly
inside (low, high), i.e. groups that are neither all-solved nor all-failed and so carry a
group-relative signal, and re-sample until a batch of them is collected.

Use per step: `pool = GroupPool(target)`; per try: generate, score, `pool.add(groups,
keep_groups(scores, G, low, high))`, stop when `pool.full` or the tries run out; then
`groups, stats = pool.take()`. With data parallelism `full` is per rank: the loop must agree on
whether to try again (all ranks run the same number of tries).
"""

from __future__ import annotations

from typing import Sequence

import torch


def keep_groups(values: torch.Tensor, group_size: int, low: float, high: float) -> torch.Tensor:
    """bool [n_groups]: low < group mean < high. `values` is [n_groups * G] (groups contiguous)
    or [n_groups, G]. Means are float64, so a mean of exactly 0.1 equals the bound 0.1 (HyLaR
    takes np.mean of floats) and is dropped."""
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    if not low < high:
        raise ValueError(f"filter bounds ({low}, {high}) are empty: need low < high")
    if values.dim() not in (1, 2) or values.numel() == 0:
        raise ValueError(f"values must be non-empty 1-D or 2-D, got shape {tuple(values.shape)}")
    if values.dim() == 2 and values.shape[1] != group_size:
        raise ValueError(f"values has shape {tuple(values.shape)} but group_size={group_size}")
    if values.numel() % group_size:
        raise ValueError(f"{values.numel()} values do not split into groups of {group_size}")
    means = values.reshape(-1, group_size).double().mean(dim=1)
    return (means > low) & (means < high)


class GroupPool:
    """Collects groups (opaque objects) over successive tries: kept ones first, in arrival order;
    `take` tops up from the dropped ones, also in arrival order, when the tries ran out before
    `target_groups` were kept. HyLaR instead keeps a whole try when it drops every group; we top
    up to a fixed count so that every step has the same number of full micro-batches."""

    def __init__(self, target_groups: int):
        if target_groups < 1:
            raise ValueError(f"target_groups={target_groups} must be >= 1")
        self.target_groups = target_groups
        self.tries = 0
        self._kept: list = []
        self._dropped: list = []

    def add(self, groups: Sequence, keep: torch.Tensor | Sequence[bool]) -> None:
        """One try's groups and its `keep_groups` mask."""
        keep = keep.tolist() if isinstance(keep, torch.Tensor) else list(keep)
        if len(keep) != len(groups):
            raise ValueError(f"{len(groups)} groups but a keep mask of {len(keep)}")
        self.tries += 1
        for group, k in zip(groups, keep):
            (self._kept if k else self._dropped).append(group)

    @property
    def full(self) -> bool:
        return len(self._kept) >= self.target_groups

    def take(self) -> tuple[list, dict[str, float]]:
        """(exactly `target_groups` groups, stats). Surplus kept groups are discarded (HyLaR
        truncates too). Raises if fewer groups than the target were added in all."""
        seen = len(self._kept) + len(self._dropped)
        if seen < self.target_groups:
            raise ValueError(f"{seen} groups over {self.tries} tries, fewer than the "
                             f"{self.target_groups} a batch needs")
        groups = self._kept[:self.target_groups]
        topped_up = self.target_groups - len(groups)
        groups += self._dropped[:topped_up]
        return groups, {"tries": float(self.tries), "kept share": len(self._kept) / seen,
                        "topped up": float(topped_up)}
