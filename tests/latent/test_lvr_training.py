"""LVR SFT on CPU (gloo): the distributed optimizer's resume is refused without TE or Apex.
(Each loss term at PP=2 / TP=2 = TP=1 and a falling latent term: test_lvr_training_terms.py;
kill -9 and resume for every method: test_conformance_parallel.py.)"""

from __future__ import annotations

import pytest

from megatron_latent import checkpointing
from megatron_latent.testing.distributed import run_distributed
from megatron_latent.testing.parity_workers import train_runs

pytestmark = pytest.mark.slow
COMMON = dict(micro_batch_size=2, global_batch_size=4, seq_length=512, min_pixels=3136,
              max_pixels=50176, seed=7)


def test_distributed_optimizer_resume_is_refused_without_te(tiny_ckpts, synthetic_lvr, tmp_path):
    """megatron-core 0.19 cannot restore the distributed optimizer for torch Adam (CPU): the
    trainer must say so instead of resuming with a wrong optimizer state."""
    base = dict(COMMON, data_path=str(synthetic_lvr / "meta.json"), hf_dir=tiny_ckpts["tiny-a"],
                optim=dict(lr=1e-3, use_distributed_optimizer=True), save=str(tmp_path / "c"),
                train_iters=1)
    # both runs in one pair of processes, one after the other (the suite's time): the first
    # saves at iteration 1, the second refuses to load it
    with pytest.raises(RuntimeError, match="needs Transformer Engine or Apex"):
        run_distributed(train_runs, 2, {"first": base,
                                        "again": dict(base, load=str(tmp_path / "c"),
                                                      train_iters=2)}, str(tmp_path / "r.pt"))
    assert checkpointing.latest_iteration(tmp_path / "c") == 1  # the first run saved
