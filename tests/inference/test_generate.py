"""Cached latent generation against independent oracles: a full uncached recompute with the
recorded latents injected (TP=1, TP=2, PP=2), transformers' `generate` with latents off, and a
hand-worked trace of the LVR "steps" rule."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.conversion.hf_load import load_hf_weights
from megatron_latent.inference.generator import Generator, Prompt
from megatron_latent.inference.sampling import SamplingParams
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel
from megatron_latent.testing.generation import (demo_prompts, generate_run, lvr_processor,
                                                lvr_rule, recompute_logits)


@pytest.fixture(scope="module")
def setup(tiny_ckpts, megatron_single_rank):
    path = tiny_ckpts["tiny-a"]
    cfg = Qwen25VLConfig.from_hf(path)
    model = Qwen25VLModel(cfg)
    load_hf_weights(model, path)
    model.eval()
    proc, ids = lvr_processor(path)
    return path, cfg, model, proc, ids


def _suppressed_argmax(logits, cfg):
    return logits.index_fill(-1, torch.tensor([cfg.image_token_id, cfg.video_token_id]),
                             float("-inf")).argmax(-1)


def test_cached_equals_recompute(setup):
    path, cfg, model, proc, ids = setup
    prompts = demo_prompts(proc)
    gen = Generator(model, rule=lvr_rule(ids, steps=3), pad_id=proc.tokenizer.pad_token_id)
    out = gen.generate(prompts, SamplingParams(max_new_tokens=10), record_logits=True)
    assert out[0].latent_positions == [0, 1, 2]  # the prompt ends with <|lvr_start|>
    for prompt, c in zip(prompts, out):
        ref = recompute_logits(model, prompt, c)
        assert (ref - c.logits).abs().max() <= 1e-4
        text = [j for j in range(len(c.tokens)) if j not in c.latent_positions]
        assert [c.tokens[j] for j in text] == _suppressed_argmax(ref, cfg)[text].tolist()
        assert all(c.tokens[j] == ids["<|lvr|>"] for j in c.latent_positions)
        logp = torch.log_softmax(ref, -1)[torch.arange(len(c.tokens)), c.tokens]
        assert torch.allclose(torch.tensor(c.logprobs)[text], logp[text], atol=1e-5)


def test_sampled_logprobs_equal_recompute(setup):
    path, cfg, model, proc, ids = setup
    prompts = demo_prompts(proc)
    gen = Generator(model, rule=lvr_rule(ids, steps=2), pad_id=proc.tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_k=50, top_p=0.9, seed=3)
    out = gen.generate(prompts, params)
    again = gen.generate(prompts, params)
    assert [c.tokens for c in out] == [c.tokens for c in again]  # seeded
    for prompt, c in zip(prompts, out):
        ref = torch.log_softmax(recompute_logits(model, prompt, c) / 0.7, -1)
        lp = ref[torch.arange(len(c.tokens)), c.tokens]
        text = [j for j in range(len(c.tokens)) if j not in c.latent_positions]
        assert torch.allclose(torch.tensor(c.logprobs)[text], lp[text], atol=1e-5)


def test_latents_off_equals_hf_generate(setup):
    from transformers import Qwen2_5_VLForConditionalGeneration

    path, cfg, model, proc, ids = setup
    prompts = demo_prompts(proc, latent_first=False)
    stop = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen = Generator(model, rule=None, pad_id=proc.tokenizer.pad_token_id)
    ours = gen.generate(prompts, SamplingParams(max_new_tokens=16, stop_ids=(stop,)))
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    width = max(len(p.input_ids) for p in prompts)
    pad = proc.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p.input_ids)) + p.input_ids for p in prompts])
    attn = torch.tensor([[0] * (width - len(p.input_ids)) + [1] * len(p.input_ids)
                         for p in prompts])
    seqs = hf.generate(input_ids=input_ids, attention_mask=attn,
                       mm_token_type_ids=(input_ids == cfg.image_token_id).long(),
                       pixel_values=torch.cat([p.pixel_values for p in prompts]),
                       image_grid_thw=torch.cat([p.image_grid_thw for p in prompts]),
                       do_sample=False, max_new_tokens=16, eos_token_id=stop, pad_token_id=pad,
                       suppress_tokens=[cfg.image_token_id, cfg.video_token_id])
    for row, c in zip(seqs[:, width:].tolist(), ours):
        assert row[: len(c.tokens)] == c.tokens
        assert all(t == pad for t in row[len(c.tokens):])


def _hidden(model, ids, prompt, latent=None):
    """Final-norm hidden states [s, h] of one uncached forward."""
    return model(torch.tensor([ids]), pixel_values=prompt.pixel_values,
                 image_grid_thw=prompt.image_grid_thw, latent=latent,
                 head=lambda hidden_states, **_: hidden_states)[:, 0]


@torch.no_grad()
def test_decode_trace_lvr_steps(setup):
    """Hand-worked (seed-methods.md 2.6): with the prompt ending in <|lvr_start|> at position s
    and K=2, the inputs at s+1, s+2 are h_s, h_{s+1}; the token at s+3 is the one sampled from
    the logits at s+2; the recorded latents are exactly h_s and h_{s+1}."""
    from megatron_latent.latent.base import InjectLatents

    path, cfg, model, proc, ids = setup
    prompt = demo_prompts(proc)[0]
    lvr = ids["<|lvr|>"]
    c = Generator(model, rule=lvr_rule(ids, steps=2)).generate(
        [prompt], SamplingParams(max_new_tokens=4))[0]
    assert c.latent_positions == [0, 1] and c.tokens[:2] == [lvr, lvr]
    s = len(prompt.input_ids) - 1
    h_s = _hidden(model, prompt.input_ids, prompt)[s]
    torch.testing.assert_close(c.latents[0], h_s, atol=1e-5, rtol=0)
    seq = prompt.input_ids + [lvr]
    mask = torch.zeros(1, len(seq), dtype=torch.bool)
    mask[0, s + 1] = True
    h_s1 = _hidden(model, seq, prompt, InjectLatents(mask, h_s[None]))[s + 1]
    torch.testing.assert_close(c.latents[1], h_s1, atol=1e-5, rtol=0)
    seq = seq + [lvr]
    mask = torch.zeros(1, len(seq), dtype=torch.bool)
    mask[0, s + 1: s + 3] = True
    logits = model(torch.tensor([seq]), pixel_values=prompt.pixel_values,
                   image_grid_thw=prompt.image_grid_thw,
                   latent=InjectLatents(mask, torch.stack([h_s, h_s1])))[0, s + 2]
    assert c.tokens[2] == int(_suppressed_argmax(logits, cfg))


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_generation_equals_tp1(setup, tmp_path, tp, pp):
    from megatron_latent.testing.distributed import run_distributed

    path, cfg, model, proc, ids = setup
    out = tmp_path / "gen.pt"
    run_distributed(generate_run, 2, path, str(out), tp, pp)
    got = torch.load(out, weights_only=False)
    prompts = demo_prompts(proc)
    gen = Generator(model, rule=lvr_rule(ids), pad_id=proc.tokenizer.pad_token_id)
    tp1 = gen.generate(prompts, SamplingParams(max_new_tokens=10))
    tp1_sampled = gen.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.0,
                                                       seed=7))
    for prompt, c, ref in zip(prompts, got["greedy"], tp1):
        assert c.tokens == ref.tokens and c.latent_positions == ref.latent_positions
        assert (recompute_logits(model, prompt, c) - c.logits).abs().max() <= 1e-4
        torch.testing.assert_close(c.latents, ref.latents, atol=1e-4, rtol=0)
    assert [c.tokens for c in got["sampled"]] == [c.tokens for c in tp1_sampled]


def test_bad_input(setup):
    path, cfg, model, proc, ids = setup
    prompts = demo_prompts(proc)
    gen = Generator(model, rule=lvr_rule(ids), max_context=64)
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens.*context length 64"):
        gen.generate(prompts, SamplingParams(max_new_tokens=8))
    gen = Generator(model)
    no_pixels = Prompt(prompts[0].input_ids, None, prompts[0].image_grid_thw)
    with pytest.raises(ValueError, match="prompt 0: .* image tokens .*pixel_values missing"):
        gen.generate([no_pixels], SamplingParams(max_new_tokens=2))
    wrong_grid = Prompt(prompts[1].input_ids, prompts[1].pixel_values,
                        prompts[0].image_grid_thw)
    with pytest.raises(ValueError, match="prompt 0: .* image tokens .* merged features"):
        gen.generate([wrong_grid], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="unknown latent mode 'bogus'"):
        lvr_rule(ids, mode="bogus")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match=r"stop ids \[-1, \d+\] are outside the vocabulary"):
        gen.generate(prompts, SamplingParams(max_new_tokens=2, stop_ids=(-1, cfg.vocab_size)))


def test_latent_generation_equals_seed_hf_loop(setup):
    """With latents on, greedy output equals the seeds' HF loop (hidden state fed back as the
    next inputs_embeds row) on the same weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_latent.testing.hf_latent_loop import hf_latent_generate

    path, cfg, model, proc, ids = setup
    prompts = demo_prompts(proc)
    rule = lvr_rule(ids, steps=3)
    pad = proc.tokenizer.pad_token_id
    ours = Generator(model, rule=rule, pad_id=pad).generate(prompts,
                                                            SamplingParams(max_new_tokens=10))
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    theirs = hf_latent_generate(hf, prompts, lvr_rule(ids, steps=3), 10, pad_id=pad)
    assert [c.tokens for c in ours] == theirs
    assert ours[0].latent_positions == [0, 1, 2]


def test_unpadded_prefill_equals_padded(setup):
    """A batch without padding takes the plain causal prefill; it must match the masked path
    (the same prompt generated next to a longer one, i.e. left-padded)."""
    path, cfg, model, proc, ids = setup
    prompts = demo_prompts(proc)
    gen = Generator(model, rule=lvr_rule(ids), pad_id=proc.tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=6)
    alone = gen.generate([prompts[1]], params, record_logits=True)[0]
    padded = gen.generate(prompts, params, record_logits=True)[1]
    assert alone.tokens == padded.tokens
    assert (alone.logits - padded.logits).abs().max() <= 1e-4
