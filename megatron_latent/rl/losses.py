"""Policy-gradient losses over per-token log-probabilities.

`PolicyLoss` is the plug-in point: the objective (objective.py) hands it the training forward's
token log-probs and the rollout batch; it returns a per-token loss (summed over `loss_mask` and
divided by the global token count, megatron's per-token loss contract) and per-token log terms.
`latent_terms` is where a method adds terms over latent positions: HyLaR's decoupled latent PPO
term, or DeepLatent's Gaussian modulation actions. GRPO (LVR stage 2) has none: latent spans get
no policy or KL term there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(q - l) - (q - l) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp, old_logp, advantages, eps_low: float, eps_high: float):
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) per token, and where the clip binds."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).float(), ratio


def dual_clip_surrogate(logp, old_logp, advantages, eps_low: float, eps_high: float,
                        clip_c: float = 3.0):
    """Dual-clip PPO per element (verl/EasyR1's form, used by HyLaR's DePO): with the log-ratio
    clamped to +-10, max(-A r, -A clip(r)) and, for A < 0, at most -A c. -> (loss, where the
    clip binds)."""
    delta = (logp - old_logp).clamp(-10.0, 10.0)
    ratio = delta.exp()
    clipped = delta.clamp(math.log(1 - eps_low), math.log(1 + eps_high)).exp()
    pg = torch.maximum(-advantages * ratio, -advantages * clipped)
    dual = torch.minimum(pg, -advantages * clip_c)
    loss = torch.where(advantages < 0, dual, pg)
    return loss, (-advantages * clipped > -advantages * ratio).float()


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 with verl's clamps: d = clamp(ref - logp, +-10), min(e^d - d - 1, 10)."""
    d = (ref_logp - logp).clamp(-10.0, 10.0)
    return (d.exp() - d - 1).clamp(max=10.0)


CORRECTIONS = ("none", "recompute", "tis")


def old_policy(logp: torch.Tensor, batch: dict):
    """(the ratio's old log-probs, per-token truncated-IS weights or None) under the batch's
    rollout correction (rl/loop.py sets the fields):
    - `old_logprobs` given: the rollout's (correction "none") or the training forward's from a
      recompute pass ("recompute", or "tis" with several PPO epochs); None: this forward's own,
      detached (one epoch of "tis": the old training policy is the current one);
    - `tis_cap` given ("tis"): w = min(pi_old_train / pi_rollout, cap), detached, weighting
      each token's policy-gradient term (verl's / NeMo-RL's truncated importance sampling)."""
    old = batch.get("old_logprobs")
    old = logp.detach() if old is None else old
    cap = batch.get("tis_cap")
    if cap is None:
        return old, None
    return old, (old - batch["rollout_logprobs"]).exp().clamp(max=float(cap)).detach()


def mismatch_logs(logp: torch.Tensor, batch: dict, eps_low: float, eps_high: float) -> dict:
    """Per-token train/rollout mismatch of this forward (d = log p_train - log p_rollout):
    its mean |d| ("rollout gap") and max, the k3 estimate of KL(pi_rollout || pi_train) on the
    rollout's own samples (e^d - 1 - d), and the share of tokens whose train/rollout ratio
    alone lies outside the clip range [1 - eps_low, 1 + eps_high]."""
    rollout = batch.get("rollout_logprobs")
    d = logp.detach() - (batch["old_logprobs"] if rollout is None else rollout)
    ratio = d.exp()
    return {"rollout gap": d.abs(), "rollout gap max": d.abs(),
            "rollout kl": ratio - 1 - d,
            "rollout gap share": ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).float()}


@dataclass
class PolicyLoss:
    has_latent_policy = False  # `latent_logprobs` scores latent actions

    def token_terms(self, logp: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def count(self, batch: dict) -> dict[str, float]:
        """Counts of this loss's own terms (e.g. latent actions), summed over the global batch
        into `batch["step_totals"]` like the token count, so each term is a global mean."""
        return {}

    def latent_terms(self, model, hidden: torch.Tensor, batch: dict):
        """-> (loss over latent positions or None, {log name: (sum, count)}): a token-sum-scale
        loss added to the step's (megatron divides it by the global token count, so a mean
        over another count is rescaled by `step_totals`); `hidden` [s, b, h] final-norm, the
        model gives access to the method's side modules on this stage. None by default."""
        return None, {}

    def latent_logprobs(self, model, hidden: torch.Tensor, batch: dict):
        """The current policy's log-probs of the recorded latent actions, for a forward-only
        recompute of the old policy (several PPO epochs); None if the loss has no latent
        policy."""
        return None

    def latent_rollout_gap(self, latent_logprobs: torch.Tensor, batch: dict) -> torch.Tensor:
        """|log pi_train - log pi_rollout| of each latent action, from `latent_logprobs`."""
        return (latent_logprobs - batch["latent_old_logprobs"].to(latent_logprobs)).abs()

    # the reference pass needs the method's side modules (`reference_fields` uses them)
    reference_needs_modules = False

    def reference_fields(self, model, hidden: torch.Tensor, batch: dict) -> dict:
        """What the frozen reference's forward records for this loss besides its token
        log-probs (e.g. its latent policy's parameters), merged into the micro-batch."""
        return {}

    def rollout_fields(self, rows: list[tuple[torch.Tensor, object]]) -> dict:
        """Batch fields of one rollout micro-batch this loss needs, from its rows (the full
        token sequence [n] (prompt + completion), inference.generator.Completion)."""
        return {}

    def total(self, means: dict) -> float:
        """The step's reported objective from the per-term means of the logs."""
        return means["policy loss"]


@dataclass
class GRPOLoss(PolicyLoss):
    """Clipped surrogate with group-normalised advantages + beta * k3 KL to the reference.
    Defaults follow LVR stage 2 (TRL 0.17 GRPO): eps 0.2, beta 0.04."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.04

    def token_terms(self, logp, batch):
        adv = batch["advantages"].to(logp.dtype).unsqueeze(1)  # per sample -> per token
        old, weight = old_policy(logp, batch)
        pg, clipped, ratio = clipped_surrogate(logp, old, adv, self.eps_low, self.eps_high)
        logs = {"pg loss": pg, "clip fraction": clipped, "ratio": ratio,
                **mismatch_logs(logp, batch, self.eps_low, self.eps_high)}
        if weight is not None:
            pg = pg * weight
            logs["tis weight"] = weight
        loss = pg
        if self.beta:
            kl = k3_kl(logp, batch["ref_logprobs"])
            loss = loss + self.beta * kl
            logs["kl"] = kl
        return loss, logs
