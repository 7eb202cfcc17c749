"""Shared pieces of the generation tests: LVR prompts on real photos, the full-recompute oracle,
and the multi-process worker."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_latent import parallel
from megatron_latent.data.lvr_tokens import add_lvr_tokens
from megatron_latent.latent.base import InjectLatents
from megatron_latent.latent.decoding import LatentRule


def lvr_processor(hf_dir):
    """The checkpoint's processor with the LVR tokens added; (processor, ids by token)."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(hf_dir)
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

    return proc, add_lvr_tokens(proc.tokenizer, Qwen25VLConfig.from_hf(hf_dir).vocab_size)


def lvr_rule(ids: dict, mode: str = "steps", steps: int = 3, threshold: float = 0.5):
    return LatentRule(ids["<|lvr_start|>"], ids["<|lvr|>"], ids["<|lvr_end|>"], mode, steps,
                      threshold)


def demo_prompts(processor, latent_first: bool = True):
    """Two prompts of different lengths (left padding is exercised); the first starts its
    answer with <|lvr_start|> so it enters latent mode at once."""
    from megatron_latent.inference.prompts import build_prompt
    from megatron_latent.testing.samples import photos

    ph = photos()
    return [build_prompt(processor, "Where is the astronaut looking?", [ph[0]],
                         answer_prefix="<|lvr_start|>" if latent_first else ""),
            build_prompt(processor, "Describe the cat.", [ph[2]])]


def agree_until_near_tie(ref, other, tol: float) -> tuple[int, float]:
    """Two generations of one prompt whose numerics legitimately differ (bf16 kernels, TF32):
    they must agree up to the first step where `ref`'s top two logits are within 2 * tol (there
    either token is right and the runs may part). Asserts equal tokens before that step and
    logits within `tol` up to it; returns (steps compared, max logit difference)."""
    top2 = ref.logits.float().topk(2, dim=-1).values
    close = ((top2[:, 0] - top2[:, 1]) < 2 * tol).nonzero()
    n = int(close[0]) + 1 if len(close) else len(ref.tokens)
    diff = (other.logits[:n].float() - ref.logits[:n].float()).abs().max().item()
    assert other.tokens[:n - 1] == ref.tokens[:n - 1], (other.tokens, ref.tokens)
    assert diff <= tol, f"logits differ by {diff:.3e} in the first {n} steps"
    return n, diff


@torch.no_grad()
def recompute_logits(model, prompt, completion) -> torch.Tensor:
    """Oracle for cached decoding: one uncached forward over prompt + completion with the
    recorded latents injected; the logits that predicted each completion token [n, vocab]."""
    dev = next(model.parameters()).device
    full = torch.tensor([prompt.input_ids + completion.tokens], device=dev)
    p = len(prompt.input_ids)
    mask = torch.zeros_like(full, dtype=torch.bool)
    mask[0, [p + j for j in completion.latent_positions]] = True
    positions = None
    if completion.position_offsets is not None:  # the decode program's (e.g. image-like grids)
        from megatron_latent.models.qwen25vl.rope_index import rope_index

        cfg = model.cfg
        positions, _ = rope_index(full.cpu(), prompt.image_grid_thw,
                                  image_token_id=cfg.image_token_id,
                                  spatial_merge_size=cfg.spatial_merge_size)
        positions[:, 0, p:] += completion.position_offsets.t()
        positions = positions.to(dev)
    logits = model(full, position_ids=positions, pixel_values=None if prompt.pixel_values is None
                   else prompt.pixel_values.to(dev),
                   image_grid_thw=prompt.image_grid_thw, latent=InjectLatents(mask, completion.latents))
    return logits[0, p - 1: p - 1 + len(completion.tokens)].float().cpu()


def generate_run(hf_dir: str, out_path: str, tp: int, pp: int, max_new: int = 10,
                 spec: str = "local") -> None:
    """Greedy LVR generation at a TP/PP layout; the last stage's TP rank 0 saves the results."""
    from megatron_latent.conversion.hf_load import load_hf_weights
    from megatron_latent.inference.generator import Generator
    from megatron_latent.inference.sampling import SamplingParams
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
    from megatron_latent.models.qwen25vl.model import Qwen25VLModel

    parallel.initialize(parallel.ParallelConfig(tp, pp), seed=1)
    cfg = Qwen25VLConfig.from_hf(hf_dir, tensor_model_parallel_size=tp,
                                 pipeline_model_parallel_size=pp, spec=spec)
    dev = parallel.device()
    model = Qwen25VLModel(cfg).to(dev)
    load_hf_weights(model, hf_dir)
    model.eval()
    proc, ids = lvr_processor(hf_dir)
    gen = Generator(model, rule=lvr_rule(ids), pad_id=proc.tokenizer.pad_token_id)
    out = gen.generate(demo_prompts(proc), SamplingParams(max_new_tokens=max_new),
                       record_logits=ps.is_pipeline_last_stage())
    sampled = gen.generate(demo_prompts(proc), SamplingParams(max_new_tokens=max_new,
                                                              temperature=1.0, seed=7))
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        torch.save({"greedy": out, "sampled": sampled}, out_path)
    # every stage must hold the same records (RL trains from them on all stages)
    mine = torch.tensor([sum(c.tokens) + len(c.latent_positions) for c in out], device=dev)
    theirs = mine.clone()
    dist.broadcast(theirs, src=ps.get_pipeline_model_parallel_last_rank(),
                   group=ps.get_pipeline_model_parallel_group())
    assert torch.equal(mine, theirs), "pipeline stages disagree on the generated records"


class Replay(LatentRule):
    """One token per step: the forced ids and fed vectors of recorded completions, at their
    recorded offsets (the existing queue-style path); sampled text elsewhere."""

    uses_position_offsets = True

    def __init__(self, comps, latent, end, never_sample, hidden: int):
        super().__init__(latent, latent, end, "forced", steps=1)
        n = max(len(c.tokens) for c in comps)
        b = len(comps)
        self.tok = torch.zeros(b, n, dtype=torch.long)
        self.scripted = torch.zeros(b, n, dtype=torch.bool)
        self.feed = torch.zeros(b, n, dtype=torch.bool)
        self.vec = torch.zeros(b, n, hidden)
        self.off = torch.zeros(b, n, 3, dtype=torch.long)
        for i, c in enumerate(comps):
            m = len(c.tokens)
            self.tok[i, :m] = torch.tensor(c.tokens)
            self.scripted[i, c.forced_positions + c.latent_positions] = True
            self.feed[i, c.latent_positions] = True
            self.vec[i, c.latent_positions] = c.latents
            self.off[i, :m] = c.position_offsets
            self.off[i, m:] = c.position_offsets[-1]
        self.never_sample = never_sample

    def init_state(self, batch, device):
        return {"c": torch.zeros(batch, dtype=torch.long, device=device)}

    def _at(self, t, state, back=0):
        c = (state["c"] - back).clamp(0, t.shape[1] - 1)
        return t.to(c.device)[torch.arange(c.shape[0], device=c.device), c]

    def step(self, state, consumed, sampled, end_prob=None):
        appended = torch.where(self._at(self.scripted, state), self._at(self.tok, state), sampled)
        feed = self._at(self.feed, state)
        state["c"].add_(1)
        return appended, feed

    def feed_vectors(self, state, hidden, feed, generator=None):
        return (self._at(self.vec, state, 1).to(hidden.dtype),
                torch.zeros(hidden.shape[0], device=hidden.device))

    def position_offsets(self, state):
        return self._at(self.off, state, 1).t()
