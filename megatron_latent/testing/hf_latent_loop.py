"""The seeds' latent generation on HF transformers (LVR's `QwenWithLVR` "steps" loop): cached
HF decoding where rows in latent mode get their last post-norm hidden state as the next input
embedding. Used as the baseline in benchmarks/bench_generate.py and as an oracle in tests.

Batched prompts are left-padded. Independent of our generator on purpose (it is a test oracle):
positions come from HF's own `get_rope_index` and its rope deltas, and the latent "steps" rule
is the seed's counter, not our `LatentRule`; only the rule's ids and quota are read.
"""

from __future__ import annotations

import torch

from megatron_latent.latent.decoding import LatentRule


@torch.no_grad()
def hf_latent_generate(hf, prompts, rule: LatentRule | None, max_new_tokens: int,
                       pad_id: int = 0) -> list[list[int]]:
    """Greedy; returns the appended ids per prompt (latent positions hold rule.latent_id).
    Runs exactly max_new_tokens steps (no stop tokens: a benchmark wants fixed work).
    `rule`: None (no latents) or a "steps" rule (start id, latent id, quota)."""
    if rule is not None and rule.mode != "steps":
        raise ValueError(f"the seed's HF loop implements latent mode 'steps' only, not {rule.mode!r}")
    cfg = hf.config
    dev = next(hf.parameters()).device
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p.input_ids)) + list(p.input_ids)
                        for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p.input_ids)) + [1] * len(p.input_ids)
                         for p in prompts], device=dev)
    grids = [p.image_grid_thw for p in prompts if p.image_grid_thw is not None]
    grid = torch.cat(grids).to(dev) if grids else None
    pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
    pixels = torch.cat(pixels).to(dev, hf.dtype) if pixels else None
    mm_types = (ids == cfg.image_token_id).long()
    positions, deltas = hf.model.get_rope_index(ids, image_grid_thw=grid, attention_mask=mask,
                                                mm_token_type_ids=mm_types)
    next_pos = mask.sum(1) + deltas.view(-1).to(dev)  # HF: real tokens so far + rope delta
    out = hf.model(input_ids=ids, attention_mask=mask, position_ids=positions.to(dev),
                   pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm_types,
                   use_cache=True)
    past, h = out.past_key_values, out.last_hidden_state[:, -1]
    suppress = torch.tensor([cfg.image_token_id, cfg.video_token_id], device=dev)
    # the seed's "steps" counter: entering on the step after <start> was consumed
    remaining = torch.zeros(len(prompts), dtype=torch.long, device=dev)
    consumed, appended_all = ids[:, -1], []
    embed = hf.model.get_input_embeddings()
    for j in range(max_new_tokens):
        logits = hf.lm_head(h).float().index_fill(-1, suppress, float("-inf"))
        tok = logits.argmax(-1)
        feed = torch.zeros_like(tok, dtype=torch.bool)
        if rule is not None:
            enter = (remaining == 0) & (consumed == rule.start_id)
            remaining = torch.where(enter, torch.full_like(remaining, rule.steps), remaining)
            feed = remaining > 0
            remaining = remaining - feed.long()
        appended = torch.where(feed, torch.full_like(tok, rule.latent_id if rule else 0), tok)
        appended_all.append(appended)
        if j == max_new_tokens - 1:
            break
        emb = torch.where(feed.view(-1, 1, 1), h.unsqueeze(1), embed(appended.unsqueeze(1)))
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = (next_pos + j).view(1, -1, 1).expand(3, -1, 1)
        out = hf.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                       past_key_values=past, use_cache=True)
        past, h, consumed = out.past_key_values, out.last_hidden_state[:, -1], appended
    return torch.stack(appended_all, 1).tolist()
