"""HyLaR stage 2: DePO (decoupled hybrid PPO) as HyLaR's RL terms (spec 1.8-1.10).

Text: dual-clip PPO over sampled tokens (eps 0.2 / 0.28, c = 3) + beta * k3 KL to the reference
(text tokens only). Latent: for every fed vector z_{t+1} (a latent action), a log-prob g_t under
the policy whose mean is the hidden state h_t that produced it (the *aligned* pairing; HyLaR's
code scores z_p with h_p, the output at the slot it was fed into: spec 1.9 #1), its own dual
clip (+-0.1) and weight alpha, a mean over the global number of latent actions.

Two latent policies (`latent_logprob`):
- "dot" (default): HyLaR's g = kappa * <h_t, z_{t+1}> with noise-free rollouts (z = h). It is
  not a normalised density; its gradient kappa * A * z moves h along z (mostly its norm), the
  signal HyLaR's published results were trained with, so a reproduction gets it by default.
- "gaussian": z = h + sigma * eps at rollout (sigma = rho * RMS(h), a constant of the state),
  g = log N(z; h, sigma^2 I). A genuine stochastic policy: a symmetric density around a
  noise-free z = h has zero gradient there (spec 1.9 #5), a sampled z does not.
The old latent log-prob is the same forward's value, detached (one PPO epoch: exactly on-policy,
whatever the decode kernels rounded), or the recomputed pass the loop runs before several epochs;
never the decode-time value (kappa * <h, z> amplifies kernel differences by |z|^2). The rollout's
value is only compared ("latent rollout gap").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_latent.latent.base import whole_sequence
from megatron_latent.latent.decoding import LatentRule
from megatron_latent.rl.losses import (PolicyLoss, dual_clip_surrogate, low_var_kl,
                                       mismatch_logs, old_policy)

LATENT_LOGPROBS = ("dot", "gaussian")
# HyLaR's hyper-parameters of this stage (recorded with the method's)
HPARAMS = ("depo_latent_logprob", "depo_kappa", "depo_latent_weight", "depo_latent_clip",
           "depo_dual_clip", "depo_rho", "depo_vmf_coef")


def add_args(parser) -> None:
    a = parser.add_argument
    a("--depo-latent-logprob", choices=LATENT_LOGPROBS, default=None,
      help="HyLaR RL: the latent policy: dot (HyLaR's kappa*<h,z>, default) or gaussian "
           "(z = h + sigma*eps at rollout)")
    a("--depo-kappa", type=float, default=None, help="HyLaR RL: kappa of the dot log-prob (0.01)")
    a("--depo-latent-weight", type=float, default=None,
      help="HyLaR RL: weight alpha of the latent term (0.5)")
    a("--depo-latent-clip", type=float, default=None,
      help="HyLaR RL: the latent term's clip range (0.1)")
    a("--depo-dual-clip", type=float, default=None, help="HyLaR RL: dual-clip bound c (3.0)")
    a("--depo-rho", type=float, default=None,
      help="HyLaR RL: gaussian sigma as a share of RMS(h) (0.05)")
    a("--depo-vmf-coef", type=float, default=None,
      help="HyLaR RL: weight of HyLaR's 'vMF KL' drift term (0: off; its script: 0.01)")


def hparams_from_args(args) -> dict:
    return {k: getattr(args, k) for k in HPARAMS if getattr(args, k, None) is not None}


def rewards(tokens) -> dict:
    """HyLaR's rewards (spec 1.8): `format` = think / span / think ... answer with at least one
    span; `accuracy` = -1 on heavy repetition. `tokens` = (latent, start, end)."""
    from megatron_latent.eval.formats import make_span_renderer, make_think_span_format_reward
    from megatron_latent.rl.rewards import make_accuracy_reward

    latent, start, end = tokens
    # HyLaR scores repetition on the text with each span rendered as one placeholder
    return {"format": make_think_span_format_reward(start, end, latent),
            "accuracy": make_accuracy_reward(repetition_limit=0.5,
                                             preprocess=make_span_renderer(start, end, latent))}


@dataclass
class DotPolicy:
    kappa: float = 0.01

    def sample(self, hidden, generator=None):
        return hidden, self.logprob(hidden, hidden)

    def logprob(self, z, mu):
        return self.kappa * (mu.float() * z.float()).sum(-1)


@dataclass
class GaussianPolicy:
    rho: float = 0.05

    def sigma(self, mu):
        return self.rho * mu.detach().float().pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)

    def sample(self, hidden, generator=None):
        eps = torch.randn(hidden.shape, generator=generator, device=hidden.device)
        z = (hidden.float() + self.sigma(hidden) * eps).to(hidden.dtype)
        return z, self.logprob(z, hidden)

    def logprob(self, z, mu):
        sigma = self.sigma(mu)
        d = mu.shape[-1]
        sq = ((z.float() - mu.float()) / sigma).pow(2).sum(-1)
        return -0.5 * sq - d * sigma.squeeze(-1).log() - 0.5 * d * math.log(2 * math.pi)


def latent_policy(kind: str, kappa: float, rho: float):
    if kind not in LATENT_LOGPROBS:
        raise ValueError(f"latent log-prob {kind!r}: expected one of {LATENT_LOGPROBS}")
    return DotPolicy(kappa) if kind == "dot" else GaussianPolicy(rho)


@dataclass
class PolicyFeed(LatentRule):
    """The method's decode program with the latent action drawn from `policy` (and its
    log-prob recorded for the rollout)."""

    policy: DotPolicy | GaussianPolicy | None = None

    def feed_vectors(self, state, hidden, feed, generator=None):
        return self.policy.sample(hidden, generator)


def predictor_rows(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat [b*s] indices of the predictor positions t of each latent z_{t+1}, b-major like the
    recorded latents; their batch rows). Host counts, when the step has them, avoid a sync."""
    lat = batch["latent_mask"]
    if bool(lat[:, 0].any()):
        raise ValueError("a latent position starts a sample: no hidden state produced it")
    mask = torch.nn.functional.pad(lat[:, 1:], (0, 1), value=False).flatten()
    n = (batch.get("counts") or {}).get("latent")
    where = (mask.nonzero().squeeze(1) if n is None
             else torch.nonzero_static(mask, size=int(n)).squeeze(1))
    return where, where // lat.shape[1]


@dataclass
class DePOLoss(PolicyLoss):
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.05  # text-token KL (k3, verl's clamps)
    dual_clip: float = 3.0
    latent_weight: float = 0.5  # alpha
    latent_clip: float = 0.1
    latent_logprob: str = "dot"
    kappa: float = 0.01
    rho: float = 0.05
    vmf_coef: float = 0.0  # HyLaR's "vMF KL" kappa * (1 - <h, z>); "dot" only
    has_latent_policy = True

    def __post_init__(self):
        self.policy = latent_policy(self.latent_logprob, self.kappa, self.rho)
        if self.vmf_coef and self.latent_logprob != "dot":
            raise ValueError("the vMF drift term belongs to the 'dot' latent log-prob")

    def token_terms(self, logp, batch):
        adv = batch["advantages"].to(logp.dtype).unsqueeze(1)
        old, weight = old_policy(logp, batch)
        pg, clipped = dual_clip_surrogate(logp, old, adv, self.eps_low, self.eps_high,
                                          self.dual_clip)
        logs = {"pg loss": pg, "clip fraction": clipped,
                "ratio": (logp - old).clamp(-10, 10).exp(),
                **mismatch_logs(logp, batch, self.eps_low, self.eps_high)}
        if weight is not None:
            pg = pg * weight
            logs["tis weight"] = weight
        if not self.beta:
            return pg, logs
        kl = low_var_kl(logp, batch["ref_logprobs"])
        logs["kl"] = kl
        return pg + self.beta * kl, logs

    def count(self, batch):
        return {"latent": float(batch["latent_mask"].sum())}

    def latent_logprobs(self, model, hidden, batch):
        return self._latent(model, hidden, batch)[0]

    def _latent(self, model, hidden, batch):
        return self.score_latents(whole_sequence(model, hidden), batch)

    def score_latents(self, hidden, batch):
        """(g_t of every latent action [n] fp32, b-major; its mean h_t; its action z_{t+1});
        `hidden` [s, b, h] final-norm, whole (not sequence-parallel split)."""
        where, _ = predictor_rows(batch)
        s, b = hidden.shape[:2]
        mu = hidden.flatten(0, 1)[(where % s) * b + where // s]  # [s, b] rows -> b-major
        z = batch["latent_vectors"].to(mu.device)
        if z.shape[0] != mu.shape[0]:
            raise ValueError(f"{mu.shape[0]} latent positions but {z.shape[0]} recorded latents")
        return self.policy.logprob(z, mu), mu, z

    def latent_terms(self, model, hidden, batch):
        g, mu, z = self._latent(model, hidden, batch)
        _, rows = predictor_rows(batch)
        old = batch.get("latent_recomputed_logprobs")
        old = g.detach() if old is None else old.to(g.device)
        adv = batch["advantages"].to(g.device)[rows]
        pg, clipped = dual_clip_surrogate(g, old, adv, self.latent_clip, self.latent_clip,
                                          self.dual_clip)
        totals = batch["step_totals"]
        # megatron divides the step's sum by the global text-token count: rescale so this term
        # is a mean over the global number of latent actions
        scale = totals["ce"] / totals["latent"].clamp(min=1.0)
        loss = self.latent_weight * pg.sum() * scale
        n = torch.full((), float(g.shape[0]), device=g.device)
        logs = {"latent pg": (pg.detach().sum(), n), "latent clip fraction": (clipped.sum(), n),
                "latent logp": (g.detach().sum(), n),
                "latent rollout gap": ((g.detach() - batch["latent_old_logprobs"].to(g.device))
                                       .abs().sum(), n)}
        if self.vmf_coef:
            vmf = self.kappa * (1 - (mu.float() * z.float()).sum(-1))
            loss = loss + self.vmf_coef * vmf.sum() * scale
            logs["latent vmf"] = (vmf.detach().sum(), n)
        return loss, logs
