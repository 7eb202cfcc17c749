"""The train/rollout mismatch (issue #24): its metrics on a hand-worked pair of distributions and
truncated importance sampling on a hand-worked example (option "recompute" at step 0:
tests/rl/test_grpo.py)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_latent.latent.depo import DePOLoss
from megatron_latent.rl.losses import GRPOLoss
from megatron_latent.rl.objective import RLStep


def _loss(loss, logp, batch):
    return RLStep(batch, 1.0, loss).loss({"logp": logp, "latent": (None, {})})


def test_mismatch_metrics_on_a_pair_of_distributions():
    """p_rollout = (1/2, 1/4, 1/4), p_train = (1/4, 1/4, 1/2) over three tokens; a batch holding
    each token as often as the rollout samples it (a, a, b, c) makes the k3 mean the exact
    KL(p_rollout || p_train) = 1/2 ln 2 - 1/4 ln 2 = 0.17329; |d| = (ln 2, ln 2, 0, ln 2);
    the ratios 1/2, 1/2, 1, 2 lie outside [0.8, 1.2] for three of four tokens."""
    p_ro, p_tr = [0.5, 0.5, 0.25, 0.25], [0.25, 0.25, 0.25, 0.5]
    rollout = torch.tensor([[math.log(p) for p in p_ro]])
    logp = torch.tensor([[math.log(p) for p in p_tr]])
    batch = {"advantages": torch.tensor([1.0]), "old_logprobs": rollout,
             "rollout_logprobs": rollout, "loss_mask": torch.ones(1, 4)}
    for loss in (GRPOLoss(0.2, 0.2, 0.0), DePOLoss(0.2, 0.2, 0.0)):
        _, n, logs = _loss(loss, logp, batch)
        mean = {k: (v[0] / v[1]).item() for k, v in logs.items()}
        assert mean["rollout kl"] == pytest.approx(0.5 * math.log(2) - 0.25 * math.log(2),
                                                   abs=1e-6)
        assert mean["rollout gap"] == pytest.approx(0.75 * math.log(2), abs=1e-6)
        assert logs["rollout gap max"].tolist() == pytest.approx([math.log(2), 1.0], abs=1e-6)
        assert mean["rollout gap share"] == pytest.approx(0.75)


def test_truncated_importance_sampling_by_hand():
    """Old training log-probs above the rollout's by ln 1.5, ln 3, -ln 2: weights 1.5, 2 (the
    cap), 0.5. With the current policy at the old one (ratio 1) and A = 1 each token's term is
    -1 x its weight: -1.5 - 2 - 0.5 = -4. The same with the old policy taken from this forward
    (`old_logprobs` None: one epoch of "tis")."""
    rollout = torch.tensor([[-1.0, -2.0, -0.5]])
    old = rollout + torch.tensor([[math.log(1.5), math.log(3.0), -math.log(2.0)]])
    for given in (old, None):
        batch = {"advantages": torch.tensor([1.0]), "old_logprobs": given,
                 "rollout_logprobs": rollout, "tis_cap": 2.0, "loss_mask": torch.ones(1, 3)}
        total, n, logs = _loss(GRPOLoss(0.2, 0.2, 0.0), old.clone(), batch)
        assert total.item() == pytest.approx(-4.0, abs=1e-6) and int(n) == 3
        assert (logs["tis weight"][0] / 3).item() == pytest.approx(4.0 / 3, abs=1e-6)
    no_tis = dict(batch, tis_cap=None, old_logprobs=old)
    assert _loss(GRPOLoss(0.2, 0.2, 0.0), old.clone(), no_tis)[0].item() == pytest.approx(-3.0)
