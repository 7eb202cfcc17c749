"""The conformance suite's multi-process parts, for every registered latent method (gloo, CPU):
TP=2, TP=2 with sequence parallelism and PP=2 give each loss term of step 1 as TP=1 does; a run
killed with SIGKILL after a checkpoint resumes to the same losses as an uninterrupted one; and
the method's co-located RL step at TP=2 and PP=2 starts on-policy (ratio 1, the latent actions'
log-probs equal to the rollout's), with the same rollouts and rewards in both layouts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from megatron_latent import checkpointing
from megatron_latent.latent import registry
from megatron_latent.latent.base import LatentMethod
from megatron_latent.testing.distributed import run_distributed
from megatron_latent.testing.method_kits import KITS
from megatron_latent.testing.parity_workers import train_runs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
METHODS = [n for n in registry.names() if n != "none"]
COMMON = dict(micro_batch_size=2, global_batch_size=4, seq_length=512, min_pixels=3136,
              max_pixels=50176, seed=7)


@pytest.fixture(scope="module")
def layout_runs(tiny_ckpts, tmp_path_factory):
    """Every method's layouts, run in one pair of processes one after the other (the suite's
    time: one start-up, not one per method). -> {name: {layout: per-iteration logs}}"""
    root = tmp_path_factory.mktemp("layouts")
    runs = {}
    for name in METHODS:
        kit, tmp = KITS[name], root / name
        tmp.mkdir()
        base = dict(COMMON, data_path=kit.make_data(tmp), hf_dir=tiny_ckpts["tiny-a"],
                    latent_method=name, latent_hparams=kit.hparams(tmp, tiny_ckpts["tiny-a"]),
                    train_iters=2, optim=dict(lr=1e-3), lr_decay_style="constant")
        runs.update({f"{name}/tp1": base,
                     f"{name}/tp2": dict(base, tensor_model_parallel_size=2),
                     f"{name}/tp2sp": dict(base, tensor_model_parallel_size=2,
                                           sequence_parallel=True),
                     f"{name}/pp2": dict(base, pipeline_model_parallel_size=2)})
    run_distributed(train_runs, 2, runs, str(root / "runs.pt"))
    out = {name: {} for name in METHODS}
    for key, logs in torch.load(root / "runs.pt", weights_only=False).items():
        name, layout = key.split("/", 1)
        out[name][layout] = logs
    return out


@pytest.mark.parametrize("name", METHODS)
def test_layouts_match_tp1_per_term(name, layout_runs):
    res = layout_runs[name]
    assert set(res) == {"tp1", "tp2", "tp2sp", "pp2"}
    terms = [k for k in res["tp1"][0] if k.endswith(("loss", "mse")) and k != "loss"] + ["loss"]
    assert len(terms) >= 3, terms  # the LM term, the method's own, the total
    diffs = {(layout, term): (res[layout][0][term], res["tp1"][0][term])
             for layout in ("tp2", "tp2sp", "pp2") for term in terms}
    for (layout, term), (got, ref) in diffs.items():  # fp32: relative to the term's size
        assert ref > 0 and abs(got - ref) <= 1e-5 * max(1.0, ref), (layout, term, diffs)


def _launch(args, log, nproc: int = 2):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["WANDB_MODE"] = "disabled"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc),
           str(REPO / "pretrain_scripts/pretrain_sft.py"), *args]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _losses(log_path: Path) -> dict[int, float]:
    out = {}
    for line in log_path.read_text().splitlines():
        if line.startswith("step ") and "| loss " in line and "valid" not in line:
            step = int(line.split()[1].split("/")[0])
            out[step] = float(line.split("| loss ")[1].split()[0])
    return out


@pytest.mark.parametrize("name", METHODS)
def test_kill_and_resume_gives_the_same_losses(name, tiny_ckpts, tmp_path):
    kit = KITS[name]
    # TP=2 where a method has side modules (their replicas over TP ranks are what a resume can
    # get wrong); one process otherwise (the suite's time: LVR's TP=2 resume is also run by
    # tests/slurm/test_train_sbatch.py)
    tp = 2 if registry.method_class(name).build_modules is not LatentMethod.build_modules else 1
    args = ["--hf-dir", tiny_ckpts["tiny-a"], "--data-path", kit.make_data(tmp_path),
            "--latent-method", name, *kit.cli(kit.hparams(tmp_path, tiny_ckpts["tiny-a"])),
            "--tensor-model-parallel-size", str(tp), "--lr", "1e-3", "--lr-decay-style", "constant",
            *[f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items()]]
    # the uninterrupted reference (8 steps); at TP=1 (one rank) it runs alongside the killed
    # run and the resume, on the other core (its own processes, no shared files), as in
    # tests/slurm; a TP=2 run keeps 2 cores busy on its own: in sequence
    with open(tmp_path / "ref.log", "w") as ref_log:
        ref_proc = _launch(args + ["--train-iters", "8"], ref_log, tp)
    try:
        if tp > 1:
            assert ref_proc.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
        ckpt = tmp_path / "ckpt"  # a long run, SIGKILLed once iteration 4 is checkpointed
        with open(tmp_path / "killed.log", "w") as log:
            proc = _launch(args + ["--train-iters", "1000", "--save", str(ckpt),
                                   "--save-interval", "4"], log, tp)
            deadline = time.time() + 600
            while checkpointing.latest_iteration(ckpt) is None and time.time() < deadline:
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                time.sleep(0.2)
            tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
            for p in tree:
                p.kill()  # SIGKILL the launcher and every rank: no chance to clean up
            proc.wait()
            psutil.wait_procs(tree, timeout=30)
        assert checkpointing.latest_iteration(ckpt) == 4
        assert checkpointing.read_metadata(ckpt)["latent_method"]["name"] == name
        with open(tmp_path / "resumed.log", "w") as log:  # no method flags: the checkpoint's own
            i = args.index("--latent-method")
            resume = args[:i] + args[i + 2:]
            assert _launch([*resume, "--train-iters", "8", "--load", str(ckpt), "--save",
                            str(ckpt)], log, tp).wait(timeout=300) == 0, \
                (tmp_path / "resumed.log").read_text()[-3000:]
        assert ref_proc.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    finally:
        if ref_proc.poll() is None:
            for p in [*psutil.Process(ref_proc.pid).children(recursive=True), ref_proc]:
                p.kill()
            ref_proc.wait()
    ref = _losses(tmp_path / "ref.log")
    resumed = _losses(tmp_path / "resumed.log")
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(ref[step], abs=1e-6), (step, resumed, ref)


RL_METHODS = [n for n in METHODS if registry.method_class(n).has_rl_stage]


@pytest.fixture(scope="module")
def rl_step0_runs(tiny_ckpts, synthetic_lvr, tmp_path_factory, megatron_single_rank):
    """Every RL method's layouts, run in one pair of processes one after the other (the suite's
    time: one start-up, not one per method); the refused layouts last. -> {name: {layout: ...}}"""
    from megatron_latent.testing.rl_workers import grpo_runs, save_rl_start

    root = tmp_path_factory.mktemp("rl_step0")
    runs, refused = {}, {}
    for name in RL_METHODS:
        kit, tmp = KITS[name], root / name
        tmp.mkdir()
        start = save_rl_start(name, tiny_ckpts["tiny-a"], kit.hparams(tmp, tiny_ckpts["tiny-a"]),
                              str(tmp / "start"))
        base = dict(data_path=str(synthetic_lvr / "meta_rl.json"), pretrained_checkpoint=start,
                    prompts_per_step=2, group_size=4, micro_batch_size=4, seq_length=1024,
                    max_new_tokens=16, temperature=1.0, top_k=0, latent_steps=2,
                    answer_prefix=kit.opener, rewards="vowels:1.0", filter_reward="vowels",
                    train_iters=2,
                    optim={"lr": 1e-3}, max_pixels=112 * 112, wandb_mode="disabled",
                    reward_module="megatron_latent.testing.rl_workers")
        runs[f"{name}/tp2"] = dict(base, tensor_model_parallel_size=2)
        if kit.rl_pipeline:
            runs[f"{name}/pp2"] = dict(base, pipeline_model_parallel_size=2)
        else:
            runs[f"{name}/dp2"] = dict(base, prompts_per_step=4)  # the same 2 prompts per rank
            refused[f"{name}/pp2 refused"] = dict(base, pipeline_model_parallel_size=2,
                                                  expect_error=True)
        if name == "lvr":
            runs["lvr/tp2 fp8"] = dict(base, tensor_model_parallel_size=2,
                                       rollout_precision="fp8")
    run_distributed(grpo_runs, 2, {**runs, **refused}, str(root / "rl.pt"))
    res = torch.load(root / "rl.pt", weights_only=False)
    out = {name: {} for name in RL_METHODS}
    for key, hist in res.items():
        name, layout = key.split("/", 1)
        out[name][layout] = hist
    return out


@pytest.mark.parametrize("name", RL_METHODS)
def test_rl_step0_on_policy_at_tp2_and_pp2(name, rl_step0_runs):
    """PP=2 for a method whose RL stage runs there; otherwise DP=2, and PP=2 refused."""
    kit = KITS[name]
    res = {k: v for k, v in rl_step0_runs[name].items() if not k.endswith("fp8")}
    assert set(res) == ({"tp2", "pp2"} if kit.rl_pipeline else {"tp2", "dp2", "pp2 refused"})
    if not kit.rl_pipeline:
        assert "pipeline-parallel size 1" in res.pop("pp2 refused"), res
    for layout, hist in res.items():
        assert len(hist) == 2 and all(math.isfinite(h["policy loss"]) for h in hist), layout
        assert hist[0]["ratio"] == pytest.approx(1.0, abs=1e-5), layout
        assert hist[0]["rollout gap"] <= 1e-5, layout  # mean |log p_train - log p_rollout|
        assert hist[0]["latent-span rate"] == 1.0
        assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the start
        if "latent rollout gap" in hist[0]:  # a method with a latent policy
            assert hist[0]["latent rollout gap"] <= 1e-5 * max(1.0, abs(hist[0]["latent logp"]))
        if "cont log ratio" in hist[0]:  # continuous actions: on-policy at step 0, no KL yet
            assert hist[0]["cont actions per rollout"] == 2.0, layout  # the prompt opens a block
            assert hist[0]["cont log ratio"] == 0.0 and hist[0]["cont kl"] == 0.0, layout
            assert hist[0]["cont clip fraction"] == 0.0, layout
    if kit.rl_pipeline:  # the same rollouts in both layouts
        assert res["tp2"][0]["reward"] == pytest.approx(res["pp2"][0]["reward"], abs=1e-6)


def test_fp8_rollouts_at_tp2_default_to_tis(rl_step0_runs):
    """FP8 rollouts (tensor-parallel shards quantized per rank): the rollout's log-probs differ
    from the training forward's by the quantization, truncated importance sampling is on by
    default, and with one PPO epoch the ratio is still exactly 1 (the old policy is the
    training forward's own)."""
    hist = rl_step0_runs["lvr"]["tp2 fp8"]
    assert len(hist) == 2 and all(math.isfinite(h["policy loss"]) for h in hist)
    first = hist[0]
    assert 1e-4 < first["rollout gap"] < 0.2, first
    assert first["rollout gap max"] >= first["rollout gap"]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert "tis weight" in first and first["tis weight"] != pytest.approx(1.0, abs=1e-6)
