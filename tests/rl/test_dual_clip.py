"""Dual-clip PPO and the low-variance KL on the hand-worked numbers of
hylar-deeplatent-spec.md section 4 (oracle 6)."""

import math

import pytest
import torch

from megatron_latent.rl.losses import dual_clip_surrogate, low_var_kl


@pytest.mark.parametrize("delta, adv, eps, want", [
    (0.2, 1.0, (0.1, 0.1), -1.1),  # latent clip: r = 1.2214 clipped to 1.1
    (1.5, -1.0, (0.1, 0.1), 3.0),  # r = 4.4817, the dual clip caps -A r at -A c = 3
    (0.2, 1.0, (0.2, 0.28), -math.exp(0.2)),  # token clip: inside the range, -1.2214
    (-0.5, -1.0, (0.2, 0.28), 0.8),  # max(0.6065, 0.8)
])
def test_dual_clip_hand_worked(delta, adv, eps, want):
    old = torch.tensor([-1.0])
    loss, _ = dual_clip_surrogate(old + delta, old, torch.tensor([adv]), *eps, clip_c=3.0)
    assert loss.item() == pytest.approx(want, abs=1e-4)


def test_low_var_kl_hand_worked():
    kl = low_var_kl(torch.tensor([-0.1]), torch.tensor([-0.3]))
    assert kl.item() == pytest.approx(0.018731, abs=1e-6)
    assert low_var_kl(torch.tensor([0.0]), torch.tensor([50.0])).item() == 10.0  # clamped
