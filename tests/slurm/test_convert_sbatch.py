"""slurm/convert.sbatch as a slurm job: HF -> Megatron at TP=2, one task on each of the two fake
nodes. Skipped until the converter (tools/convert_hf_to_megatron.py) exists. (The one-task
Megatron -> HF command line is checked without a cluster in test_launch_args.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_convert_hf_to_megatron_job(slurm_cluster, tiny_hf_dir, tmp_path):
    # submit.sh asks for TP x PP = 2 tasks itself; TASKS_PER_NODE=1 spreads them over 2 nodes.
    env = {**slurm_cluster.env, "TASKS_PER_NODE": "1", "LOG_DIR": str(tmp_path)}
    out = tmp_path / "mcore"
    job_id = slurm_cluster.submit(REPO / "slurm/submit.sh", "convert", "--parsable", "--",
                                  "--hf-dir", tiny_hf_dir, "--out", out, "--tp", "2",
                                  env=env, cwd=tmp_path)
    job = slurm_cluster.wait(job_id, timeout=120)
    log = job.log()
    assert job.state == "COMPLETED" and job.exit_code == "0:0", f"{job}\n{log[-4000:]}"
    assert "2 node(s) x 1 task(s) = world 2" in log, log
    assert "hf-to-megatron on 2 task(s) over 2 node(s)" in log, log
    assert out.is_dir() and any(out.iterdir()), f"no output in {out}\n{log[-3000:]}"
