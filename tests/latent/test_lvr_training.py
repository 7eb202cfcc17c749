"""LVR SFT end to end on CPU (gloo): the loss falls on the synthetic visual-search data with
PP=2 (latent targets travel from the first to the last stage), PP=2 starts from exactly the
same loss as TP=1, and a run killed after a checkpoint resumes to the same losses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from megatron_latent import checkpointing
from megatron_latent.testing.distributed import run_distributed
from megatron_latent.testing.parity_workers import train_runs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
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


def _launch(args, log):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["WANDB_MODE"] = "disabled"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "pretrain_scripts/pretrain_lvr.py"), *args]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _losses(log_path: Path) -> dict[int, float]:
    out = {}
    for line in log_path.read_text().splitlines():
        if line.startswith("step ") and "| loss " in line and "valid" not in line:
            step = int(line.split()[1].split("/")[0])
            out[step] = float(line.split("| loss ")[1].split()[0])
    return out


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


def test_kill_and_resume_gives_the_same_losses(tiny_ckpts, synthetic_lvr, tmp_path):
    args = ["--hf-dir", tiny_ckpts["tiny-a"], "--data-path", str(synthetic_lvr / "meta.json"),
            "--tensor-model-parallel-size", "2", "--lr", "1e-3", "--lr-decay-style", "constant",
            *[f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items()]]
    # uninterrupted reference: 10 steps
    with open(tmp_path / "ref.log", "w") as log:
        assert _launch(args + ["--train-iters", "10"], log).wait(timeout=300) == 0
    ref = _losses(tmp_path / "ref.log")
    # a long run, SIGKILLed once iteration 5 is checkpointed
    ckpt = tmp_path / "ckpt"
    with open(tmp_path / "killed.log", "w") as log:
        proc = _launch(args + ["--train-iters", "1000", "--save", str(ckpt),
                               "--save-interval", "5"], log)
        deadline = time.time() + 600
        while checkpointing.latest_iteration(ckpt) is None and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.2)
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()  # SIGKILL the launcher and every rank: no chance to clean up
        proc.wait()
        psutil.wait_procs(psutil.Process().children(recursive=True), timeout=30)
    assert checkpointing.latest_iteration(ckpt) == 5
    with open(tmp_path / "resumed.log", "w") as log:
        assert _launch(args + ["--train-iters", "10", "--load", str(ckpt), "--save", str(ckpt)],
                       log).wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    resumed = _losses(tmp_path / "resumed.log")
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    for step in range(6, 11):
        assert resumed[step] == pytest.approx(ref[step], abs=1e-6), (step, resumed, ref)
