"""The SFT loop on one GPU (TE spec, bf16): it reads step n's logs after launching step n+1
(training/trainer.py), so every iteration must still be logged once, in order, with finite
numbers, the loss must fall, and a checkpoint must be written at the save interval and the end.
Run: pytest tests/gpu/test_trainer_gpu.py -s"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_latent import checkpointing
from megatron_latent.testing.distributed import run_distributed
from megatron_latent.testing.parity_workers import train_runs

pytestmark = pytest.mark.gpu


def test_lagged_loop_logs_every_step_and_saves(tiny_ckpts, synthetic_lvr, tmp_path):
    pytest.importorskip("transformer_engine")
    save = tmp_path / "ckpt"
    run = dict(data_path=str(synthetic_lvr / "meta.json"), hf_dir=tiny_ckpts["tiny-a"],
               micro_batch_size=2, global_batch_size=4, seq_length=512, min_pixels=3136,
               max_pixels=50176, seed=7, spec="te", bf16=True, lr_decay_style="constant",
               optim=dict(lr=2e-3), train_iters=12, save=str(save), save_interval=5)
    out = tmp_path / "runs.pt"
    run_distributed(train_runs, 1, {"lagged": run}, str(out))
    logs = torch.load(out, weights_only=False)["lagged"]
    assert [r["iteration"] for r in logs] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in logs)
    losses = [r["loss"] for r in logs]
    print(f"\nlosses {losses[0]:.4f} -> {losses[-1]:.4f}; "
          f"step_s {[round(r['step_s'], 3) for r in logs]}")
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert all(r["step_s"] > 0 for r in logs)  # each step timed from its own start
    saved = sorted(p.name for p in save.glob("iter_*"))
    assert saved == ["iter_0000005", "iter_0000010", "iter_0000012"], saved
    assert checkpointing.is_checkpoint(save)
