"""LVR SFT end to end on CPU (gloo): the loss falls on the synthetic visual-search data with
PP=2 (latent targets travel from the first to the last stage), PP=2 starts from exactly the
same loss as TP=1. (Kill -9 and resume, for every method: test_conformance_parallel.py.)"""

from __future__ import annotations

import pytest
import torch

from megatron_latent.testing.distributed import run_distributed
from megatron_latent.testing.parity_workers import train_runs

pytestmark = pytest.mark.slow
COMMON = dict(micro_batch_size=2, global_batch_size=4, seq_length=512, min_pixels=3136,
              max_pixels=50176, seed=7)


def test_loss_falls_with_pp2_and_matches_tp1(tiny_ckpts, synthetic_lvr, tmp_path):
    data = str(synthetic_lvr / "meta.json")
    base = dict(COMMON, data_path=data, hf_dir=tiny_ckpts["tiny-a"],
                optim=dict(lr=2e-3, clip_grad=1.0), lr_decay_style="constant")
    runs = {"pp2": dict(base, pipeline_model_parallel_size=2, train_iters=30),
            "tp1": dict(base, train_iters=2)}
    out = tmp_path / "runs.pt"
    run_distributed(train_runs, 2, runs, str(out))
    res = torch.load(out, weights_only=False)
    pp2 = [r["loss"] for r in res["pp2"]]
    assert abs(res["pp2"][0]["loss"] - res["tp1"][0]["loss"]) <= 1e-5
    assert abs(res["pp2"][1]["latent mse"] - res["tp1"][1]["latent mse"]) <= 1e-5
    first, last = sum(pp2[:5]) / 5, sum(pp2[-5:]) / 5
    print(f"\nPP=2 LVR loss: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last < 0.6 * first, pp2


def test_distributed_optimizer_resume_is_refused_without_te(tiny_ckpts, synthetic_lvr, tmp_path):
    """megatron-core 0.19 cannot restore the distributed optimizer for torch Adam (CPU): the
    trainer must say so instead of resuming with a wrong optimizer state."""
    from megatron_latent.testing.parity_workers import train_runs

    base = dict(COMMON, data_path=str(synthetic_lvr / "meta.json"), hf_dir=tiny_ckpts["tiny-a"],
                optim=dict(lr=1e-3, use_distributed_optimizer=True), save=str(tmp_path / "c"),
                train_iters=1)
    run_distributed(train_runs, 2, {"first": base}, str(tmp_path / "r.pt"))
    with pytest.raises(RuntimeError, match="needs Transformer Engine or Apex"):
        run_distributed(train_runs, 2, {"again": dict(base, load=str(tmp_path / "c"),
                                                      train_iters=2)}, str(tmp_path / "r.pt"))
