"""The RL training forward as a latent method: the same model injection points as SFT.

`RLObjective` plugs into training.step.train_step (megatron-core schedules, DDP, optimizer):
for each rollout micro-batch it makes an `RLStep` that injects the *recorded* rollout latents at
their positions (one parallel forward, no token-by-token replay), and whose head turns the
final-norm hidden states into per-token log-probs of the sampled tokens at the rollout
temperature. The policy loss (losses.py) is token-mean over the whole global batch.
`TokenScorer` is the same forward without a loss: reference log-probs, and checks.
"""

from __future__ import annotations

import torch

from megatron_latent.latent.base import InjectLatents, LatentMethod, LatentStep
from megatron_latent.rl.losses import PolicyLoss


def token_logprobs(model, hidden_states, output_layer, output_weight, labels, temperature):
    """[b, s] log p(labels) under softmax(logits / T); vocab-parallel under TP."""
    logits = model.logits(hidden_states, output_layer, output_weight)
    if temperature != 1.0:
        logits = logits / temperature
    return -model.cross_entropy(labels, logits)


class RLStep(LatentStep):
    """`loss` None: scoring (token log-probs); `score` "old": the token log-probs and the loss's
    latent log-probs, no loss (the old policy recomputed before several PPO epochs);
    "reference": the token log-probs and the loss's `reference_fields`."""

    def __init__(self, batch: dict, temperature: float, loss: PolicyLoss | None,
                 score: str | None = None):
        self.batch, self.temperature, self.policy_loss = batch, temperature, loss
        self.score = score

    def inject(self, embeddings, image_features, modules=None):
        recorded = InjectLatents(self.batch["latent_mask"], self.batch["latent_vectors"])
        return recorded.inject(embeddings, image_features)

    def head(self, model, *, hidden_states, output_layer, output_weight, labels=None, **_):
        logp = token_logprobs(model, hidden_states, output_layer, output_weight, labels,
                              self.temperature)
        if self.policy_loss is None:
            return logp
        if self.score == "old":
            lat = self.policy_loss.latent_logprobs(model, hidden_states, self.batch)
            return {"logp": logp.detach(), "latent": None if lat is None else lat.detach()}
        if self.score == "reference":
            fields = self.policy_loss.reference_fields(model, hidden_states, self.batch)
            return {"logp": logp.detach(), **{k: v.detach() for k, v in fields.items()}}
        return {"logp": logp,
                "latent": self.policy_loss.latent_terms(model, hidden_states, self.batch)}

    def loss(self, output):
        mask = self.batch["loss_mask"].float()
        n = mask.sum()
        per_token, logs = self.policy_loss.token_terms(output["logp"].float(), self.batch)
        total = (per_token * mask).sum()
        out_logs = {"policy loss": torch.stack([total.detach(), n])}
        for k, v in logs.items():
            if k.endswith(" max"):  # reduced by max (training.step.PendingLogs)
                out_logs[k] = torch.stack([(v.detach().float() * mask).max(), n.new_ones(())])
            else:
                out_logs[k] = torch.stack([(v.detach().float() * mask).sum(), n])
        latent_loss, latent_logs = output["latent"]
        if latent_loss is not None:
            total = total + latent_loss
        for k, (s, c) in latent_logs.items():
            out_logs[k] = torch.stack([s.detach().float(),
                                       torch.as_tensor(c, dtype=torch.float32, device=s.device)])
        return total, n.to(torch.int), out_logs


class RLObjective(LatentMethod):
    name = "rl"

    def __init__(self, loss: PolicyLoss, temperature: float = 1.0):
        self.policy_loss, self.temperature = loss, temperature

    def sft_step(self, micro_batch: dict) -> RLStep:
        return RLStep(micro_batch, self.temperature, self.policy_loss)

    def count(self, micro_batch: dict) -> dict[str, float]:
        return {**super().count(micro_batch), **self.policy_loss.count(micro_batch)}

    def total_loss(self, means: dict) -> float:
        return self.policy_loss.total(means)


class TokenScorer(LatentMethod):
    """Forward-only: per-token log-probs [b, s] of the labels (no loss); given the policy loss,
    {"logp", "latent": its latent actions' log-probs or None} per micro-batch, or with
    `reference`, {"logp", **its reference_fields}."""

    name = "score"

    def __init__(self, temperature: float = 1.0, policy_loss: PolicyLoss | None = None,
                 reference: bool = False):
        self.temperature, self.policy_loss = temperature, policy_loss
        self.mode = None if policy_loss is None else ("reference" if reference else "old")

    def sft_step(self, micro_batch: dict) -> RLStep:
        return RLStep(micro_batch, self.temperature, self.policy_loss, score=self.mode)
