"""DeepLatent RL (latent/deeplatent_rl.py, spec 2.9): the continuous-space GRPO terms on the
hand-worked numbers of spec section 4 (oracles 8, 9, 10), each through the loss's own code path
(rollout record -> batch fields -> MLP at qmod/imod -> log-ratio / KL / surrogate), plus the
clip, the reduction option, the all-actions global mean and an fp64 gradient check against the
direct Gaussian formulas on the reconstructed actions. CPU, no model: a stub whose "MLPs" split
the hidden state into (gamma, beta)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from megatron_latent.latent.deeplatent_modules import (gaussian_kl_from_stats,
                                                       gaussian_log_prob,
                                                       gaussian_log_ratio_from_stats, modulate)
from megatron_latent.latent.deeplatent_rl import (ContinuousGRPOLoss, block_fields, gaussian_kl,
                                                  stats_kl)
from megatron_latent.latent.latentformer import LatentBlockRecord
from megatron_latent.rl.objective import RLStep


class _Split(nn.Module):  # stands for MLP_l / MLP_i: h = [gamma | beta]
    def forward(self, h):
        return h.chunk(2, dim=-1)


_MODEL = SimpleNamespace(config=SimpleNamespace(sequence_parallel=False),
                         latent_modules=SimpleNamespace(mlp_l=_Split(), mlp_i=_Split()))


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _mod(x, gamma, beta, sigma, eps):
    """A rollout's modulation record (noise on, the given eps)."""
    x = _t(x).reshape(-1, len(gamma))
    return modulate(x, _t(gamma), _t(beta), sigma, noise=True, eps=_t(eps).reshape(x.shape),
                    keep_action=True)[1]


def _none(d, sigma=0.5):  # a block without question features: N = 0, no action
    return _mod([], [0.0] * d, [0.0] * d, sigma, [])


def _batch(blocks, records, theta, adv, trained, b=None, s=16, ref=None):
    """Micro-batch with `blocks` [(row, p, H, W)], their rollout records, the current
    (gamma_q, beta_q, gamma_f, beta_f) per block written into the final-norm hidden states at
    qmod (p + 2) / imod (p + 3), and trained label indices `trained` [(row, t)]."""
    b = b or len(adv)
    d = records[0].q.gamma.shape[-1]
    hidden = torch.zeros(s, b, 2 * d, dtype=torch.float64)
    for (row, p, _, _), (gq, bq, gf, bf) in zip(blocks, theta):
        hidden[p + 2, row] = torch.cat([_t(gq), _t(bq)])
        hidden[p + 3, row] = torch.cat([_t(gf), _t(bf)])
    mask = torch.zeros(b, s)
    for row, t in trained:
        mask[row, t] = 1.0
    mb = {"blocks": torch.tensor(blocks, dtype=torch.long), "loss_mask": mask,
          "advantages": torch.tensor(adv), "old_logprobs": torch.zeros(b, s),
          **block_fields(records)}
    if ref is not None:
        mb["ref_modulation"] = _t(ref)
    return hidden.requires_grad_(), mb


def _totals(loss, mbs):
    """attach_step_totals' sums (one data-parallel rank)."""
    ce = sum(float(mb["loss_mask"].sum()) for mb in mbs)
    cont = sum(loss.count(mb)["cont_actions"] for mb in mbs)
    # fp64 here (fp32 in training.step) so the gradient check compares at fp64 precision
    totals = {"ce": _t(ce), "cont_actions": _t(cont)}
    for mb in mbs:
        mb["step_totals"] = totals
    return totals


def test_oracle8_gaussian_ratio():
    """sigma = 0.5, 2 dims: a = [1, 2], mu_theta = [0.5, 2], mu_old = [1, 2] -> log pi_theta =
    -0.951583, log pi_old = -0.451583, rho = e^-0.5 = 0.606531. As a modulation: one row X = 0
    (mu = beta), beta_old = [1, 2], eps = 0; the current beta = [0.5, 2] from the hidden state."""
    rec = LatentBlockRecord((1, 1), _mod([[0.0, 0.0]], [0, 0], [1, 2], 0.5, [0, 0]), _none(2))
    a = rec.q.action[0]
    assert a.tolist() == [1.0, 2.0]
    assert gaussian_log_prob(a, _t([0.5, 2.0]), 0.5).item() == pytest.approx(-0.951583, abs=1e-6)
    assert gaussian_log_prob(a, _t([1.0, 2.0]), 0.5).item() == pytest.approx(-0.451583, abs=1e-6)
    hidden, mb = _batch([(0, 1, 1, 1)], [rec], [([0, 0], [0.5, 2], [0, 0], [0, 0])], [1.0],
                        trained=[(0, 0), (0, 6)])
    loss = ContinuousGRPOLoss(beta=0.0, old_policy="rollout")
    totals = _totals(loss, [mb])
    assert totals["cont_actions"].item() == 1.0  # the feature modulation has N = 0: no action
    out, logs = loss.latent_terms(_MODEL, hidden, mb)
    assert logs["cont log ratio"][0].item() == pytest.approx(-0.5, abs=1e-6)
    assert logs["cont log ratio"][1].item() == 1.0
    # A = +1, rho = 0.6065 inside [0.8, 1.2]'s lower side: min(rho A, 0.8 A) = rho A (no clip)
    rho = math.exp(-0.5)
    assert rho == pytest.approx(0.606531, abs=1e-6)
    assert out.item() == pytest.approx(-rho * 2 / 3, abs=1e-6)  # scale ce / all actions = 2/3
    assert logs["cont clip fraction"][0].item() == 0.0
    out.backward()  # the gradient reaches the LLM's h at qmod only (f has no action)
    touched = hidden.grad.abs().sum(-1).nonzero().tolist()
    assert touched == [[3, 0]]


def test_oracle9_closed_form_kl():
    """Same sigma = 0.5, mu_theta - mu_ref = [0, 1] -> 2.0; sigma_theta = 0.5, sigma_ref = 1,
    diff [0, 1] -> (log 2 + 0.125 - 0.5) + (log 2 + 0.625 - 0.5) = 1.136294."""
    assert gaussian_kl(_t([1.0, 2.0]), 0.5, _t([1.0, 1.0]), 0.5).item() == pytest.approx(2.0)
    assert gaussian_kl(_t([1.0, 2.0]), 0.5, _t([1.0, 1.0]), 1.0).item() == pytest.approx(
        2 * math.log(2) + 0.125 + 0.625 - 1.0, abs=1e-6)
    assert 2 * math.log(2) + 0.125 + 0.625 - 1.0 == pytest.approx(1.136294, abs=1e-6)
    rec = LatentBlockRecord((1, 1), _mod([[0.0, 0.0]], [0, 0], [1, 2], 0.5, [0, 0]), _none(2))
    ref = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    ref[0, 0, 1] = _t([1.0, 1.0])  # beta_ref of q
    hidden, mb = _batch([(0, 1, 1, 1)], [rec], [([0, 0], [1, 2], [0, 0], [0, 0])], [0.0],
                        trained=[(0, 0)], ref=ref)
    loss = ContinuousGRPOLoss(beta=0.01, old_policy="rollout")
    _totals(loss, [mb])  # ce 1 + 1 action: scale 1/2
    out, logs = loss.latent_terms(_MODEL, hidden, mb)
    assert logs["cont kl"][0].item() == pytest.approx(2.0, abs=1e-6)
    assert out.item() == pytest.approx(0.01 * 2.0 / 2, abs=1e-7)  # A = 0: the KL alone
    mb["ref_sigma"] = torch.ones(1, 2)
    out, logs = loss.latent_terms(_MODEL, hidden, mb)
    assert logs["cont kl"][0].item() == pytest.approx(1.136294, abs=1e-6)
    # the shipped equal-sigma helper agrees with our stats form where they overlap
    st = rec.q.stats
    stats = torch.stack([st.s1, st.s2, st.xe, st.e1]).unsqueeze(0)
    mod, refm = _t([[[0.0, 0.0], [1.0, 2.0]]]), _t([[[0.0, 0.0], [1.0, 1.0]]])
    assert stats_kl(mod, refm, stats, _t([1.0]), _t([0.5]), _t([0.5])).item() == pytest.approx(
        gaussian_kl_from_stats(mod[0, 0], mod[0, 1], refm[0, 0], refm[0, 1], st, 0.5).item())


def test_oracle10_sufficient_statistics():
    """X = [1, 2] (N = 2, C = 1), multiplier 1 (gamma_old = 0 with the (1 + gamma) form), beta_old
    = 0, sigma = 0.5, eps = [0.2, -0.4] -> a = [1.1, 1.8]; gamma = 0.5, beta = 0.1 -> mu =
    [1.6, 3.1]; 0.25 + 1.69 - 0.05 = 1.89 = 1.25 + 0.3 + 0.02 + 0.32 -> log rho = -3.78."""
    q = _mod([[1.0], [2.0]], [0.0], [0.0], 0.5, [0.2, -0.4])
    assert q.action.flatten().tolist() == pytest.approx([1.1, 1.8])
    st = q.stats
    assert [st.s1.item(), st.s2.item(), st.xe.item(), st.e1.item(), st.n] == pytest.approx(
        [3.0, 5.0, -0.6, -0.2, 2])
    a, mu = q.action.flatten(), _t([1.6, 3.1])
    direct = gaussian_log_prob(a, mu, 0.5) - gaussian_log_prob(a, _t([1.0, 2.0]), 0.5)
    assert direct.item() == pytest.approx(-3.78, abs=1e-9)
    assert gaussian_log_ratio_from_stats(_t([0.5]), _t([0.1]), q.gamma, q.beta, st, 0.5).item() \
        == pytest.approx(-3.78, abs=1e-9)
    rec = LatentBlockRecord((2, 1), q, _none(1))
    hidden, mb = _batch([(0, 1, 2, 1)], [rec], [([0.5], [0.1], [0.0], [0.0])], [1.0],
                        trained=[(0, 0), (0, 8)])
    loss = ContinuousGRPOLoss(beta=0.0, old_policy="rollout")
    _totals(loss, [mb])
    _, logs = loss.latent_terms(_MODEL, hidden, mb)
    assert logs["cont log ratio"][0].item() == pytest.approx(-3.78, abs=1e-6)
    assert logs["cont clip fraction"][0].item() == 0.0  # A > 0, rho < 1 - eps: min = rho A
    # the default old policy is this forward's own value: ratio 1, the gap only logged
    _, logs = ContinuousGRPOLoss(beta=0.0).latent_terms(_MODEL, hidden, mb)
    assert logs["cont log ratio"][0].item() == 0.0
    assert logs["cont rollout gap"][0].item() == pytest.approx(3.78, abs=1e-6)


def test_clip_on_continuous_actions():
    """sigma = 1, X = 0 (mu = beta), one dim. Row 0: beta_old = 0, eps = 1 (a = 1), beta = 1 ->
    log rho = -(0 - 1) / 2 = +0.5, A = +1: rho = 1.6487 > 1.2 -> -1.2, clipped, no gradient.
    Row 1: eps = 0, beta = 1 -> log rho = -0.5, A = -1: -min(-0.6065, -0.8) = 0.8, clipped.
    Row 2: as row 1 with A = +1: -0.6065, not clipped, a gradient."""
    recs = [LatentBlockRecord((1, 1), _mod([[0.0]], [0], [0], 1.0, [e]), _none(1, 1.0))
            for e in (1.0, 0.0, 0.0)]
    theta = [([0.0], [1.0], [0.0], [0.0])] * 3
    hidden, mb = _batch([(r, 1, 1, 1) for r in range(3)], recs, theta, [1.0, -1.0, 1.0],
                        trained=[(0, 0), (1, 0), (2, 0)])
    loss = ContinuousGRPOLoss(beta=0.0, old_policy="rollout")
    _totals(loss, [mb])  # ce 3 + 3 actions: scale 1/2
    out, logs = loss.latent_terms(_MODEL, hidden, mb)
    assert logs["cont log ratio"][0].item() == pytest.approx(-0.5, abs=1e-6)  # 0.5 - 0.5 - 0.5
    assert logs["cont clip fraction"][0].item() == 2.0
    assert logs["cont pg loss"][0].item() == pytest.approx(-1.2 + 0.8 - math.exp(-0.5), abs=1e-6)
    assert out.item() == pytest.approx((-1.2 + 0.8 - math.exp(-0.5)) / 2, abs=1e-6)
    out.backward()
    g = hidden.grad[3]  # d/d(gamma_q, beta_q) per row
    assert g[0].abs().max().item() == 0.0 and g[1].abs().max().item() == 0.0
    # row 2 (a = 0, beta = 1): d/dbeta [-A rho] = -rho * dlogrho/dbeta = -rho (a - beta) / sigma^2
    # = +rho, times the scale 1/2
    assert g[2, 1].item() == pytest.approx(math.exp(-0.5) / 2, abs=1e-6)


def test_mean_per_dim_divides_by_the_dims():
    """Oracle 8's action (2 dims) with the KL of oracle 9: sum -> log rho -0.5, KL 2.0;
    mean_per_dim -> -0.25 and 1.0."""
    rec = LatentBlockRecord((1, 1), _mod([[0.0, 0.0]], [0, 0], [1, 2], 0.5, [0, 0]), _none(2))
    ref = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    ref[0, 0, 1] = _t([0.5, 1.0])  # mu_theta - mu_ref = [0, 1]
    hidden, mb = _batch([(0, 1, 1, 1)], [rec], [([0, 0], [0.5, 2], [0, 0], [0, 0])], [1.0],
                        trained=[(0, 0)], ref=ref)
    for reduction, want in (("sum", (-0.5, 2.0)), ("mean_per_dim", (-0.25, 1.0))):
        loss = ContinuousGRPOLoss(reduction=reduction, old_policy="rollout")
        _totals(loss, [mb])
        _, logs = loss.latent_terms(_MODEL, hidden, mb)
        assert (logs["cont log ratio"][0].item(), logs["cont kl"][0].item()) == pytest.approx(
            want, abs=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        ContinuousGRPOLoss(reduction="mean")


def _count_batch(blocks_per_row, tokens_per_row, adv, no_features=()):
    """Blocks (H = W = 1) at p = 1, 7 of each row (labels p .. p + 4 forced), tokens from 12;
    random recorded stats and (gamma, beta); the current policy = the recorded one (ratio 1)."""
    d, gen = 3, torch.Generator().manual_seed(len(adv))
    blocks, recs, theta, trained = [], [], [], []
    for row, (k, n) in enumerate(zip(blocks_per_row, tokens_per_row)):
        for j in range(k):
            g = torch.randn(4, d, generator=gen, dtype=torch.float64).tolist()
            x = torch.randn(1, d, generator=gen, dtype=torch.float64).tolist()
            f = (_none(d) if (row, j) in no_features
                 else _mod(x + x, g[2], g[3], 0.5, torch.randn(2 * d, generator=gen).tolist()))
            recs.append(LatentBlockRecord((1, 1), _mod(x, g[0], g[1], 0.5, [0.1] * d), f))
            blocks.append((row, 1 + 6 * j, 1, 1))
            theta.append(tuple(g))
        trained += [(row, 12 + t) for t in range(n)]
    return _batch(blocks, recs, theta, adv, trained)


def test_all_actions_are_one_global_mean():
    """Eq. 11's |o_i| counts tokens and 2 actions per block: with the global-count contract the
    step's loss / global tokens = (sum of token terms + sum of continuous terms) / all actions.
    Micro-batches of 1 block / 4 tokens and 2 + 1 blocks (the last with no question image: 1
    action) / 1 + 1 tokens: 6 tokens + 2 + 5 actions = 13. Ratio 1 everywhere: -A per action."""
    loss = ContinuousGRPOLoss(beta=0.0)
    mbs = [_count_batch([1], [4], [2.0]), _count_batch([2, 1], [1, 1], [1.0, -3.0],
                                                       no_features={(1, 0)})]
    totals = _totals(loss, [mb for _, mb in mbs])
    assert (totals["ce"].item(), totals["cont_actions"].item()) == (6.0, 7.0)
    step_sum = 0.0
    for hidden, mb in mbs:
        step = RLStep(mb, 1.0, loss)
        total, n, logs = step.loss({"logp": torch.zeros_like(mb["old_logprobs"]),
                                    "latent": loss.latent_terms(_MODEL, hidden, mb)})
        step_sum += total.item()
    tokens = 4 * -2.0 + (-1.0 + 3.0)
    cont = 2 * -2.0 + (2 * 2 * -1.0 + 1 * 3.0)
    assert step_sum / 6 == pytest.approx((tokens + cont) / 13, abs=1e-6)


def test_forced_tokens_of_a_block_get_no_term():
    hidden, mb = _count_batch([1], [1], [1.0])
    mb["loss_mask"][0, 1 + 2] = 1.0  # the label of imod (the block's `<latent>` is at 1)
    with pytest.raises(ValueError, match="forced token"):
        ContinuousGRPOLoss().count(mb)


@pytest.mark.parametrize("reduction", ["sum", "mean_per_dim"])
def test_gradient_matches_the_direct_gaussian_formula(reduction):
    """fp64: d(loss)/d(gamma, beta) of the loss (statistics, no X or eps) = autograd of
    -min(rho A, clip(rho) A) + beta KL written on the reconstructed actions a = (1 + gamma_old) X
    + beta_old + sigma eps with gaussian_log_prob and gaussian_kl, and is non-zero."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * s

    d, sigmas, sizes, adv = 4, (0.3, 0.5), [(2, 3, 5), (0, 1, 4)], [1.5, -0.7]
    blocks, recs, data = [], [], []
    for row, (h, w, nf) in enumerate([(2, 3, 5), (1, 1, 4)]):
        mods, xs = [], []
        for x, sigma in ((rnd(h * w, d), sigmas[0]), (rnd(nf, d, s=2.0), sigmas[1])):
            g0, b0, eps = rnd(d, s=0.1), rnd(d, s=0.1), rnd(*x.shape)
            mods.append(modulate(x, g0, b0, sigma, noise=True, eps=eps, keep_action=True)[1])
            xs.append(x)
        recs.append(LatentBlockRecord((h, w), *mods))
        blocks.append((row, 1, h, w))
        data.append((xs, mods))
    old = torch.stack([torch.stack([torch.stack([m.gamma, m.beta]) for m in mods])
                       for _, mods in data])
    theta = (old + rnd(*old.shape, s=0.04)).requires_grad_()
    ref = old + rnd(*old.shape, s=0.05)
    loss = ContinuousGRPOLoss(beta=0.01, reduction=reduction, old_policy="rollout")
    mb = {"blocks": torch.tensor(blocks), "loss_mask": torch.zeros(2, 40),
          "advantages": _t(adv), "ref_modulation": ref, **block_fields(recs)}
    mb["loss_mask"][:, 30:33] = 1.0
    _totals(loss, [mb])
    scale = 6 / (6 + 4)
    ours, logs = loss.continuous_terms(theta, mb)
    (g_ours,) = torch.autograd.grad(ours, theta)

    direct, clipped = 0.0, 0
    for k, (xs, mods) in enumerate(data):
        for m, (x, mod) in enumerate(zip(xs, mods)):
            gam, bet = theta[k, m, 0], theta[k, m, 1]
            mu = (1 + gam) * x + bet
            mu_old = (1 + mod.gamma) * x + mod.beta
            mu_ref = (1 + ref[k, m, 0]) * x + ref[k, m, 1]
            dims = x.numel() if reduction == "mean_per_dim" else 1
            lr = (gaussian_log_prob(mod.action, mu, mod.sigma)
                  - gaussian_log_prob(mod.action, mu_old, mod.sigma)) / dims
            kl = gaussian_kl(mu, mod.sigma, mu_ref, mod.sigma) / dims
            rho, a = lr.exp(), adv[k]
            pg = -torch.minimum(rho * a, rho.clamp(0.8, 1.2) * a)
            clipped += int(bool(rho.clamp(0.8, 1.2) * a < rho * a))
            direct = direct + (pg + 0.01 * kl) * scale
    (g_direct,) = torch.autograd.grad(direct, theta)
    assert ours.item() == pytest.approx(direct.item(), rel=1e-6)
    assert logs["cont clip fraction"][0].item() == clipped
    # the summed log-ratio clips one action here (zero surrogate gradient, KL gradient only);
    # per dim, the same perturbation stays inside the clip range (spec 2.9 [obs])
    assert clipped == (1 if reduction == "sum" else 0)
    assert g_ours.abs().max().item() > 1e-3
    torch.testing.assert_close(g_ours, g_direct, rtol=1e-9, atol=1e-12)


def test_rollout_fields_match_records_to_their_blocks():
    """`rollout_fields`: each completion's block records go, in order, to its `<latent>`s that
    are followed by the scale placeholder (a `<latent>` past the block cap is text); a block
    cut by the budget (grid or `</latent>` missing) is no action; more records than blocks is
    an error naming the row. Ids: `<latent>` 7, scale 8, qmod 9, imod 10, slot 11, end 12."""
    def rec(h, w):
        return LatentBlockRecord((h, w), _mod([0.0] * 2 * h * w, [0.0, 0.0], [0.0, 0.0], 0.5,
                                              [0.0] * 2 * h * w),
                                 _mod([1.0, 2.0], [0.0, 0.0], [0.0, 0.0], 0.5, [0.0, 0.0]))

    loss = ContinuousGRPOLoss(block_ids=(7, 8, 11, 12), hidden_size=2)
    block = lambda h, w: [7, 8, 9, 10] + [11] * (h * w) + [12]  # noqa: E731
    row0 = [1, 2] + block(1, 2) + [3, 7, 4] + block(2, 1) + [5]  # a `<latent>` as text at 10
    row1 = [1] + block(1, 1) + [3] + block(2, 2)[:-1]  # the second block lost its `</latent>`
    rows = [(torch.tensor(row0), SimpleNamespace(events=[rec(1, 2), rec(2, 1)])),
            (torch.tensor(row1), SimpleNamespace(events=[rec(1, 1), rec(2, 2)]))]
    f = loss.rollout_fields(rows)
    assert f["blocks"].tolist() == [[0, 2, 1, 2], [0, 12, 2, 1], [1, 1, 1, 1]]
    assert f["block_n"].tolist() == [[2, 1], [2, 1], [1, 1]]
    assert f["block_modulation"].shape == (3, 2, 2, 2)
    empty = loss.rollout_fields([(torch.tensor([1, 2, 3]), SimpleNamespace(events=[]))])
    assert empty["blocks"].shape == (0, 4) and empty["block_stats"].shape == (0, 2, 4, 2)
    with pytest.raises(ValueError, match="row 0: 2 block records but 1 blocks"):
        loss.rollout_fields([(torch.tensor(block(1, 1)), SimpleNamespace(events=[rec(1, 1)] * 2))])
