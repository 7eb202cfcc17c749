"""A decode program may feed vectors that are not the hidden state (one per step from a queue
its method fills at an event: k >= 1 vectors per event) at per-row mRoPE offsets. Cached
generation with such a program equals one uncached forward over the finished sequence with the
recorded vectors injected at the recorded positions, and RL's rollout micro-batch replays the
same positions (fp32, CPU, tiny checkpoint)."""

from __future__ import annotations

import torch

from megatron_latent.conversion.hf_load import load_hf_weights
from megatron_latent.inference.generator import Generator
from megatron_latent.inference.prompts import build_prompt
from megatron_latent.inference.sampling import SamplingParams
from megatron_latent.latent.base import InjectLatents
from megatron_latent.latent.decoding import LatentRule
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel
from megatron_latent.models.qwen25vl.rope_index import rope_index
from megatron_latent.rl.rollout import rollout_micro_batches
from megatron_latent.testing.generation import lvr_processor
from megatron_latent.testing.samples import photos


class GridFromTable(LatentRule):
    """At each event, the rows of `table` one by one (a stand-in for a method module's output),
    slot k at the image-like position (p, p + k // width, p + k % width) of the span's first
    slot p; the span ends after them (forced)."""

    uses_position_offsets = True

    def __init__(self, start, latent, end, table: torch.Tensor, width: int):
        super().__init__(start, latent, end, "forced", steps=table.shape[0])
        self.table, self.width = table, width

    def _slot(self, state):
        return (state["fed"] - 1).clamp(min=0)

    def feed_vectors(self, state, hidden, feed, generator=None):
        vec = self.table.to(hidden.device, hidden.dtype)[self._slot(state)]
        return vec, torch.zeros(hidden.shape[0], device=hidden.device)

    def position_offsets(self, state):
        k = self._slot(state)
        off = torch.stack([-k, k // self.width - k, k % self.width - k])
        return torch.where(state["active"], off, torch.zeros_like(off))


def test_queued_vectors_at_offsets_equal_recompute(tiny_ckpts, megatron_single_rank):
    path = tiny_ckpts["tiny-a"]
    proc, ids = lvr_processor(path)
    cfg = Qwen25VLConfig.from_hf(path)
    model = Qwen25VLModel(cfg)
    load_hf_weights(model, path)
    model.eval()
    torch.manual_seed(0)
    table = torch.randn(4, cfg.hidden_size)
    program = GridFromTable(ids["<|lvr_start|>"], ids["<|lvr|>"], ids["<|lvr_end|>"], table, 2)
    ph = photos()
    prompts = [build_prompt(proc, "Where is the astronaut looking?", [ph[0]],
                            answer_prefix="<|lvr_start|>"),
               build_prompt(proc, "Describe the cat.", [ph[2]])]  # never enters: it waits
    gen = Generator(model, rule=program, pad_id=proc.tokenizer.pad_token_id)
    out = gen.generate(prompts, SamplingParams(max_new_tokens=8), record_logits=True)
    first = out[0]
    n = len(first.latent_positions)
    assert first.latent_positions == list(range(n)) and n >= 1
    assert torch.equal(first.latents, table[:n])  # the queue, not the hidden states
    want = [[-k, k // 2 - k, k % 2 - k] for k in range(n)]
    assert first.position_offsets[:n].tolist() == want
    assert not first.position_offsets[n:].any() and not out[1].position_offsets.any()
    for c in out:  # greedy: a token the program appended instead of the argmax was forced
        forced = [j for j, t in enumerate(c.tokens)
                  if j not in c.latent_positions and t != int(c.logits[j].argmax())]
        assert c.forced_positions == forced
    assert first.forced_positions[:1] == [n]  # the span end after the queue (not the argmax)
    adv = torch.zeros(len(prompts))
    width = max(len(p.input_ids) + len(c.tokens) for p, c in zip(prompts, out))
    mb = rollout_micro_batches(prompts, out, adv, cfg=cfg, pad_id=proc.tokenizer.pad_token_id,
                               micro_batch_size=2, pad_to=width)[0]
    for i, (prompt, c) in enumerate(zip(prompts, out)):
        full = torch.tensor([prompt.input_ids + c.tokens])
        p = len(prompt.input_ids)
        pos, _ = rope_index(full, prompt.image_grid_thw, image_token_id=cfg.image_token_id,
                            spatial_merge_size=cfg.spatial_merge_size)
        pos[:, 0, p:] += c.position_offsets.t()
        assert torch.equal(mb["position_ids"][:, i, :full.shape[1]], pos[:, 0])  # RL replays it
        mask = torch.zeros_like(full, dtype=torch.bool)
        mask[0, [p + j for j in c.latent_positions]] = True
        with torch.no_grad():
            logits = model(full, position_ids=pos, pixel_values=prompt.pixel_values,
                           image_grid_thw=prompt.image_grid_thw,
                           latent=InjectLatents(mask, c.latents))
        ref = logits[0, p - 1: p - 1 + len(c.tokens)].float()
        assert (ref - c.logits.float()).abs().max().item() <= 1e-4
    # the offsets matter: without them the recompute of the first prompt's text differs
    full = torch.tensor([prompts[0].input_ids + first.tokens])
    plain = torch.zeros_like(full, dtype=torch.bool)
    plain[0, [len(prompts[0].input_ids) + j for j in first.latent_positions]] = True
    with torch.no_grad():
        no_off = model(full, pixel_values=prompts[0].pixel_values,
                       image_grid_thw=prompts[0].image_grid_thw,
                       latent=InjectLatents(plain, first.latents))
    p0 = len(prompts[0].input_ids)
    diff = (no_off[0, p0 - 1 + n:p0 - 1 + len(first.tokens)].float()
            - first.logits[n:].float()).abs().max().item()
    assert diff > 1e-3
