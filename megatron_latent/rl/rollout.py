"""Rollouts -> training micro-batches: prompt + completion, the sampled tokens as labels, the
recorded latents at their positions, the rollout's log-probs as the PPO "old" policy.

Trained tokens (loss_mask): every completion token except latent positions, tokens the decode
program forced (not sampled: no action, e.g. a span end appended at the cap) and the method's
excluded ids (`rl_untrained_ids`; for LVR its span opener, so from the opener up to the span's
end token (exclusive) nothing gets a policy or KL term, while the end and the text do:
seed-methods.md 2.7).
"""

from __future__ import annotations

import torch

from megatron_latent.inference.generator import Completion, Prompt
from megatron_latent.models.qwen25vl.rope_index import rope_index


def rollout_micro_batches(prompts: list[Prompt], completions: list[Completion],
                          advantages: torch.Tensor, *, cfg, pad_id: int, micro_batch_size: int,
                          pad_to: int, exclude_ids: tuple[int, ...] = (),
                          policy_loss=None) -> list[dict]:
    """`policy_loss` (rl/losses.py): adds the fields its `rollout_fields` builds."""
    if len(prompts) != len(completions) or len(prompts) != advantages.numel():
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, "
                         f"{advantages.numel()} advantages: they must match")
    if len(prompts) % micro_batch_size:
        raise ValueError(f"{len(prompts)} rollouts do not fill micro-batches of "
                         f"{micro_batch_size}")
    out = []
    for k in range(0, len(prompts), micro_batch_size):
        rows = range(k, k + micro_batch_size)
        mb = _micro_batch([prompts[i] for i in rows], [completions[i] for i in rows],
                          advantages[k:k + micro_batch_size], cfg, pad_id, pad_to, exclude_ids)
        if policy_loss is not None:
            seqs = [mb["input_ids"][i, :len(prompts[r].input_ids) + len(completions[r].tokens)]
                    for i, r in enumerate(rows)]
            mb.update(policy_loss.rollout_fields(list(zip(seqs, [completions[r] for r in rows]))))
        out.append(mb)
    return out


def _micro_batch(prompts, comps, adv, cfg, pad_id, pad_to, exclude_ids) -> dict:
    b = len(prompts)
    longest = max(len(p.input_ids) + len(c.tokens) for p, c in zip(prompts, comps))
    if longest > pad_to:
        raise ValueError(f"a rollout of {longest} tokens does not fit the training length "
                         f"{pad_to}")
    ids = torch.full((b, pad_to), pad_id, dtype=torch.long)
    labels = torch.zeros(b, pad_to, dtype=torch.long)
    loss_mask = torch.zeros(b, pad_to)
    old = torch.zeros(b, pad_to)
    real = torch.zeros(b, pad_to, dtype=torch.bool)
    latent_mask = torch.zeros(b, pad_to, dtype=torch.bool)
    vectors, vector_logp, pixels, grids = [], [], [], []
    for i, (p, c) in enumerate(zip(prompts, comps)):
        n_p, n = len(p.input_ids), len(p.input_ids) + len(c.tokens)
        full = torch.tensor(list(p.input_ids) + list(c.tokens))
        ids[i, :n] = full
        labels[i, : n - 1] = full[1:]
        real[i, :n] = True
        latent, forced = set(c.latent_positions), set(c.forced_positions)
        for j, tok in enumerate(c.tokens):
            if j in latent:
                latent_mask[i, n_p + j] = True
            elif tok not in exclude_ids and j not in forced:
                loss_mask[i, n_p - 1 + j] = 1.0
        old[i, n_p - 1: n - 1] = torch.tensor(c.logprobs)
        vectors.append(c.latents)
        vector_logp.append(torch.tensor(c.latent_logprobs or [0.0] * len(c.latent_positions)))
        if p.pixel_values is not None:
            pixels.append(p.pixel_values)
            grids.append(p.image_grid_thw)
    grid = torch.cat(grids) if grids else None
    positions, _ = rope_index(ids, grid, image_token_id=cfg.image_token_id,
                              spatial_merge_size=cfg.spatial_merge_size, attention_mask=real)
    for i, (p, c) in enumerate(zip(prompts, comps)):  # the decode program's offsets, if any
        if c.position_offsets is not None:
            n_p = len(p.input_ids)
            positions[:, i, n_p:n_p + len(c.tokens)] += c.position_offsets.t().to(positions.dtype)
    return {"input_ids": ids, "labels": labels, "loss_mask": loss_mask, "position_ids": positions,
            "pixel_values": torch.cat(pixels) if pixels else None, "image_grid_thw": grid,
            "latent_mask": latent_mask, "latent_vectors": torch.cat(vectors),
            # the rollout's log-prob of each fed vector as a sampled action (a stochastic
            # latent policy's old log-prob; 0 for deterministic programs)
            "latent_old_logprobs": torch.cat(vector_logp).float(),
            # the rollout's log-probs: the ratio's old policy unless the loop's rollout
            # correction replaces `old_logprobs` (rl/losses.py old_policy)
            "old_logprobs": old, "rollout_logprobs": old, "advantages": adv.float()}
