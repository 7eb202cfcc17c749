"""slurm/train.sbatch on a real (single-machine, two fake nodes) slurm cluster: a 2-node x 2-task
CPU job of the demo equals the same run under torchrun, a bad TP/PP layout fails before any
process starts, and the pre-timeout signal requeues the job."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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


@pytest.mark.skip(reason="PLACEHOLDER: scancel + requeue + resume from CKPT_DIR waits on "
                         "checkpointing (--save/--load, latest_checkpointed_iteration.txt) in the "
                         "SFT script (pretrain_scripts/pretrain_lvr.py); pretrain_demo.py saves "
                         "nothing. Then: run with CKPT_DIR and --save-interval 1, scancel "
                         "--signal=USR1 --batch after step k, check the requeued run logs "
                         "'resuming from' and continues at step k+1 with the uninterrupted "
                         "run's losses.")
def test_scancel_requeue_resumes_from_checkpoint():
    pass


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
    training is the placeholder test above."""
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
