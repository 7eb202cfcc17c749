"""The background sample loader of the SFT loop: the samples a step gets are exactly what direct
loading gives, in order, and a sample that fails to load raises its own error at its step."""

from __future__ import annotations

import pytest

from megatron_latent.training.trainer import (SampleOrder, SamplePrefetcher, TrainConfig,
                                              _my_indices)


class Records:
    """A dataset whose item i is a dict naming i; item `bad` raises like a corrupt record."""

    def __init__(self, n: int, bad: int | None = None):
        self.n, self.bad = n, bad

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.bad:
            raise ValueError(f"data.json record {i}: field 'image': cannot open x.jpg")
        return {"index": i}


def _cfg():
    return TrainConfig(data_path="unused", hf_dir="unused", micro_batch_size=2,
                       global_batch_size=4, seq_length=64, train_iters=10)


def test_prefetched_steps_equal_direct_loading(megatron_single_rank):
    ds, cfg = Records(9), _cfg()
    order = SampleOrder(len(ds), seed=3)
    # one data-parallel rank: a step's samples are the next 4 of the sample order
    assert _my_indices(order, 4, cfg, 2) == order.take(4, 4)
    pre = SamplePrefetcher(ds, order, cfg, num_micro=2)
    try:
        for step in range(5):  # crosses an epoch boundary (9 samples, 4 a step)
            consumed = step * cfg.global_batch_size
            got = pre.get(consumed)
            pre.prefetch(consumed + cfg.global_batch_size)
            want = [{"index": i} for i in order.take(consumed, cfg.global_batch_size)]
            assert got == want
    finally:
        pre.close()


def test_a_bad_sample_fails_its_own_step(megatron_single_rank):
    cfg = _cfg()
    order = SampleOrder(9, seed=3)
    bad = _my_indices(order, 4, cfg, 2)[1]  # a sample of the second step
    pre = SamplePrefetcher(Records(9, bad=bad), order, cfg, num_micro=2)
    try:
        pre.get(0)
        pre.prefetch(4)
        pre.settle()  # the failure does not surface early
        with pytest.raises(ValueError, match=f"record {bad}: field 'image'"):
            pre.get(4)
    finally:
        pre.close()
