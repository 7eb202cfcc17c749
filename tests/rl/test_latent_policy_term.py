"""The RL seam carries a real latent term: a decode program with a stochastic latent policy
(the fed vector z = h + sigma * eps, a Gaussian around the hidden state) records each action's
log-prob in the rollout; a policy loss's latent term recomputes it in the training forward from
the same hidden state, with its own global count. At step 0 the two agree (fp32, <= 1e-5) and
the term's gradient reaches the LLM (non-zero, finite)."""

from __future__ import annotations

import torch

from megatron_latent.inference.generator import Generator
from megatron_latent.inference.sampling import SamplingParams
from megatron_latent.latent.decoding import LatentRule
from megatron_latent.latent.lvr import predictor_mask
from megatron_latent.rl.losses import GRPOLoss
from megatron_latent.rl.objective import RLObjective
from megatron_latent.rl.rollout import rollout_micro_batches
from megatron_latent.testing.generation import demo_prompts, lvr_processor
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer, unwrap
from megatron_latent.training.step import train_step
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

SIGMA = 0.1


def gaussian_logp(z, mu):
    return -(z.float() - mu.float()).pow(2).sum(-1) / (2 * SIGMA ** 2)


class GaussianFeed(LatentRule):
    def feed_vectors(self, state, hidden, feed, generator=None):
        eps = torch.randn(hidden.shape, generator=generator, device=hidden.device)
        z = hidden.float() + SIGMA * eps
        return z.to(hidden.dtype), gaussian_logp(z.to(hidden.dtype), hidden)


class GaussianLatentPG(GRPOLoss):
    """GRPO on tokens + a policy-gradient term per latent action: -A * ratio, mean over the
    global number of latent actions."""

    def count(self, batch):
        return {"latent": float(batch["latent_mask"].sum())}

    def latent_terms(self, model, hidden, batch):
        mask = predictor_mask(batch["latent_mask"])  # h_t produced z_{t+1}
        mu = hidden.transpose(0, 1)[mask]  # [n, h], b-major like the recorded latents
        logp = gaussian_logp(batch["latent_vectors"].to(mu.device), mu)
        log_ratio = logp - batch["latent_old_logprobs"].to(mu.device)
        rows = mask.nonzero()[:, 0]
        adv = batch["advantages"].to(mu.device)[rows]
        scale = batch["step_totals"]["ce"] / batch["step_totals"]["latent"].clamp(min=1.0)
        n = torch.tensor(float(mask.sum()))
        pg = -adv * log_ratio.exp()
        return pg.sum() * scale, {"latent pg": (pg.detach().sum(), n),
                                  "latent log-ratio": (log_ratio.detach().abs().sum(), n)}


def test_gaussian_latent_term_step0(tiny_ckpts, megatron_single_rank):
    path = tiny_ckpts["tiny-a"]
    cfg = Qwen25VLConfig.from_hf(path)
    proc, ids = lvr_processor(path)
    model = build_model(cfg, path)
    optimizer = build_optimizer(model, OptimSettings(lr=1e-4))
    rule = GaussianFeed(ids["<|lvr_start|>"], ids["<|lvr|>"], ids["<|lvr_end|>"], "steps", 3)
    prompts = [p for p in demo_prompts(proc) for _ in range(2)]
    policy = unwrap(model[0]).eval()
    comps = Generator(policy, rule=rule, pad_id=proc.tokenizer.pad_token_id).generate(
        prompts, SamplingParams(max_new_tokens=6, temperature=1.0, seed=3))
    policy.train()
    assert comps[0].latent_positions == comps[1].latent_positions == [0, 1, 2]
    assert all(lp < 0 for lp in comps[0].latent_logprobs)  # recorded, not the placeholder 0
    assert comps[0].latents.ne(comps[1].latents).any()  # the two samples drew different z
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mbs = rollout_micro_batches(prompts, comps, adv, cfg=cfg, pad_id=proc.tokenizer.pad_token_id,
                                micro_batch_size=2, pad_to=256, exclude_ids=(rule.start_id,))
    before = [p.detach().clone() for p in policy.language_model.parameters()]
    out = train_step(model, optimizer, mbs, RLObjective(GaussianLatentPG(beta=0.0), 1.0))
    # the training forward's log-prob equals the rollout's: to fp32's relative precision of the
    # log-prob itself (it is -||eps||^2 / 2 ~ -hidden/2; a hidden-state difference d between
    # the cached and the full forward moves it by ~||eps|| d / sigma)
    scale = sum(abs(v) for c in comps for v in c.latent_logprobs) / sum(
        len(c.latent_logprobs) for c in comps)
    assert out["latent log-ratio"] <= 1e-6 * scale
    assert out["latent pg"] != 0.0
    assert torch.isfinite(torch.tensor(out["grad_norm"])) and out["grad_norm"] > 0
    moved = sum(not torch.equal(a, p) for a, p in zip(before, policy.language_model.parameters()))
    assert moved > 0
