"""The latent decoding rules, step by step on scripted model outputs (hand-worked traces)."""

from __future__ import annotations

import torch

from megatron_latent.latent.decoding import LatentRule

S, L, E = 100, 101, 102  # start, latent, end ids


def run(rule, consumed_first, sampled, end_prob=None):
    """Drive one row: returns [(appended, feed)] per step; the next consumed id is the one
    appended (as the generator does)."""
    state = rule.init_state(1, "cpu")
    consumed, out = consumed_first, []
    for i, tok in enumerate(sampled):
        p = None if end_prob is None else torch.tensor([end_prob[i]])
        a, f = rule.step(state, torch.tensor([consumed]), torch.tensor([tok]), p)
        out.append((int(a), bool(f)))
        consumed = int(a)
    return out


def test_steps_quota_then_sampled_token_and_reentry():
    rule = LatentRule(S, L, E, "steps", steps=2)
    got = run(rule, S, [7, 8, 9, S, 5, 6, 4])
    assert got == [(L, True), (L, True),  # h_s, h_{s+1} fed
                   (9, False),  # the token sampled after the K-th latent input
                   (S, False),  # the model opens a second span ...
                   (L, True), (L, True), (4, False)]  # ... and the quota resets


def test_steps_zero_quota_never_feeds():
    assert run(LatentRule(S, L, E, "steps", steps=0), S, [7, 8]) == [(7, False), (8, False)]


def test_sampled_end_exits_on_end_or_cap():
    rule = LatentRule(S, L, E, "sampled_end", steps=3)
    # the first latent is always fed, even if <end> is sampled at the entry step
    assert run(rule, S, [E, 3, E, 9]) == [(L, True), (L, True), (E, False), (9, False)]
    assert run(rule, S, [1, 2, 3, 4, 9]) == [(L, True), (L, True), (L, True), (E, False),
                                             (9, False)]


def test_forced_exit_token_is_end():
    rule = LatentRule(S, L, E, "forced", steps=2)
    assert run(rule, S, [1, 2, 3]) == [(L, True), (L, True), (E, False)]  # cap: forced end
    assert run(rule, S, [1, E, 3]) == [(L, True), (E, False), (3, False)]


def test_threshold_on_end_probability():
    rule = LatentRule(S, L, E, "threshold", steps=5, threshold=0.6)
    got = run(rule, S, [1, 2, 3, 4], end_prob=[0.9, 0.3, 0.7, 0.1])
    assert got == [(L, True), (L, True), (E, False), (4, False)]


def test_batch_rows_are_independent():
    rule = LatentRule(S, L, E, "steps", steps=1)
    state = rule.init_state(2, "cpu")
    a, f = rule.step(state, torch.tensor([S, 5]), torch.tensor([7, 8]))
    assert a.tolist() == [L, 8] and f.tolist() == [True, False]
    a, f = rule.step(state, a, torch.tensor([9, S]))
    assert a.tolist() == [9, S] and f.tolist() == [False, False]
