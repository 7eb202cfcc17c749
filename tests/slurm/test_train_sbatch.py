"""slurm/train.sbatch on a real (single-machine, two fake nodes) slurm cluster: a 2-node x 2-task
CPU job of the demo equals the same run under torchrun, a bad TP/PP layout fails before any
process starts, an LVR SFT job cancelled after a checkpoint and resubmitted resumes to the
uninterrupted run's losses, and the pre-timeout signal requeues the job."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

STEP = re.compile(r"^step (\d+)/(\d+) \| loss (\S+) \|", re.M)
DEMO = "pretrain_scripts/pretrain_demo.py"


def step_losses(text: str) -> list[tuple[int, str]]:
    """(step, loss as printed) from the rank-0 lines `step N/M | loss X | ...`."""
    return [(int(n), loss) for n, _, loss in STEP.findall(text)]


def test_demo_2_nodes_x_2_tasks_equals_torchrun(slurm_cluster, tiny_hf_dir, tmp_path):
    demo_args = ["--tensor-model-parallel-size", "2", "--train-iters", "3", "--hf-dir", tiny_hf_dir]
    env = slurm_cluster.env
    # Reference: the same run on one "node" under torchrun (DP=2 x TP=2), started alongside the
    # slurm job to save wall time. Different working directories: no shared files.
    ref_dir = tmp_path / "torchrun"
    ref_dir.mkdir()
    t0 = time.time()
    ref = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "4", str(REPO / DEMO), *demo_args],
                           cwd=ref_dir, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    # Through submit.sh (NODES / TASKS_PER_NODE from the env) -> sbatch slurm/train.sbatch,
    # submitted from a directory outside the repo: the script path is found through the repo.
    job_dir = tmp_path / "slurm"
    job_dir.mkdir()
    job_id = slurm_cluster.submit(REPO / "slurm/submit.sh", "train", "--parsable", "--", DEMO,
                                  *demo_args, cwd=job_dir,
                                  env={**env, "NODES": "2", "TASKS_PER_NODE": "2",
                                       "LOG_DIR": str(job_dir)})
    try:
        job = slurm_cluster.wait(job_id, timeout=150)
        t_slurm = time.time() - t0
        ref_out, _ = ref.communicate(timeout=150)
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()
    log = job.log()
    print(f"\n[timing] slurm job {job.elapsed_s:.1f} s, torchrun {time.time() - t0:.1f} s "
          f"(concurrently)")
    assert job.state == "COMPLETED" and job.exit_code == "0:0", f"{job}\n{log[-4000:]}"
    assert ref.returncode == 0, ref_out[-4000:]
    assert job.stdout.startswith(str(job_dir)) and job.stdout.endswith(f"ml-train-{job_id}.out")
    assert "2 node(s) x 2 task(s) = world 4, cpu (gloo)" in log, log[-3000:]
    assert "on mlslurm[1-2]" in log and "MASTER_ADDR=mlslurm1 " in log
    assert "TP=2 PP=1 CP=1 DP=2" in log
    got, want = step_losses(log), step_losses(ref_out)
    assert [s for s, _ in want] == [1, 2, 3], ref_out[-3000:]
    assert got == want, f"slurm {got} != torchrun {want}"
    assert t_slurm < 150


def test_bad_layout_fails_fast_with_message(slurm_cluster, tmp_path):
    # Plain sbatch (no submit.sh) from the repo root with a relative script path, as in the
    # docs: the check inside the job. TP=3 cannot split 4 ranks.
    env = {**slurm_cluster.env, "TP": "3"}
    job_id = slurm_cluster.submit("sbatch", "--parsable", "-N", "2", "--ntasks-per-node", "2",
                                  f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch",
                                  DEMO, "--train-iters", "3", env=env, cwd=REPO)
    job = slurm_cluster.wait(job_id, timeout=60)
    log = job.log()
    assert job.state == "FAILED" and job.exit_code == "1:0", f"{job}\n{log}"
    assert ("error: tensor (3) x pipeline (1) x context (1) parallel size = 3 does not divide "
            "the world size 4 (2 nodes x 2 tasks per node)") in log, log
    assert "launch: srun" not in log, "nothing may be started on a bad layout"
    assert job.elapsed_s < 20, f"should fail fast, took {job.elapsed_s:.1f} s"

    # submit.sh refuses the same layout before queueing anything.
    r = slurm_cluster.run(REPO / "slurm/submit.sh", "train", "--parsable", "--", DEMO,
                          env={**env, "NODES": "2", "TASKS_PER_NODE": "2"}, check=False,
                          cwd=tmp_path)
    assert r.returncode != 0 and "does not divide the world size 4" in r.stderr, r
    assert not r.stdout.strip(), f"nothing should have been submitted: {r.stdout}"


# Runs a training script unchanged (argv[1]; its flags follow) and, on rank 0, prints every metric
# of every logged step at full precision as `exact step N {json}`: RunLogger's own `step N/M`
# lines round to 4 significant digits, too coarse to compare resumed losses within 1e-6.
# (Guarded: multiprocessing's spawn re-imports the main module.)
EXACT_LOSSES = """\
import json, runpy, sys
from megatron_latent.training.run_logger import RunLogger

def log(self, step, metrics, _log=RunLogger.log):
    _log(self, step, metrics)
    if self.rank0:
        exact = {k: v for k, v in metrics.items() if isinstance(v, float)}
        print("exact step", step, json.dumps(exact), flush=True)

if __name__ == "__main__":
    RunLogger.log = log
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""
EXACT = re.compile(r"^exact step (\d+) (\{.*\})$", re.M)
LVR_STEP = re.compile(r"^step (\d+)/(\d+) \|.* \| loss (\S+) \|", re.M)
LVR = REPO / "pretrain_scripts/pretrain_lvr.py"


def exact_losses(text: str) -> dict[int, float]:
    return {int(n): json.loads(d)["loss"] for n, d in EXACT.findall(text)}


def job_processes(job_id: str, marker: str) -> list[str]:
    """Processes left of a job: any with SLURM_JOB_ID=job_id in its environment (ranks and their
    helpers, e.g. the checkpoint writer's multiprocessing Manager) or a pretrain_lvr.py process
    whose arguments contain `marker`."""
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ((p.info["environ"] or {}).get("SLURM_JOB_ID") == job_id
                or ("pretrain_lvr.py" in cmd and marker in cmd)):
            found.append(f"{p.pid}: {cmd[:200]}")
    return found


def test_scancel_then_resubmit_resumes_from_checkpoint(slurm_cluster, tiny_hf_dir, synthetic_lvr,
                                                        tmp_path):
    """An LVR SFT job (2 nodes x 1 task, TP=2) with CKPT_DIR and --save-interval 3 is cancelled
    with a plain `scancel` once its first checkpoint is published; resubmitted with
    --train-iters 6 it resumes from the newest checkpoint and its losses equal those of an
    uninterrupted torchrun run of the same config (full precision, within 1e-6)."""
    wrapper = tmp_path / "exact_losses.py"
    wrapper.write_text(EXACT_LOSSES)
    common = ["--hf-dir", tiny_hf_dir, "--data-path", str(synthetic_lvr / "meta.json"),
              "--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--seq-length", "512", "--min-pixels", "3136",
              "--max-pixels", "50176", "--lr", "1e-3", "--lr-decay-style", "constant",
              "--seed", "7", "--wandb-mode", "disabled", "--save-interval", "3"]
    env = slurm_cluster.env
    t0 = time.time()

    # Reference: uninterrupted, 6 steps, under torchrun on this machine (saving into its own
    # directory at the same steps); runs alongside the first slurm job to save wall time.
    ref_dir = tmp_path / "torchrun"
    ref_dir.mkdir()
    ref = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2", str(wrapper), str(LVR), *common,
                            "--train-iters", "6", "--save", str(ref_dir / "ckpt")],
                           cwd=ref_dir, env={**env, "PYTHONPATH": str(REPO)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = tmp_path / "ckpt"
    job_dir = tmp_path / "slurm"
    job_dir.mkdir()
    job_env = {**env, "NODES": "2", "TASKS_PER_NODE": "1", "LOG_DIR": str(job_dir),
               "CKPT_DIR": str(ckpt)}

    def submit(train_iters: int) -> str:
        return slurm_cluster.submit(REPO / "slurm/submit.sh", "train", "--parsable", "--",
                                    wrapper, LVR, *common, "--train-iters", str(train_iters),
                                    cwd=job_dir, env=job_env)

    try:
        # 1. A long job, cancelled as soon as its first checkpoint (iteration 3) is published.
        first = submit(1000)
        first_log = job_dir / f"ml-train-{first}.out"
        latest = ckpt / "latest_checkpointed_iteration.txt"
        deadline, next_check = time.time() + 120, 0.0
        while not latest.is_file():
            if time.time() > next_check:  # once a second: has the job died?
                state = slurm_cluster.job_info(first).get("JobState", "")
                assert state in ("", "PENDING", "CONFIGURING", "RUNNING"), \
                    f"job {first} {state} before its first checkpoint\n{first_log.read_text()[-4000:]}"
                assert time.time() < deadline, f"no checkpoint after 120 s\n{first_log.read_text()[-4000:]}"
                next_check = time.time() + 1
            time.sleep(0.05)
        t_ckpt = time.time() - t0
        slurm_cluster.run("scancel", first)  # plain cancel: SIGTERM, SIGKILL after KillWait
        t_cancel = time.time()
        job = slurm_cluster.wait(first, timeout=60)
        # gone: out of squeue (no COMPLETING) and no rank of it left on the "nodes"
        while (slurm_cluster.run("squeue", "-h", "-j", first, check=False).stdout.strip()
               or job_processes(first, str(ckpt))) and time.time() - t_cancel < 30:
            time.sleep(0.1)
        t_gone = time.time() - t_cancel
        assert job.state == "CANCELLED", f"{job}\n{job.log()[-3000:]}"
        assert slurm_cluster.job_info(first).get("Restarts") == "0", "a plain scancel must not requeue"
        assert not slurm_cluster.run("squeue", "-h", "-j", first, check=False).stdout.strip()
        left = job_processes(first, str(ckpt))
        assert not left, f"processes of job {first} survived the scancel: {left}"
        k = int(latest.read_text())
        first_out = first_log.read_text(errors="replace")
        # The trainer treats SIGTERM as "checkpoint at the end of this step", so a checkpoint after
        # the periodic one at 3 is possible (under slurm that save currently fails: the same
        # SIGTERM kills the checkpoint writer's multiprocessing Manager, BrokenPipeError; the
        # partial iter_*.tmp-* stays). Either way there must be steps left to resume.
        assert 3 <= k < 6, f"latest checkpoint {k}\n{first_out[-3000:]}"
        assert (ckpt / f"iter_{k:07d}").is_dir()
        assert "2 node(s) x 1 task(s) = world 2, cpu (gloo)" in first_out, first_out[-3000:]
        assert "TP=2 PP=1 CP=1 DP=1" in first_out and f"--save {ckpt} --load {ckpt}" in first_out

        # 2. The same job again, 6 iterations: resumes from iteration k and finishes.
        second = submit(6)
        job2 = slurm_cluster.wait(second, timeout=120)
        log2 = job2.log()
        assert job2.state == "COMPLETED" and job2.exit_code == "0:0", f"{job2}\n{log2[-4000:]}"
        ref_out, _ = ref.communicate(timeout=120)
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()
    t_total = time.time() - t0
    print(f"\n[timing] first checkpoint after {t_ckpt:.1f} s, cancelled job gone after "
          f"{t_gone:.1f} s (latest iteration {k}), resumed job {job2.elapsed_s:.1f} s; "
          f"total {t_total:.1f} s")
    assert ref.returncode == 0, ref_out[-4000:]
    assert f"resuming from {ckpt} (iteration {k})" in log2, log2[-3000:]
    assert int(latest.read_text()) == 6 and (ckpt / "iter_0000006").is_dir()

    want, got, before = exact_losses(ref_out), exact_losses(log2), exact_losses(first_out)
    assert sorted(want) == [1, 2, 3, 4, 5, 6], ref_out[-3000:]
    assert sorted(got) == list(range(k + 1, 7)), log2[-3000:]  # starts right after the checkpoint
    printed = [(int(n), int(m)) for n, m, _ in LVR_STEP.findall(log2)]
    assert printed == [(s, 6) for s in range(k + 1, 7)], log2[-3000:]
    for s in range(k + 1, 7):
        assert abs(got[s] - want[s]) <= 1e-6, (s, got, want)
    # and the cancelled job was the same run up to its checkpoint
    for s in range(1, k + 1):
        assert abs(before[s] - want[s]) <= 1e-6, (s, before, want)


FAKE_TRAIN = """\
import os, signal, sys, time
n = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
def save_and_exit(signum, frame):
    print("fake train: saving on signal", signum, flush=True)
    sys.exit(0)
signal.signal(signal.SIGUSR2, save_and_exit)
print("fake train: restart", n, "rank", os.environ["SLURM_PROCID"], "args", sys.argv[1:], flush=True)
if n == 0:
    time.sleep(120)  # ended by the signal / the requeue
print("fake train: done", flush=True)
"""


def test_pre_timeout_signal_requeues_job(slurm_cluster, tmp_path):
    """The pre-timeout warning (#SBATCH --signal=B:USR1@300, sent here at once with scancel) is
    forwarded to the ranks as SAVE_SIGNAL=USR2, then the job is requeued; the second run gets
    the same --save/--load CKPT_DIR. The script is a stand-in that only prints: resuming real
    training is test_scancel_then_resubmit_resumes_from_checkpoint above."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    ckpt = tmp_path / "ckpt"
    env = {**slurm_cluster.env, "CKPT_DIR": str(ckpt), "SAVE_SIGNAL": "USR2"}
    job_id = slurm_cluster.submit("sbatch", "--parsable", "-N", "1", "--ntasks-per-node", "1",
                                  f"--output={tmp_path}/%x-%j.out", REPO / "slurm/train.sbatch",
                                  script, env=env, cwd=tmp_path)
    log_path = tmp_path / f"ml-train-{job_id}.out"
    slurm_cluster.wait_for_log(job_id, r"fake train: restart 0", log_path, timeout=60)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    # Requeued jobs wait cred_expire (10 s in the test cluster, 120 s by default) to restart.
    job = slurm_cluster.wait(job_id, timeout=90)
    log = job.log()
    assert job.state == "COMPLETED" and job.exit_code == "0:0", f"{job}\n{log}"
    assert slurm_cluster.job_info(job_id).get("Restarts") == "1"
    assert "sending SIGUSR2 to the ranks" in log, log
    assert f"fake train: saving on signal {int(signal.SIGUSR2)}" in log, log
    assert f"requeueing job {job_id} (restart 1)" in log, log
    assert "fake train: restart 1" in log and "fake train: done" in log, log
    assert f"'--save', '{ckpt}', '--load', '{ckpt}'" in log, log
    assert ckpt.is_dir()
