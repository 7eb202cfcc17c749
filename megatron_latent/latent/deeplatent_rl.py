"""DeepLatent RL: continuous-space GRPO over the Gaussian modulation actions (spec 2.9, issue #22).

Actions of a rollout: the sampled tokens (text and `<latent>`; the forced placeholders, grid
slots and `</latent>` are not actions) and, per latent block, two continuous actions: the
modulated queries a_q = (1 + gamma_q) Q + beta_q + sigma_q eps_q and the modulated image
features a_f = (1 + gamma_f) F + beta_f + sigma_f eps_f. The block's latents are a
deterministic map of (a_q, a_f) through the frozen LatentFormer, so they are no action: the
training forward injects the recorded grid (rl/objective.py) and never re-runs the LatentFormer.

Each continuous action gets the text tokens' clipped surrogate with its sample's advantage and
beta times the closed-form KL to the stage-2 reference. The current (gamma, beta) come from the
training forward's final-norm states at the block's qmod / imod positions through MLP_l / MLP_i
(trainable; PP = 1: the MLPs live on the first stage, the loss on the last). log pi needs neither
the base X nor the noise eps: the rollout records per block and modulation the sufficient
statistics (S1, S2, XE, E1, N: spec 2.9, deeplatent_modules.GaussianStats) and the (gamma,
beta) it sampled with, 6 d + 1 numbers instead of an [N, d] noise tensor.

Batch fields (n = the micro-batch's blocks, row-major; index 0 = q, 1 = f; d = hidden size):
  blocks            [n, 4] long   (row, position of `<latent>`, H, W); qmod / imod at +2 / +3
  block_modulation  [n, 2, 2, d]  the rollout's (gamma, beta) of each modulation
  block_stats       [n, 2, 4, d]  (S1, S2, XE, E1) per channel, fp32
  block_n           [n, 2]        N: rows of the base (H*W for q, n_F for f)
  block_sigma       [n, 2]        the fixed sigma the action was sampled with
  ref_modulation    [n, 2, 2, d]  the reference's (gamma, beta) on its own forward (beta > 0)
  ref_sigma         [n, 2]        optional: the reference's sigma (default block_sigma)
  latent_recomputed_logprobs [n, 2]  optional: `latent_logprobs` before several PPO epochs
`block_fields` builds the first four from the rollout's `LatentBlockRecord`s.
An action with N = 0 (no question image) or sigma = 0 (noise off) is not an action: no term,
not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_latent.latent.base import whole_sequence
from megatron_latent.latent.deeplatent_modules import _wide
from megatron_latent.rl.losses import GRPOLoss, clipped_surrogate

REDUCTIONS = ("sum", "mean_per_dim")
OLD_POLICIES = ("forward", "rollout")
# spec 2.9: frozen in RL (the vision tower is frozen by the loop's default); trained: the LLM
# and MLP_l / MLP_i. For DeepLatent.for_rl().frozen_patterns().
RL_FROZEN_PATTERNS = ("*latent_modules.grid.*", "*latent_modules.latentformer.*",
                      "*latent_modules.scale_head.*")
# verl clamps the log-ratio before exp the same way: a summed Gaussian log-ratio over ~1e6 dims
# can overflow exp, and exp(inf) * 0 in the backward of an unselected min branch is NaN
LOG_RATIO_CLAMP = 20.0


# ---- the formulas (spec 2.9 eqs. 9, 14, 16 via the sufficient statistics) ---------------------
def stats_log_ratio(mod: torch.Tensor, anchor: torch.Tensor, stats: torch.Tensor,
                    n: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log pi_mod(a) - log pi_anchor(a), summed over the N x d dims of a = mu_anchor + sigma eps.
    mod, anchor [..., 2, d] (gamma, beta); stats [..., 4, d]; n, sigma [...] -> [...].
    The same quadratic as deeplatent_modules.gaussian_log_ratio_from_stats, with sigma per
    action (that helper takes one float)."""
    dg = anchor[..., 0, :].double() - mod[..., 0, :].double()
    db = anchor[..., 1, :].double() - mod[..., 1, :].double()
    s1, s2, xe, e1 = stats.double().unbind(-2)
    sig = sigma.double().unsqueeze(-1)
    quad = (dg * dg * s2 + 2 * dg * db * s1 + n.double().unsqueeze(-1) * db * db
            + 2 * sig * (dg * xe + db * e1)).sum(-1)
    return -quad / (2 * sigma.double() ** 2)


def stats_kl(mod: torch.Tensor, ref: torch.Tensor, stats: torch.Tensor, n: torch.Tensor,
             sigma: torch.Tensor, sigma_ref: torch.Tensor) -> torch.Tensor:
    """KL(pi_mod || pi_ref) of diagonal Gaussians over the N x d dims (eq. 16): |mu - mu_ref|^2
    / (2 sigma_ref^2) from (S1, S2, N), plus N d [log(sigma_ref / sigma) + sigma^2 /
    (2 sigma_ref^2) - 1/2] (0 with one fixed sigma, the spec's case). -> [...]."""
    dg = mod[..., 0, :].double() - ref[..., 0, :].double()
    db = mod[..., 1, :].double() - ref[..., 1, :].double()
    s1, s2 = stats[..., 0, :].double(), stats[..., 1, :].double()
    nn = n.double()
    quad = (dg * dg * s2 + 2 * dg * db * s1 + nn.unsqueeze(-1) * db * db).sum(-1)
    sig, sig_r = sigma.double(), sigma_ref.double()
    dims = nn * mod.shape[-1]
    return (quad / (2 * sig_r ** 2)
            + dims * (torch.log(sig_r / sig) + sig ** 2 / (2 * sig_r ** 2) - 0.5))


def gaussian_kl(mu, sigma, mu_ref, sigma_ref) -> torch.Tensor:
    """The direct diagonal form of eq. 16, summed over all dims (sigmas broadcast):
    sum [log(sigma_ref / sigma) + (sigma^2 + (mu - mu_ref)^2) / (2 sigma_ref^2) - 1/2]."""
    mu, mu_ref = torch.as_tensor(mu).double(), torch.as_tensor(mu_ref).double()
    s = torch.as_tensor(sigma, dtype=torch.float64).expand_as(mu)
    sr = torch.as_tensor(sigma_ref, dtype=torch.float64).expand_as(mu)
    return (torch.log(sr / s) + (s * s + (mu - mu_ref) ** 2) / (2 * sr * sr) - 0.5).sum()


# ---- what the rollout records -------------------------------------------------------------------
def block_fields(records, dim: int = 0) -> dict:
    """The batch fields of one micro-batch's blocks (row-major order) from the rollout's
    records (latentformer.LatentBlockRecord: `.q`, `.f` deeplatent_modules.Modulation); `dim`:
    the hidden size (the fields' width when there are no records)."""
    mods, stats, ns, sigmas = [], [], [], []
    for rec in records:
        pair = (rec.q, rec.f)
        # fp32 at least (bf16 gammas of the MLPs), fp64 kept (the statistics' own precision)
        mods.append(torch.stack([torch.stack([_wide(m.gamma), _wide(m.beta)]) for m in pair]))
        stats.append(torch.stack([torch.stack([m.stats.s1, m.stats.s2, m.stats.xe, m.stats.e1])
                                  for m in pair]))
        ns.append([float(m.stats.n) for m in pair])
        # noise off (greedy eval rollouts): the action is deterministic, no density
        sigmas.append([m.sigma if m.noisy else 0.0 for m in pair])
    if not records:
        return {"block_modulation": torch.zeros(0, 2, 2, dim),
                "block_stats": torch.zeros(0, 2, 4, dim),
                "block_n": torch.zeros(0, 2), "block_sigma": torch.zeros(0, 2, dtype=torch.float64)}
    mods = torch.stack(mods)
    return {"block_modulation": mods, "block_stats": torch.stack(stats).to(mods.dtype),
            "block_n": torch.tensor(ns),  # exact in fp32 up to 2^24 rows
            "block_sigma": torch.tensor(sigmas, dtype=torch.float64)}  # the float sigma, exactly


def _valid(batch) -> torch.Tensor:
    return (batch["block_n"] > 0) & (batch["block_sigma"] > 0)


def modulation_params(model, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
    """The policy's (gamma, beta) of every block [n, 2, 2, d]: MLP_l / MLP_i on the final-norm
    states at qmod / imod (hidden [s, b, h]). With grad: the RL gradient reaches the LLM
    through h_l, h_i here (the path SFT's detached context pass does not train: spec 2.7).
    The reference pass calls it on the reference model (detached: `ref_modulation`)."""
    mods = getattr(model, "latent_modules", None)
    if mods is None or getattr(mods, "mlp_l", None) is None:
        raise RuntimeError("DeepLatent RL needs MLP_l / MLP_i on the stage that computes the loss "
                           "(pipeline-parallel size 1)")
    full = whole_sequence(model, hidden)
    blocks = batch["blocks"].to(full.device)
    rows, pos = blocks[:, 0], blocks[:, 1]
    gq, bq = mods.mlp_l(full[pos + 2, rows])
    gf, bf = mods.mlp_i(full[pos + 3, rows])
    return torch.stack([torch.stack([gq, bq], 1), torch.stack([gf, bf], 1)], 1)


@dataclass
class ContinuousGRPOLoss(GRPOLoss):
    """GRPO over tokens and the continuous modulation actions in one objective (spec 2.9 eq. 11).

    Normalisation: eq. 11's 1/|o_i| counts every action (tokens + 2 per block). With the
    project's global-count contract (megatron divides the step's sum by the global token count
    `ce`) this becomes one mean over every action of the global batch: both the token and the
    continuous sums are scaled by ce / (ce + cont_actions), so the step's loss is
    (sum of token terms + sum of continuous terms) / (all actions). That is the token-mean
    reading of eq. 11 (as the project's GRPO already is for text), not a per-sample mean.

    `reduction`: "sum" (paper: log pi and the KL summed over all N x d dims) or "mean_per_dim"
    (both divided by N x d: a per-dim log-ratio the clip does not bind on at once).
    `old_policy`: "forward" (default): the old log-prob is this forward's own value, detached
    (one PPO epoch is exactly on-policy; as DePO does, spec 1.9 #7): the summed log-ratio
    amplifies any rollout/training difference of gamma (bf16 kernels, cached decode) by up to
    ~1e6 dims and would clip every action. "rollout": the recorded (gamma, beta) are the old
    policy (the paper's literal ratio). Either way the rollout gap |log pi_theta - log
    pi_rollout| is logged; `latent_recomputed_logprobs`, when present, is the old policy."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.01
    reduction: str = "sum"
    old_policy: str = "forward"
    # the block layout in a rollout's tokens (`rollout_fields`): ids of `<latent>`, the scale
    # placeholder, a grid slot and `</latent>`; the hidden size
    block_ids: tuple[int, int, int, int] | None = None
    hidden_size: int = 0
    has_latent_policy = True
    reference_needs_modules = True

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction {self.reduction!r}: expected one of {REDUCTIONS}")
        if self.old_policy not in OLD_POLICIES:
            raise ValueError(f"old policy {self.old_policy!r}: expected one of {OLD_POLICIES}")

    # ---- counts and the all-actions scale
    def count(self, batch):
        """Continuous actions of this micro-batch, and a check that no forced token (the three
        placeholders, the grid slots, `</latent>`) carries a term: label index t is token t+1,
        so a block at p owns label indices p .. p + 3 + H*W."""
        blocks, mask = batch["blocks"], batch["loss_mask"]
        if blocks.shape[0]:
            hw = blocks[:, 2] * blocks[:, 3]
            if not torch.equal(batch["block_n"][:, 0].long(), hw):
                raise ValueError("block_n of the queries differs from the blocks' H*W")
            for (row, p, _, _), k in zip(blocks.tolist(), hw.tolist()):
                if bool(mask[row, p:p + 4 + k].any()):
                    raise ValueError(f"a forced token of the block at ({row}, {p}) is trained")
        return {"cont_actions": float(_valid(batch).sum())}

    @staticmethod
    def _scale(batch):
        t = batch["step_totals"]
        ce = t["ce"].clamp(min=1.0)  # what training.step divides by
        return ce / (t["ce"] + t["cont_actions"]).clamp(min=1.0)

    def token_terms(self, logp, batch):
        loss, logs = super().token_terms(logp, batch)  # clipped surrogate + beta * k3
        return loss * self._scale(batch), logs

    # ---- the continuous terms
    def _log_probs(self, mod, batch):
        """log pi_mod(a) - log pi_rollout(a) per action [n, 2] (the rollout's (gamma, beta) as
        the anchor: only differences of log pi enter the ratio), reduced; and the dims."""
        valid = _valid(batch).to(mod.device)
        sigma = torch.where(valid, batch["block_sigma"].to(mod.device), 1.0)  # no 0-division
        n = batch["block_n"].to(mod.device)
        lp = stats_log_ratio(mod, batch["block_modulation"].to(mod.device),
                             batch["block_stats"].to(mod.device), n, sigma)
        dims = (n * mod.shape[-1]).double().clamp(min=1.0)
        if self.reduction == "mean_per_dim":
            lp = lp / dims
        return torch.where(valid, lp, 0.0), valid, sigma, dims

    def latent_logprobs(self, model, hidden, batch):
        return self._log_probs(modulation_params(model, hidden, batch), batch)[0]

    def latent_rollout_gap(self, latent_logprobs, batch):
        """|log pi_theta - log pi_rollout| per dimension of the action, in units of sigma over
        the base's RMS: per dim the log-ratio is ~ eps x (mu_theta - mu_rollout) / sigma, so
        this reads as the relative difference of the action's mean (sigma = 0.1 x RMS(base)
        amplifies fp32 rounding of mu tenfold, and the summed log-ratio grows with N x d)."""
        stats = batch["block_stats"].to(latent_logprobs)
        dims = (batch["block_n"].to(latent_logprobs) * stats.shape[-1]).clamp(min=1.0)
        gap = latent_logprobs.abs()
        if self.reduction == "sum":
            gap = gap / dims
        rms = (stats[..., 1, :].sum(-1) / dims).sqrt().clamp(min=1e-12)  # S2: sum of X^2
        return gap * batch["block_sigma"].to(gap) / rms

    def reference_fields(self, model, hidden, batch):
        """What the reference pass records: `ref_modulation` [n, 2, 2, d]."""
        return {"ref_modulation": modulation_params(model, hidden, batch).detach()}

    def total(self, means):
        return means["policy loss"] + means.get("cont policy loss", 0.0)

    def rollout_fields(self, rows):
        """`blocks` and the `block_fields` of a rollout micro-batch: each completion's block
        records (`Completion.events`) matched in order to its `<latent>`s followed by the
        scale placeholder; a block cut by the length budget (grid or `</latent>` missing) is
        no action (its fed latents are still injected)."""
        if self.block_ids is None:
            raise ValueError("rollout_fields needs the block token ids (block_ids)")
        start, scale, pad, end = self.block_ids
        blocks, records = [], []
        for row, (seq, comp) in enumerate(rows):
            seq = seq.tolist()
            opens = [p for p in range(len(seq) - 1) if seq[p] == start and seq[p + 1] == scale]
            if len(comp.events) > len(opens):
                raise ValueError(f"row {row}: {len(comp.events)} block records but "
                                 f"{len(opens)} blocks in its tokens")
            for p, rec in zip(opens, comp.events):
                h, w = rec.grid
                slots, close = seq[p + 4:p + 4 + h * w], p + 4 + h * w
                if slots != [pad] * (h * w) or close >= len(seq) or seq[close] != end:
                    continue
                blocks.append([row, p, h, w])
                records.append(rec)
        return {"blocks": torch.tensor(blocks, dtype=torch.long).view(-1, 4),
                **block_fields(records, self.hidden_size)}

    def latent_terms(self, model, hidden, batch):
        return self.continuous_terms(modulation_params(model, hidden, batch), batch)

    def continuous_terms(self, mod: torch.Tensor, batch: dict):
        """The loss from the current (gamma, beta) [n, 2, 2, d] (any graph: tests give leaves)."""
        lp, valid, sigma, dims = self._log_probs(mod, batch)
        old = batch.get("latent_recomputed_logprobs")
        if old is not None:
            old = old.to(lp)
        else:
            old = lp.detach() if self.old_policy == "forward" else torch.zeros_like(lp)
        adv = batch["advantages"].to(lp)[batch["blocks"][:, 0].to(lp.device)].unsqueeze(1)
        delta = lp - old
        pg, clipped, _ = clipped_surrogate(delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP),
                                           torch.zeros_like(delta), adv.expand_as(delta),
                                           self.eps_low, self.eps_high)
        term = pg
        fv = valid.to(lp.dtype)
        n = fv.sum()
        logs = {"cont pg loss": ((pg * fv).detach().sum(), n),
                "cont clip fraction": ((clipped * fv).sum(), n),
                "cont log ratio": ((delta * fv).detach().sum(), n),
                "cont rollout gap": ((lp.detach().abs() * fv).sum(), n),
                "cont actions per rollout": (n, float(batch["loss_mask"].shape[0]))}
        if self.beta:
            ref = batch["ref_modulation"].to(mod.device)
            sigma_ref = batch.get("ref_sigma")
            sigma_ref = sigma if sigma_ref is None else torch.where(valid, sigma_ref.to(lp), 1.0)
            kl = stats_kl(mod, ref, batch["block_stats"].to(mod.device),
                          batch["block_n"].to(mod.device), sigma, sigma_ref)
            if self.reduction == "mean_per_dim":
                kl = kl / dims
            term = term + self.beta * kl
            logs["cont kl"] = ((kl * fv).detach().sum(), n)
        loss = (term * fv).sum() * self._scale(batch)
        # so that means["policy loss"] + means["cont policy loss"] is the step's objective
        logs["cont policy loss"] = (loss.detach(), batch["loss_mask"].sum())
        return loss.float(), {k: (s.float(), c) for k, (s, c) in logs.items()}
