"""The interface every latent method implements, used the same way by SFT, generation and RL.

A `LatentMethod` (one per recipe, holding its token ids and hyper-parameters) makes, for each
micro-batch, a `LatentStep` that the model calls at its two injection points:

- `inject(embeddings [b, s, h], image_features [n, h]) -> embeddings` on the first pipeline stage,
  after image features are scattered in and before the sequence-parallel scatter: overwrite the
  input embeddings at latent positions (SFT: teacher-forcing targets; RL: recorded rollout
  latents; generation: the fed-back hidden state);
- `head(model, hidden_states=[s, b, h] final-norm, output_layer=..., ...)` on the last stage, as
  GPTModel's output processor: whatever the loss (or the decoder) needs;
- `loss(output) -> (loss_sum, n_tokens, logs)`: megatron's per-token loss contract.

`count(micro_batch)` returns the token/element counts of each loss term; the training step sums
them over all micro-batches and data-parallel ranks into `micro_batch["step_totals"]` (0-d
tensors on the compute device) before the schedule runs, so each term is a true mean over the
global batch; the micro-batch's own counts go into `micro_batch["counts"]` (host numbers: a
step reads them instead of syncing on the GPU).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class LatentStep(ABC):
    def inject(self, embeddings: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        return embeddings

    @abstractmethod
    def head(self, model, *, hidden_states, output_layer, output_weight, labels=None, **kwargs):
        ...

    @abstractmethod
    def loss(self, output) -> tuple[torch.Tensor, torch.Tensor, dict]:
        ...


class LatentMethod(ABC):
    name: str = "base"
    tokens: tuple[str, ...] = ()

    @abstractmethod
    def sft_step(self, micro_batch: dict) -> LatentStep:
        ...

    def count(self, micro_batch: dict) -> dict[str, float]:
        return {"ce": float(micro_batch["loss_mask"].sum())}

    def total_loss(self, means: dict) -> float:
        """The reported loss from the per-term means of the logs (e.g. "lm loss")."""
        return means["lm loss"]

    def decode_rule(self, mode: str = "steps", steps: int = 8, threshold: float = 0.5):
        """The generation rule (latent.decoding.LatentRule) for a latent mode; None: no latents."""
        return None


class PlainLM(LatentMethod):
    """No latent steps: next-token CE only (the default head of the model)."""

    name = "plain"

    def sft_step(self, micro_batch: dict) -> LatentStep:
        return _PlainStep(micro_batch)


class _PlainStep(LatentStep):
    def __init__(self, batch):
        self.batch = batch

    def head(self, model, **kw):
        return model.lm_head(**kw)

    def loss(self, per_token_ce):
        return token_sum_loss(self.batch["loss_mask"], per_token_ce)


class InjectLatents(LatentStep):
    """Feeds given vectors [n, h] at the True positions of `mask` [b, s] (row-major order):
    replaying recorded rollout latents, or checking cached decoding against a full recompute.
    The head is the model's default (logits, or CE with labels)."""

    def __init__(self, mask: torch.Tensor, vectors: torch.Tensor):
        if int(mask.sum()) != vectors.shape[0]:
            raise ValueError(f"{int(mask.sum())} latent positions but {vectors.shape[0]} vectors")
        self.mask, self.vectors = mask, vectors

    def inject(self, embeddings, image_features):
        vec = self.vectors.to(embeddings.device, embeddings.dtype)
        return embeddings.masked_scatter(self.mask.to(embeddings.device).unsqueeze(-1), vec)

    def head(self, model, **kw):
        return model.lm_head(**kw)

    def loss(self, output):
        raise NotImplementedError("InjectLatents only feeds vectors; compute the loss outside")


def token_sum_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(sum, n_tokens, logs) with calculate_per_token_loss: megatron divides by the global count."""
    mask = loss_mask.float()
    total = (per_token_loss.float() * mask).sum()
    n = mask.sum()
    return total, n.to(torch.int), {"lm loss": torch.stack([total.detach(), n.detach()])}
