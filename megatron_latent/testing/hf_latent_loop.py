"""The seeds' latent generation on HF transformers (LVR's `QwenWithLVR` "steps" loop): cached
HF decoding where rows in latent mode get their last post-norm hidden state as the next input
embedding. Used as the baseline in benchmarks/bench_generate.py and as an oracle in tests.

Batched prompts are left-padded; positions come from the same rope rule as the prompt's.
"""

from __future__ import annotations

import torch

from megatron_latent.latent.decoding import LatentRule
from megatron_latent.models.qwen25vl.rope_index import rope_index


@torch.no_grad()
def hf_latent_generate(hf, prompts, rule: LatentRule | None, max_new_tokens: int,
                       pad_id: int = 0) -> list[list[int]]:
    """Greedy; returns the appended ids per prompt (latent positions hold rule.latent_id).
    Runs exactly max_new_tokens steps (no stop tokens: a benchmark wants fixed work)."""
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
    merge = cfg.vision_config.spatial_merge_size
    positions, deltas = rope_index(ids, grid, image_token_id=cfg.image_token_id,
                                   spatial_merge_size=merge, attention_mask=mask)
    next_pos = mask.sum(1) + deltas[:, 0].to(dev)
    out = hf.model(input_ids=ids, attention_mask=mask, position_ids=positions.to(dev),
                   pixel_values=pixels, image_grid_thw=grid,
                   mm_token_type_ids=(ids == cfg.image_token_id).long(), use_cache=True)
    past, h = out.past_key_values, out.last_hidden_state[:, -1]
    suppress = torch.tensor([cfg.image_token_id, cfg.video_token_id], device=dev)
    state = rule.init_state(len(prompts), dev) if rule else None
    consumed, appended_all = ids[:, -1], []
    embed = hf.model.get_input_embeddings()
    for j in range(max_new_tokens):
        logits = hf.lm_head(h).float().index_fill(-1, suppress, float("-inf"))
        tok = logits.argmax(-1)
        if rule is None:
            appended, feed = tok, torch.zeros_like(tok, dtype=torch.bool)
        else:
            appended, feed = rule.step(state, consumed, tok)
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
