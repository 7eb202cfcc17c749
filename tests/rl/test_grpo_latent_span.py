"""GRPO on rollouts whose latent spans the policy opened itself (no answer prefix: the prompt
ends with the assistant header and the model samples <|lvr_start|>), so the training mask and the
latent injection decide what is trained:

- the rollout micro-batch's loss_mask leaves out every <|lvr_start|> and every latent position,
  and keeps every other completion token (seed-methods.md 2.7: the opener and the latent steps get
  no policy or KL term; the text does);
- the training forward reproduces the rollout's log-probs only with the recorded latents
  injected: other vectors at the latent positions change the log-probs of the tokens after the
  span, and nothing before it.

The tiny model is made to open spans by giving the output-layer row of <|lvr_start|> a logit of
20 (the other logits are about 3) on the hidden state that ends each prompt and about 0 on the
hidden states of the continuation after a span (its component orthogonal to those)."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.inference.generator import Generator
from megatron_latent.inference.prompts import build_prompt
from megatron_latent.inference.sampling import SamplingParams
from megatron_latent.latent.base import InjectLatents
from megatron_latent.latent.lvr import LVR
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.rl.losses import GRPOLoss
from megatron_latent.rl.objective import RLObjective, TokenScorer
from megatron_latent.rl.rollout import rollout_micro_batches
from megatron_latent.testing.generation import lvr_processor
from megatron_latent.testing.samples import photos
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer, unwrap
from megatron_latent.training.step import forward_outputs, train_step

STEPS, NEW, TEMP = 3, 12, 0.9
QUESTIONS = [("Where is the astronaut looking?", 0), ("Describe the cat.", 2)]


class HiddenStates(InjectLatents):
    """The final-norm hidden states [s, b, h] of a forward with latents injected."""

    def head(self, model, *, hidden_states, **_):
        return hidden_states


@torch.no_grad()
def open_spans_at_prompt_end(model, forced, generator, start_id):
    """Set the <|lvr_start|> output row w so that w.h = 20 on the hidden state that ends each
    prompt and w.h = 0 on the hidden states of its continuation after a span (`forced`: the
    prompts with the opener appended)."""
    comps = generator.generate(forced, SamplingParams(max_new_tokens=NEW))
    ends, after = [], []
    for p, c in zip(forced, comps):
        full = torch.tensor([p.input_ids + c.tokens])
        n_p = len(p.input_ids)
        mask = torch.zeros_like(full, dtype=torch.bool)
        mask[0, [n_p + j for j in c.latent_positions]] = True
        h = model(full, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
                  latent=HiddenStates(mask, c.latents))[:, 0].float()
        ends.append(h[n_p - 2])  # the header's last token: where the model should open a span
        after.append(h[n_p - 1:])
    q, _ = torch.linalg.qr(torch.cat(after).t())
    ends = torch.stack(ends)
    free = ends - (ends @ q) @ q.t()  # orthogonal to every continuation hidden state
    w = torch.linalg.lstsq(ends @ free.t(), torch.full((len(ends),), 20.0)).solution @ free
    model.language_model.output_layer.weight[start_id] = w


@pytest.fixture(scope="module")
def span_rollouts(tiny_ckpts, megatron_single_rank):
    path = tiny_ckpts["tiny-b"]  # untied: the start row of the output layer is not its embedding
    cfg = Qwen25VLConfig.from_hf(path)
    proc, ids = lvr_processor(path)
    method = LVR.create(ids, cfg)
    rule = method.decode_program("steps", STEPS)
    model = build_model(cfg, path)
    policy = unwrap(model[0])
    policy.eval()
    ph = photos()
    prompts = [build_prompt(proc, q, [ph[k]]) for q, k in QUESTIONS]
    forced = [build_prompt(proc, q, [ph[k]], answer_prefix="<|lvr_start|>") for q, k in QUESTIONS]
    gen = Generator(policy, rule=rule, pad_id=proc.tokenizer.pad_token_id)
    open_spans_at_prompt_end(policy, forced, gen, method.start_id)
    rollouts = [p for p in prompts for _ in range(2)]  # 2 groups of 2
    comps = gen.generate(rollouts, SamplingParams(max_new_tokens=NEW, temperature=TEMP, seed=3))
    gen.release()
    policy.train()
    mbs = rollout_micro_batches(rollouts, comps, torch.tensor([1.0, -1.0, 0.5, -0.5]), cfg=cfg,
                                pad_id=proc.tokenizer.pad_token_id, micro_batch_size=2,
                                pad_to=512, exclude_ids=method.rl_untrained_ids())
    return model, method, rollouts, comps, mbs


def test_the_model_opens_the_spans(span_rollouts):
    _, method, rollouts, comps, _ = span_rollouts
    for p, c in zip(rollouts, comps):
        assert p.input_ids[-1] != method.start_id  # nothing forced: the prompt ends the header
        assert c.tokens[0] == method.start_id, c.tokens
        starts = [j for j, t in enumerate(c.tokens) if t == method.start_id]
        want = [j + 1 + s for j in starts for s in range(STEPS) if j + 1 + s < len(c.tokens)]
        assert c.latent_positions == want, (c.tokens, c.latent_positions)
        assert [t for t in c.tokens if t == method.lvr_id] == [method.lvr_id] * len(want)
        assert len(c.tokens) > STEPS + 2  # text follows the first span


def test_loss_mask_leaves_out_the_opener_and_the_latent_steps(span_rollouts):
    _, method, rollouts, comps, mbs = span_rollouts
    for k, (p, c) in enumerate(zip(rollouts, comps)):
        mb, row = mbs[k // 2], k % 2
        n_p = len(p.input_ids)
        want = torch.zeros(mb["loss_mask"].shape[1])
        for j, tok in enumerate(c.tokens):  # position n_p - 1 + j predicts completion token j
            want[n_p - 1 + j] = float(tok not in (method.start_id, method.lvr_id))
        assert mb["loss_mask"][row].tolist() == want.tolist(), c.tokens
        assert 0 < want.sum() < len(c.tokens)
        latent = mb["latent_mask"][row].nonzero().flatten().tolist()
        assert latent == [n_p + j for j in c.latent_positions]


def test_training_logprobs_depend_on_the_recorded_latents(span_rollouts):
    model, _, rollouts, comps, mbs = span_rollouts
    scored = forward_outputs(model, mbs, TokenScorer(TEMP))
    moved = 0.0
    for k, (mb, logp) in enumerate(zip(mbs, scored)):
        m = mb["loss_mask"].bool()
        assert (logp[m] - mb["old_logprobs"][m]).abs().max() <= 1e-5
        other = dict(mb, latent_vectors=mb["latent_vectors"].roll(1, dims=0))  # wrong latents
        changed = forward_outputs(model, [other], TokenScorer(TEMP))[0]
        for row in range(2):
            p = rollouts[2 * k + row]
            first = len(p.input_ids) + comps[2 * k + row].latent_positions[0]
            before, after = slice(0, first), slice(first, None)
            assert (changed[row, before] - logp[row, before]).abs().max() <= 1e-6
            moved = max(moved, (changed[row, after][m[row, after]]
                                - logp[row, after][m[row, after]]).abs().max().item())
    print(f"\nlargest change of a trained log-prob after a span, other latents: {moved:.3f}")
    assert moved > 1e-2, moved
    for mb in mbs:
        mb["ref_logprobs"] = mb["old_logprobs"].clone()
    optimizer = build_optimizer(model, OptimSettings(lr=0.0))
    out = train_step(model, optimizer, mbs, RLObjective(GRPOLoss(), temperature=TEMP))
    assert out["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert out["kl"] == pytest.approx(0.0, abs=1e-6)
