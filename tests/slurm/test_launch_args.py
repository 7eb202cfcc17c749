"""The launch commands the slurm scripts build (DRY_RUN=1, fake SLURM_* variables, no cluster):
container flags only with CONTAINER_IMAGE, no GPU request in CPU mode, deterministic
MASTER_PORT, TP/PP/CKPT_DIR pass-through, conversion task counts. Needs bash only."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = "pretrain_scripts/pretrain_demo.py"

pytestmark = pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")

JOB = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
       "SLURM_NTASKS_PER_NODE": "2", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[07-08]",
       "SLURMD_NODENAME": "gpu07", "MASTER_ADDR": "stale-from-login-shell"}


def run(script: str, *args, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "DRY_RUN": "1"}
    return subprocess.run(["bash", str(REPO / "slurm" / script), *map(str, args)],
                          env={**base, **env}, cwd=cwd, capture_output=True, text=True, timeout=60)


def launch_line(out: str) -> str:
    m = re.search(r"launch: (srun .*)", out)
    assert m, out
    return m.group(1)


def test_train_cpu_no_container(tmp_path):
    r = run("train.sbatch", DEMO, "--train-iters", "3", cwd=tmp_path,
            env={**JOB, "MEGATRON_LATENT_CPU": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    line = launch_line(r.stdout)
    assert line.startswith("srun --kill-on-bad-exit=1 --nodes=2 --ntasks=4 --ntasks-per-node=2 ")
    assert line.endswith(f"-u {REPO / DEMO} --train-iters 3 --tensor-model-parallel-size 1 "
                         "--pipeline-model-parallel-size 1"), line
    assert "--container" not in line and "--save" not in line
    assert "MASTER_ADDR=gpu07 MASTER_PORT=23456 " in r.stdout  # 20000 + 123456 % 12000
    assert "WANDB_MODE=offline" in r.stdout and "cpu (gloo)" in r.stdout
    assert f"repo={REPO} " in r.stdout  # found from the script's own path


def test_train_gpu_container_ckpt(tmp_path):
    ckpt = tmp_path / "ckpt"
    env = {**JOB, "SLURM_GPUS_ON_NODE": "2", "CONTAINER_IMAGE": "nvcr.io#nvidia/pytorch:25.01-py3",
           "CONTAINER_MOUNTS": "/data:/data", "CKPT_DIR": str(ckpt), "TP": "2", "PP": "2",
           "WANDB_MODE": "online", "REPO_DIR": str(REPO)}
    r = run("train.sbatch", DEMO, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    line = launch_line(r.stdout)
    assert (f"--container-image=nvcr.io#nvidia/pytorch:25.01-py3 --container-mounts={REPO}:{REPO},"
            f"{tmp_path}:{tmp_path},{ckpt}:{ckpt},/data:/data --container-workdir={tmp_path} ") in line
    assert line.endswith(f" python -u {REPO / DEMO} --tensor-model-parallel-size 2 "
                         f"--pipeline-model-parallel-size 2 --save {ckpt} --load {ckpt}"), line
    assert "2 GPU(s) per node (nccl)" in r.stdout and "WANDB_MODE=online" in r.stdout
    assert "TP=2 PP=2 CP=1 DP=1" in r.stdout


def test_train_tp_conflict_and_missing_script(tmp_path):
    r = run("train.sbatch", DEMO, "--tensor-model-parallel-size", "2", cwd=tmp_path,
            env={**JOB, "MEGATRON_LATENT_CPU": "1", "TP": "4"})
    assert r.returncode == 1 and "TP=4 but the script arguments say --tensor-model-parallel-size 2" in r.stderr
    r = run("train.sbatch", "pretrain_scripts/nope.py", cwd=tmp_path, env={**JOB, "MEGATRON_LATENT_CPU": "1"})
    assert r.returncode == 1 and "script not found: pretrain_scripts/nope.py" in r.stderr
    r = run("train.sbatch", DEMO, cwd=tmp_path, env={**JOB, "MEGATRON_LATENT_CPU": "1", "PP": "3"})
    assert r.returncode == 1 and "= 3 does not divide the world size 4 (2 nodes x 2 tasks per node)" in r.stderr


def test_convert_task_counts(tmp_path):
    one = {**JOB, "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NTASKS": "1",
           "SLURM_NTASKS_PER_NODE": "1", "MEGATRON_LATENT_CPU": "1"}
    r = run("convert.sbatch", "--ckpt", "c", "--out", "o", cwd=tmp_path, env=one)
    assert r.returncode == 0, r.stderr
    assert "--nodes=1 --ntasks=1 --ntasks-per-node=1 " in launch_line(r.stdout)
    assert launch_line(r.stdout).endswith("tools/convert_megatron_to_hf.py --ckpt c --out o")
    r = run("convert.sbatch", "--hf-dir", "h", "--out", "o", "--tp", "2", "--pp", "2", cwd=tmp_path,
            env={**JOB, "MEGATRON_LATENT_CPU": "1"})
    assert r.returncode == 0, r.stderr
    assert "--nodes=2 --ntasks=4 --ntasks-per-node=2 " in launch_line(r.stdout)
    assert "tools/convert_hf_to_megatron.py --hf-dir h --out o --tp 2 --pp 2" in r.stdout
    r = run("convert.sbatch", "--hf-dir", "h", "--out", "o", "--tp", "2", cwd=tmp_path, env=one)
    assert r.returncode == 1 and "hf-to-megatron needs 2 tasks" in r.stderr, r.stderr


def sbatch_line(*args, env: dict, tmp_path: Path) -> str:
    r = subprocess.run(["bash", str(REPO / "slurm/submit.sh"), *args], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], "DRY_RUN": "1", "LOG_DIR": str(tmp_path), **env},
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_submit_resources(tmp_path):
    cpu = sbatch_line("train", DEMO, env={"MEGATRON_LATENT_CPU": "1", "NODES": "2",
                                          "TASKS_PER_NODE": "2"}, tmp_path=tmp_path)
    assert cpu.startswith(f"sbatch --nodes=2 --ntasks-per-node=2 --output={tmp_path}/%x-%j.out ")
    assert "--gpus" not in cpu and cpu.endswith(f"slurm/train.sbatch {DEMO}")
    gpu = sbatch_line("train", "-t", "1:00:00", "--parsable", "--", DEMO, "--tensor-model-parallel-size", "8",
                      env={"NODES": "4", "PARTITION": "batch"}, tmp_path=tmp_path)
    assert ("--nodes=4 --ntasks-per-node=8 --output=" in gpu and "--gpus-per-node=8 --partition=batch "
            "-t 1:00:00 --parsable " in gpu), gpu
    conv = sbatch_line("convert", "--", "--hf-dir", "h", "--out", "o", "--tp", "2", "--pp", "2",
                       env={}, tmp_path=tmp_path)
    assert "--nodes=1 --ntasks-per-node=4 " in conv and "--gpus-per-node=4" in conv, conv
    conv = sbatch_line("convert", "--", "--ckpt", "c", "--out", "o", env={"MEGATRON_LATENT_CPU": "1"},
                       tmp_path=tmp_path)
    assert "--nodes=1 --ntasks-per-node=1 " in conv and "--gpus" not in conv, conv
    conv = sbatch_line("convert", "--", "--hf-dir", "h", "--out", "o", "--tp", "2",
                       env={"MEGATRON_LATENT_CPU": "1"}, tmp_path=tmp_path)
    assert "--nodes=1 --ntasks-per-node=2 " in conv and "--gpus" not in conv, conv
